"""Batched L-BFGS for many L2-regularised logistic regressions that share activation matrices.

One call of :func:`fit_logistic` solves ``H x P`` independent problems: for every hook ``h`` (one activation
matrix ``X[h]`` of ``N`` rows) and every column ``p`` (a CV fold, a value of C, a class in one-vs-rest)::

    minimise_{w, b}   sum_n S[p, n] * BCE(z[n], Y[p, n]) / sw[p]  +  ||w||^2 / (2 C[p] sw[p])
    z[n] = ((X[h, n] - mu[h, p]) / sigma[h, p]) . (w Pm)  +  b          sw[p] = sum_n S[p, n]

which has the same minimiser as scikit-learn's ``LogisticRegression(penalty="l2", C)`` (sum of losses plus
``||w||^2 / (2C)``, intercept not penalised); dividing by ``sw`` makes ``tol`` mean what sklearn's ``tol``
means for lbfgs (stop when the largest gradient entry of the sample-averaged objective is below it).
``mu``/``sigma`` standardise the features and ``Pm`` (optional, symmetric ``[d, d]``) restricts the problem to a
subspace (INLP). Neither is ever applied to ``X``: the activations are touched only through
``interp.probes.kernel.get_loss_grad(backend, device)``, called with the effective raw-space weights
``W' = (w Pm) / sigma`` and ``b' = b - mu . W'``, and the gradients are carried back by the chain rule. ``X``
stays in the store dtype and is never copied; each call is one pass over it, which is the whole cost.

Why L-BFGS, and this variant
----------------------------
* Each loss/gradient evaluation is a pass over ``X`` and costs about the same for 1 or ~30 columns (it is
  memory-bound), so the optimiser should minimise *passes*, and every problem should move at every pass.
  Newton's method needs ``X^T D X`` per problem per step (hundreds of passes' worth of flops for ``d`` in the
  hundreds) or a pass per Hessian-vector product; first-order methods need hundreds of passes on the
  ill-conditioned problems real activations give. Quasi-Newton with a limited memory is the standard middle
  ground (it is what sklearn's default ``lbfgs`` solver uses), at about 1.1 passes per iteration.
* Preconditioned: the L-BFGS initial matrix is the inverse Hessian of the objective at ``w = 0``,
  ``(Sigma / 4 + I / (C sw))^-1`` with ``Sigma`` the hook's feature covariance (estimated by the caller from
  at most 4096 rows: :func:`feature_covariance`, the one read of ``X`` outside the kernel, and optional).
  Logistic curvature is ``p (1 - p) <= 1/4`` times the covariance, so this is the Newton step of the
  quadratic model and the right metric for every later step; on anisotropic activations it cuts ~100 passes
  to ~10 (bench/probes.py, 7 hooks x 20k rows x 384: 95 -> 13). Without it, the usual scaled identity.
* The line search is per problem and costs no extra passes: in every pass each problem is evaluated at its own
  trial point. A trial is accepted when the Armijo condition holds or, since the objective is convex, when
  the directional derivative at the trial is still <= 0 (the loss cannot have gone up, and this test reads
  gradients only, which stay accurate in float32 when losses differ in their last digits). A rejected trial
  is shortened by secant interpolation of the directional derivative. Problems converge independently;
  hooks whose problems have all converged are no longer evaluated.
* Memory ``m = 20`` pairs by default (sklearn/scipy use 10; sweeps use 5, ``SWEEP_MEMORY`` in
  :mod:`interp.probes.linear`, where the bookkeeping costs more than the passes), kept in one ring of ``m``
  slots shared by all problems and written in place: a problem that stores no pair in a round gets a pair with
  ``rho = 0`` there, which the two-loop recursion skips exactly (it only shortens that problem's memory). The
  recursion runs over the slots written so far, and the initial matrix is applied once per iteration, to the
  recursion's vector and the new pairs' ``y`` (for the scale ``gamma``) together; with several values of C laid
  out in contiguous blocks (as ``train_probes`` does), that is one batched product. When the covariance estimate
  has fewer rows than features (small stores), the initial matrices come from one eigendecomposition per hook
  (of the rows' Gram matrix) for every value of C, and ``gamma`` needs only the new pairs' coordinates on its
  eigenvectors, not a full product. On small problems (a few hundred rows) this bookkeeping, not the passes, is
  the cost of a sweep; so problems (columns) whose every hook has converged leave the batch once they are half
  of it, and the last slow problems iterate alone.
* On small problems an iteration is dozens of element-wise passes over the ``[H, P, d + 1]`` state (each
  memory-bound, tens of microseconds) besides its two products, so the standardisation is folded once into per-problem
  factors (``1 / sigma``, ``mu / sigma``, times ``1 / sw``) and the gradient is written into its buffer in
  place.
* Accumulation is float32 (the kernel's), the L-BFGS state is float32; the stopping test (largest entry of
  the sample-averaged gradient <= ``tol``, as sklearn's lbfgs) uses gradients only.

Besides the optimiser, :func:`column_stats` (the standardisation statistics) and :func:`linear_scores`
(predictions) each read ``X`` once, in float32 chunks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import AnalysisError


@dataclass
class SolverResult:
    """Solution of ``H x P`` problems, in the solver's (standardised, projected) coordinates."""

    coef: Float[Tensor, "H P d"]
    intercept: Float[Tensor, "H P"]
    objective: Float[Tensor, "H P"]
    grad_max: Float[Tensor, "H P"]
    n_iter: Tensor  # [H, P] int64: accepted L-BFGS steps
    converged: Tensor  # [H, P] bool
    n_passes: int  # loss_grad calls (passes over X)

    def effective(
        self, mean: Tensor | None = None, scale: Tensor | None = None, proj: Tensor | None = None
    ) -> tuple[Float[Tensor, "H P d"], Float[Tensor, "H P"]]:
        """Raw-space weights and biases: ``logit = x . W' + b'`` for a raw activation ``x``."""
        return effective_weights(self.coef, self.intercept, mean, scale, proj)


def effective_weights(
    w: Float[Tensor, "H P d"],
    b: Float[Tensor, "H P"],
    mean: Tensor | None = None,
    scale: Tensor | None = None,
    proj: Tensor | None = None,
) -> tuple[Float[Tensor, "H P d"], Float[Tensor, "H P"]]:
    """Map solver coordinates to raw-space ``(W', b')``: ``W' = (w Pm) / sigma``, ``b' = b - mu . W'``."""
    v = w @ proj if proj is not None else w
    if scale is not None:
        v = v / scale
    bb = b - (v * mean).sum(-1) if mean is not None else b
    return v, bb


def _runs_of_values(v: Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, stop, value)`` of equal values in a 1-D integer tensor."""
    out: list[tuple[int, int, int]] = []
    for i, x in enumerate(v.tolist()):
        if out and out[-1][2] == x:
            out[-1] = (out[-1][0], i + 1, x)
        else:
            out.append((i, i + 1, x))
    return out


def _runs(mask: Tensor) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, stop)`` of True in a 1-D bool tensor."""
    out: list[tuple[int, int]] = []
    start = None
    for i, m in enumerate(mask.tolist()):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def fit_logistic(
    X: Float[Tensor, "H N d"],
    Y: Float[Tensor, "P N"],
    S: Float[Tensor, "P N"],
    C: float | Float[Tensor, " P"] = 1.0,
    *,
    mean: Float[Tensor, "H P d"] | None = None,
    scale: Float[Tensor, "H P d"] | None = None,
    proj: Float[Tensor, "d d"] | None = None,
    precond: Float[Tensor, "H d d"] | None = None,
    precond_rows: Float[Tensor, "H n d"] | None = None,
    max_iter: int = 500,
    tol: float = 1e-4,
    memory: int = 20,
    backend: str = "auto",
    loss_grad=None,
    reduce=None,
    progress: bool = False,
    desc: str = "probes",
    warn: bool = True,
) -> SolverResult:
    """Fit ``H x P`` L2-regularised logistic regressions at once with batched L-BFGS (see the module doc).

    ``X`` may be float16/bfloat16/float32 and lives on the device the work runs on; ``Y``/``S``/``C``/``mean``/
    ``scale``/``proj`` are moved there as float32. ``mean``/``scale`` broadcast against ``[H, P, d]``.
    ``precond``, each hook's feature covariance ``Sigma`` in solver coordinates (:func:`feature_covariance`,
    times ``Pm`` on both sides with a projection), makes the L-BFGS initial matrix the inverse Hessian of the
    objective at ``w = 0``: ``(Sigma / 4 + I / (C sw))^-1`` for the weights (one inverse per hook and value of
    C, with the median ``sw``) and 4 for the intercept. ``precond_rows`` ``Z`` instead gives ``Sigma = Z^T Z`` by
    ``n < d`` rows (:func:`feature_rows`): then one eigendecomposition per hook, of the ``n x n`` Gram matrix
    ``Z Z^T``, serves every value of C, and applying the initial matrix costs ``2 n d`` per vector.

    ``X`` may also be any object with ``shape``, ``device``, ``dim()`` and hook slicing (``X[lo:hi]``) that the
    given ``loss_grad`` reads (:mod:`interp.probes.streaming`: a store streamed in chunks). With ``reduce`` (a
    sum over processes, e.g. an all-reduce), ``Y``/``S`` hold this process's rows only and ``loss_grad`` returns
    the sums over every process's rows: the total sample weights are reduced here too, and every process then
    runs the same iterations to the same optimum.
    """
    if X.dim() != 3:
        raise AnalysisError(f"fit_logistic needs X of shape [H, N, d], got {list(X.shape)}")
    H, N, d = X.shape
    dev = X.device
    f32 = torch.float32
    Y = Y.to(dev, f32)
    S = S.to(dev, f32)
    P = Y.shape[0]
    if Y.shape != (P, N) or S.shape != (P, N):
        raise AnalysisError(f"targets {list(Y.shape)} and weights {list(S.shape)} must both be [P, N=[{N}]]")
    if loss_grad is None:
        from interp.probes.kernel import get_loss_grad

        loss_grad = get_loss_grad(backend, dev)
    sw = S.sum(-1)  # [P]
    if reduce is not None:
        sw = reduce(sw)
    if (sw <= 0).any():
        raise AnalysisError("a probe has no training rows (all sample weights are 0); check the labels and splits")
    Cv = torch.as_tensor(C, dtype=f32, device=dev).expand(P).clone()
    if (Cv <= 0).any():
        raise AnalysisError(f"C must be positive, got {Cv.tolist()}")
    lam = 1.0 / (Cv * sw)  # [P]: penalty weight of the averaged objective
    mean = None if mean is None else mean.to(dev, f32).expand(H, P, d)
    scale = None if scale is None else scale.to(dev, f32).expand(H, P, d)
    proj = None if proj is None else proj.to(dev, f32)
    inv_sw = (1.0 / sw)[None, :]  # [1, P]
    make_apply = None
    D = d + 1

    def curvature_pair(yv: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """``(y . H0 y, H0 q)``: the initial matrix's quadratic form on the new pairs' ``y`` (for ``gamma``) and
        its product with the recursion's vector ``q``."""
        Hy, Hq = apply_h0(torch.stack([yv, q]))
        return (yv * Hy).sum(-1), Hq

    if precond is not None or precond_rows is not None:
        c_values, group = torch.unique(Cv, return_inverse=True)  # one initial matrix per value of C
        G = c_values.numel()
        lam_g = torch.stack([lam[group == gi].median() for gi in range(G)])  # [G]
        if precond_rows is not None:
            # Sigma = Z^T Z of rank n < d, through its eigenvectors (one decomposition per hook serves every C):
            # Sigma = U diag(e) U^T with U = Z^T V e^-1/2 from the n x n Gram matrix Z Z^T = V diag(e) V^T, and
            # (Sigma / 4 + lam I)^-1 = (I - U diag(e / (e + 4 lam)) U^T) / lam
            Z = precond_rows.to(dev, f32)  # [H, n, d]
            e, V = torch.linalg.eigh(torch.bmm(Z, Z.transpose(1, 2)))
            kept = e > 1e-6 * e.amax(-1, keepdim=True).clamp_min(1e-30)  # numerically zero: outside the range
            U = torch.bmm(Z.transpose(1, 2), V) * (kept / e.clamp_min(1e-30).sqrt())[:, None, :]  # [H, d, n]
            Ut = U.transpose(1, 2).contiguous()
            shrink = e[:, None, :] / (e[:, None, :] + 4.0 * lam_g[None, :, None]) * kept[:, None, :]  # [H, G, n]

            def make_apply(group: Tensor):
                """``q -> q (Sigma / 4 + lam I)^-1`` on the weights of the problems whose values of C are ``group``."""
                Pc = group.numel()
                c_p, inv_lam = shrink[:, group], (1.0 / lam_g[group])[:, None]  # [H, Pc, n], [Pc, 1]

                def project(qw: Tensor) -> tuple[Tensor, Tensor]:
                    """``qw`` [L, H, Pc, d] as ``[H, L * Pc, d]`` and its coordinates on U, shrunk."""
                    L_ = qw.numel() // (H * Pc * d)
                    x = qw.reshape(L_, H, Pc, d).transpose(0, 1).reshape(H, L_ * Pc, d)
                    u = torch.bmm(x, U).reshape(H, L_, Pc, -1)
                    return x, u

                def apply_w(qw: Tensor) -> Tensor:
                    x, u = project(qw)
                    L_ = u.shape[1]
                    out = torch.baddbmm(x, (u * c_p[:, None]).reshape(H, L_ * Pc, -1), Ut, alpha=-1.0)
                    return (out.reshape(H, L_, Pc, d).transpose(0, 1) * inv_lam).reshape(qw.shape)

                def pair(yv: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
                    # y . H0 y = (|y_w|^2 - sum_j c_j (U^T y_w)_j^2) / lam + 4 y_b^2: y needs only the first product
                    x, u = project(torch.stack([yv[..., :d], q[..., :d]]))
                    uy, uq = u[:, 0], u[:, 1]  # [H, Pc, n]
                    yy = (yv[..., :d].square().sum(-1) - (c_p * uy.square()).sum(-1)) * inv_lam[:, 0]
                    yy = yy + 4.0 * yv[..., d].square()
                    hq = torch.baddbmm(x[:, Pc:], uq * c_p, Ut, alpha=-1.0) * inv_lam
                    return yy, torch.cat([hq, 4.0 * q[..., d:]], dim=-1)

                apply_w.pair = pair  # type: ignore[attr-defined]
                return apply_w

        else:
            cov = precond.to(dev, f32)  # type: ignore[union-attr]
            eye = torch.eye(d, device=dev, dtype=f32)
            inverses = torch.stack(
                [torch.cholesky_inverse(torch.linalg.cholesky(0.25 * cov + float(lam_g[gi]) * eye)) for gi in range(G)],
                1,
            )  # [H, G, d, d]

            def make_apply(group: Tensor):
                """``q -> q (Sigma / 4 + lam I)^-1`` on the weights of the problems whose values of C are ``group``."""
                Pc = group.numel()
                blocks = _runs_of_values(group)
                if len({hi - lo for lo, hi, _ in blocks}) == 1:
                    # contiguous blocks of problems of the same size (train_probes' layout: one block per value
                    # of C): one batched product for all problems, blocks as a batch dimension
                    gids = [gid for _, _, gid in blocks]
                    B, Pb = len(blocks), Pc // len(blocks)
                    inv_b = inverses[:, gids].contiguous()

                    def apply_w(qw: Tensor) -> Tensor:
                        L_ = qw.numel() // (H * Pc * d)
                        x = qw.reshape(L_, H, B, Pb, d).permute(1, 2, 0, 3, 4).reshape(H, B, L_ * Pb, d)
                        out = torch.matmul(x, inv_b)
                        return out.reshape(H, B, L_, Pb, d).permute(2, 0, 1, 3, 4).reshape(qw.shape)

                    return apply_w

                def apply_w(qw: Tensor) -> Tensor:
                    out = torch.empty_like(qw)
                    L_ = qw.numel() // (H * Pc * d)
                    q3, o3 = qw.reshape(L_, H, Pc, d), out.reshape(L_, H, Pc, d)
                    for gi in torch.unique(group).tolist():
                        m = group == gi
                        x = q3[:, :, m].permute(1, 0, 2, 3).reshape(H, -1, d)
                        y = torch.matmul(x, inverses[:, gi])
                        o3[:, :, m] = y.reshape(H, L_, -1, d).permute(1, 0, 2, 3)
                    return out

                return apply_w

        apply_w = make_apply(group)

        def apply_h0(q: Tensor) -> Tensor:
            """Inverse of the Hessian at w = 0 (the quadratic model) applied to ``q`` [..., H, P, d + 1]."""
            return torch.cat([apply_w(q[..., :d]), 4.0 * q[..., d:]], dim=-1)

        if precond_rows is not None:

            def curvature_pair(yv: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
                return apply_w.pair(yv, q)

    else:

        def apply_h0(q: Tensor) -> Tensor:
            return q

    identity_h0 = precond is None and precond_rows is None
    # the standardisation, folded into per-problem factors once: W' = (w Pm) / sigma, b' = b - (w Pm) . (mu / sigma),
    # and back by the chain rule, with the averaging's 1 / sw: dF/dw = (gW / sigma - gb mu / sigma) Pm / sw + lam w
    inv_scale = None if scale is None else 1.0 / scale  # an infinite scale (constant feature) gives weight 0
    mos = None if mean is None else (mean if inv_scale is None else mean * inv_scale)
    factors: dict[str, Tensor | None] = {}

    def set_factors() -> None:
        """The per-problem factors of :func:`evaluate` (again after columns leave the batch)."""
        inv_sw3 = inv_sw[..., None]
        factors["gw_scale"] = inv_sw3 if inv_scale is None else inv_scale * inv_sw3
        factors["gw_shift"] = None if mos is None else mos * inv_sw3
        factors["lam3"] = lam[None, :, None]
        factors["half_lam"] = 0.5 * lam[None, :]

    set_factors()

    def evaluate(theta: Tensor, hooks: Tensor, f: Tensor, g: Tensor) -> None:
        """Objective and gradient at ``theta`` for the hooks in ``hooks``; written into ``f``/``g`` in place."""
        gw_scale, gw_shift = factors["gw_scale"], factors["gw_shift"]
        for lo, hi in _runs(hooks):
            if hi - lo == H:  # every hook (the usual case): no slicing
                th, gg, ff, Xh, isc, mu, shift = theta, g, f, X, inv_scale, mean, gw_shift
            else:
                th, gg, ff, Xh = theta[lo:hi], g[lo:hi], f[lo:hi], X[lo:hi]
                isc, mu, shift = (None if t is None else t[lo:hi] for t in (inv_scale, mean, gw_shift))
            w, b = th[..., :d], th[..., d]
            wp = w @ proj if proj is not None else w
            Wp = wp * isc if isc is not None else wp.contiguous()
            bp = b - torch.linalg.vecdot(Wp, mu) if mu is not None else b.contiguous()  # Wp is contiguous
            loss, gW, gb = loss_grad(Xh, Wp, bp, Y, S)
            sc = gw_scale if gw_scale.shape[0] == 1 else gw_scale[lo:hi]
            gw = gg[..., :d]
            gv = torch.mul(gW, sc, out=gw) if proj is None else gW * sc
            if shift is not None:
                gv.addcmul_(gb.unsqueeze(-1), shift, value=-1.0)
            if proj is not None:
                gw.copy_(gv @ proj)
            gw.addcmul_(factors["lam3"], w)
            torch.mul(gb, inv_sw, out=gg[..., d])
            torch.addcmul(loss.mul_(inv_sw), factors["half_lam"], torch.linalg.vecdot(w, w), out=ff)

    theta = torch.zeros(H, P, D, device=dev, dtype=f32)
    f = torch.zeros(H, P, device=dev, dtype=f32)
    g = torch.zeros(H, P, D, device=dev, dtype=f32)
    all_hooks = torch.ones(H, dtype=torch.bool)
    evaluate(theta, all_hooks, f, g)
    n_passes = 1
    gmax = g.abs().amax(-1)
    active = gmax > tol
    n_iter = torch.zeros(H, P, dtype=torch.int64, device=dev)
    # (s, y) pairs in a ring of ``memory`` slots shared by all problems: a round in which a problem stores no
    # pair leaves rho = 0 in its part of the slot, a pair that does nothing in the two-loop recursion
    S_hist = torch.zeros(memory, H, P, D, device=dev, dtype=f32)
    Y_hist = torch.zeros_like(S_hist)
    rho = torch.zeros(memory, H, P, device=dev, dtype=f32)
    slots = list(zip(S_hist, Y_hist, rho))  # per-slot views, so that the recursion indexes no tensor
    slot, filled = 0, 0  # next slot to write, slots written so far (at most memory)
    gamma = torch.ones(H, P, device=dev, dtype=f32)  # scale of the initial matrix: s.y / y.H0 y of the last pair
    has_hist = torch.zeros(H, P, dtype=torch.bool, device=dev)
    gnorm = g.norm(dim=-1).clamp_min(1e-12)
    direction = -apply_h0(g)
    alpha = torch.ones_like(gnorm) if not identity_h0 else (1.0 / gnorm).clamp(max=1.0)
    dphi0 = torch.linalg.vecdot(g, direction)
    fails = torch.zeros(H, P, dtype=torch.int64, device=dev)
    stalled = torch.zeros(H, P, dtype=torch.bool, device=dev)
    f_t = f.clone()
    g_t = g.clone()

    def forget(which: Tensor) -> None:
        """Drop the quasi-Newton memory of the problems in ``which``."""
        nonlocal gamma, has_hist
        rho.mul_(~which)
        gamma = torch.where(which, torch.ones_like(gamma), gamma)
        has_hist = has_hist & ~which

    def first_alpha() -> Tensor:
        """Step length of a step from the initial matrix alone: 1 preconditioned, else ``1 / |g|``."""
        return torch.ones_like(alpha) if not identity_h0 else 1.0 / g.norm(dim=-1).clamp_min(1e-12)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc=desc, leave=False)
    last_max_iter = 0
    max_passes = 4 * max_iter + 20
    # results per original problem; columns (problems) whose every hook has converged leave the batch once
    # they are half of it, so that the last, slow problems do not carry the bookkeeping of the finished ones
    cols = torch.arange(P, device=dev)
    done = {"theta": theta.clone(), "f": f.clone(), "gmax": gmax.clone(), "n_iter": n_iter.clone(),
            "stalled": stalled.clone()}

    def settle(which: Tensor) -> None:
        """Write the state of the batch columns ``which`` into the results."""
        for name, t in (("theta", theta), ("f", f), ("gmax", gmax), ("n_iter", n_iter), ("stalled", stalled)):
            done[name][:, cols[which]] = t[:, which]

    while bool(active.any()) and n_passes < max_passes:
        live = active.any(0)
        n_live = int(live.sum())
        if n_live <= cols.numel() // 2:
            settle(~live)
            k = torch.nonzero(live).flatten()
            cols = cols[k]
            theta, f, g, f_t, g_t, gmax, active, n_iter, gamma, has_hist, direction, alpha, dphi0, fails, stalled = (
                t[:, k] for t in (theta, f, g, f_t, g_t, gmax, active, n_iter, gamma, has_hist, direction, alpha,
                                  dphi0, fails, stalled)
            )
            S_hist, Y_hist, rho = S_hist[:, :, k], Y_hist[:, :, k], rho[:, :, k]
            slots = list(zip(S_hist, Y_hist, rho))
            Y, S, lam, inv_sw = Y[k], S[k], lam[k], inv_sw[:, k]
            inv_scale = None if inv_scale is None else inv_scale[:, k]
            mean = None if mean is None else mean[:, k]
            mos = None if mos is None else mos[:, k]
            set_factors()
            if make_apply is not None:
                group = group[k]
                apply_w = make_apply(group)
        a_step = alpha * active
        step = a_step[..., None] * direction
        trial = theta + step
        hooks = active.any(dim=1).cpu()
        evaluate(trial, hooks, f_t, g_t)
        n_passes += 1
        dphi_t = torch.linalg.vecdot(g_t, direction)
        armijo = f_t <= torch.addcmul(f, alpha, dphi0, value=1e-4)
        accept = active & (armijo | (dphi_t <= 0))
        reject = active & ~accept
        n_accept = int(accept.sum())

        if n_accept:
            every = n_accept == accept.numel()
            s = step
            yv = g_t - g
            sy = torch.linalg.vecdot(s, yv)
            yy = torch.linalg.vecdot(yv, yv)
            good = accept & (sy > 1e-10 * (torch.linalg.vecdot(s, s) * yy).sqrt()) & (sy > 0)
            stored = bool(good.any())
            if stored:
                gm = good[..., None]
                torch.mul(s, gm, out=S_hist[slot])
                torch.mul(yv, gm, out=Y_hist[slot])
                torch.div(good, sy.clamp_min(1e-30), out=rho[slot])
                slot, filled = (slot + 1) % memory, min(filled + 1, memory)
            am = accept[..., None]
            if every:  # the usual case: take the trial state, swap the buffers evaluate writes into
                theta, f, g, f_t, g_t = trial, f_t, g_t, f, g
                fails.zero_()
                gmax = g.abs().amax(-1)
            else:
                theta = torch.where(am, trial, theta)
                f = torch.where(accept, f_t, f)
                g = torch.where(am, g_t, g)
                fails = torch.where(accept, torch.zeros_like(fails), fails)
                gmax = torch.where(accept, g.abs().amax(-1), gmax)
            n_iter += accept
            active = active & ~(accept & (gmax <= tol)) & (n_iter < max_iter)
            # new quasi-Newton direction: two-loop recursion over the written slots, newest first
            order = [(slot - 1 - i) % memory for i in range(filled)]
            q = g.clone()
            a = []
            for i in order:
                s_i, y_i, rho_i = slots[i]
                if stored and not a:  # the pair just stored: s . g = a_step (direction . g_t), a dot known
                    ai = (a_step * dphi_t).mul_(rho_i).unsqueeze_(-1)
                else:
                    ai = torch.linalg.vecdot(s_i, q).mul_(rho_i).unsqueeze_(-1)
                q.addcmul_(ai, y_i, value=-1.0)
                a.append(ai)
            if stored:  # H0 on q and, for gamma, on the new pairs' y: one product
                yHy, r = (yy, q) if identity_h0 else curvature_pair(yv, q)
                gamma = torch.where(good, sy / yHy.clamp_min(1e-30), gamma)
                has_hist = has_hist | good
            else:
                r = apply_h0(q)
            r.mul_(gamma[..., None])
            for i, ai in zip(reversed(order), reversed(a)):
                s_i, y_i, rho_i = slots[i]
                beta = torch.linalg.vecdot(y_i, r).mul_(rho_i).unsqueeze_(-1)
                r.addcmul_(ai.sub_(beta), s_i)
            new_dir = r.neg_()
            new_dphi = torch.linalg.vecdot(g, new_dir)
            bad = new_dphi >= 0  # not a descent direction (numerical trouble): restart from the initial matrix
            fixed = bool((accept & bad).any())
            if fixed:
                new_dir = torch.where(bad[..., None], -apply_h0(g), new_dir)
                forget(accept & bad)
                new_dphi = torch.linalg.vecdot(g, new_dir)
            restarted = ~has_hist | bad
            new_alpha = torch.where(restarted, first_alpha(), 1.0) if bool(restarted.any()) else torch.ones_like(alpha)
            if every:
                direction, alpha, dphi0 = new_dir, new_alpha, new_dphi
            else:
                direction = torch.where(am, new_dir, direction)
                alpha = torch.where(accept, new_alpha, alpha)
                dphi0 = torch.where(accept, new_dphi, dphi0)

        if bool(reject.any()):
            # secant on the directional derivative: the minimiser of the quadratic through phi'(0) and phi'(a)
            denom = (dphi_t - dphi0).clamp_min(1e-30)
            ratio = (-dphi0 / denom).clamp(0.05, 0.9)
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 0.5))
            alpha = torch.where(reject, alpha * ratio, alpha)
            fails = fails + reject.long()
            restart = reject & (fails == 25)
            if bool(restart.any()):  # the quasi-Newton model is useless here: forget it, go steepest descent
                forget(restart)
                direction = torch.where(restart[..., None], -g, direction)
                alpha = torch.where(restart, 1.0 / g.norm(dim=-1).clamp_min(1e-12), alpha)
                dphi0 = torch.where(restart, (g * direction).sum(-1), dphi0)
            give_up = reject & (fails >= 60)
            stalled |= give_up
            active = active & ~give_up
        if bar is not None:
            m = int(n_iter.max())
            bar.update(m - last_max_iter)
            last_max_iter = m
            bar.set_postfix(active=int(active.sum()), passes=n_passes)
    if bar is not None:
        bar.close()
    settle(torch.ones(cols.numel(), dtype=torch.bool, device=dev))
    theta, f, gmax, n_iter, stalled = (done[k] for k in ("theta", "f", "gmax", "n_iter", "stalled"))
    converged = gmax <= tol
    # a stalled line search at float32 precision with a tiny gradient is as good as it gets
    converged |= stalled & (gmax <= 100 * tol)
    if warn and not bool(converged.all()):
        n_bad = int((~converged).sum())
        warnings.warn(
            f"{n_bad} of {H * P} probes did not reach tol={tol} in max_iter={max_iter} iterations "
            f"(largest gradient {float(gmax.max()):.2e}); raise max_iter or lower C",
            RuntimeWarning,
            stacklevel=2,
        )
    return SolverResult(
        coef=theta[..., :d].contiguous(),
        intercept=theta[..., d].contiguous(),
        objective=f,
        grad_max=gmax,
        n_iter=n_iter,
        converged=converged,
        n_passes=n_passes,
    )


def column_stats(
    X: Float[Tensor, "H N d"], S: Float[Tensor, "P N"], chunk: int = 8192, constant_scale: float = 1.0
) -> tuple[Float[Tensor, "H P d"], Float[Tensor, "H P d"]]:
    """Weighted per-feature mean and standard deviation of every hook for every weight row ``S[p]``.

    One chunked pass over ``X`` (each chunk upcast to float32, never the whole matrix). A feature is
    (numerically) constant when its standard deviation is at most ``1e-5`` times its own mean or ``1e-6``
    times the hook's typical feature scale (the median over features of ``sqrt(E[x^2])``): residual-stream
    features that never vary still jitter at the float32 rounding level of the computation that made them
    (~1e-9 on a stream of scale ~0.3), and standardising that jitter would make it a feature like any other.
    Such a feature's standard deviation is reported as ``constant_scale``: 1 leaves it unscaled (as
    scikit-learn's ``StandardScaler``); ``math.inf`` makes its standardised value 0, so a probe gives it
    weight exactly 0. Statistics that overflow float32 (or come from NaN/inf activations) are NaN.
    """
    H, N, d = X.shape
    S = S.to(X.device, torch.float32)
    # accumulate around a shift (the first rows' mean) so that E[x^2] - E[x]^2 does not cancel in float32
    shift = X[:, : min(N, 1024)].float().mean(1, keepdim=True)  # [H, 1, d]
    s1 = torch.zeros(H, S.shape[0], d, device=X.device)
    s2 = torch.zeros_like(s1)
    for lo in range(0, N, chunk):
        shifted_moments(X[:, lo : lo + chunk], S[:, lo : lo + chunk], shift, s1, s2)
    return stats_from_moments(s1, s2, S.sum(-1), shift, constant_scale)


def shifted_moments(X: Float[Tensor, "H n d"], S: Float[Tensor, "P n"], shift: Tensor, s1: Tensor, s2: Tensor) -> None:
    """Add the weighted sums of ``x - shift`` and ``(x - shift)^2`` over the rows of ``X`` into ``s1``/``s2``."""
    xc = X.float() - shift
    s1 += torch.matmul(S, xc)  # S broadcast over the hooks: one batched product (einsum took 4x as long)
    s2 += torch.matmul(S, xc.square_())


def stats_from_moments(
    s1: Tensor, s2: Tensor, sw: Float[Tensor, " P"], shift: Tensor, constant_scale: float
) -> tuple[Float[Tensor, "H P d"], Float[Tensor, "H P d"]]:
    """:func:`column_stats`' mean and standard deviation from the shifted moment sums and total weights."""
    sw = sw[None, :, None].clamp_min(1e-12)
    m1 = s1 / sw
    var = (s2 / sw - m1 * m1).clamp_min(0.0)
    mean = m1 + shift
    typical = (var + mean * mean).median(-1, keepdim=True).values  # [H, P, 1]: the median feature's E[x^2]
    tiny = (var <= 1e-10 * mean * mean) | (var <= 1e-12 * typical) | (var == 0)
    std = torch.where(tiny, torch.full_like(var, constant_scale), var.sqrt())
    ok = torch.isfinite(var) & torch.isfinite(mean)
    return mean, torch.where(ok, std, torch.full_like(std, math.nan))


def linear_scores(
    X: Float[Tensor, "H N d"], W: Float[Tensor, "H P d"], b: Float[Tensor, "H P"], chunk: int = 8192
) -> Float[Tensor, "H P N"]:
    """Logits ``X[h] . W[h, p] + b[h, p]`` for every row, in one chunked float32 pass over ``X``."""
    H, N, d = X.shape
    out = torch.empty(H, W.shape[1], N, device=X.device, dtype=torch.float32)
    W = W.to(X.device, torch.float32)
    for lo in range(0, N, chunk):
        out[:, :, lo : lo + chunk] = torch.einsum("hnd,hpd->hpn", X[:, lo : lo + chunk].float(), W)
    return out + b.to(X.device, torch.float32)[..., None]


def feature_covariance(
    X: Float[Tensor, "H N d"],
    weights: Float[Tensor, " N"],
    mean: Float[Tensor, "H d"],
    scale: Tensor,
    max_rows: int = 4096,
    chunk: int = 4096,
) -> Float[Tensor, "H d d"]:
    """Each hook's covariance of the standardised features ``(x - mean) / scale``, for the preconditioner.

    The preconditioner needs only an estimate: at most ``max_rows`` evenly spaced rows with non-zero weight are
    read, in float32 chunks (``X`` is not copied whole).
    """
    H, N, d = X.shape
    rows = covariance_rows(weights, max_rows).to(X.device)
    cov = torch.zeros(H, d, d, device=X.device)
    for lo in range(0, rows.numel(), chunk):
        xc = _standardised(X, rows[lo : lo + chunk], mean, scale)
        cov += torch.bmm(xc.transpose(1, 2), xc)
    return cov / max(1, rows.numel())


def _standardised(X: Tensor, rows: Tensor, mean: Tensor, scale: Tensor) -> Float[Tensor, "H n d"]:
    """``(X[:, rows] - mean) / scale`` in float32 (``mean``/``scale`` per hook, any shape ending in ``d``)."""
    H, _, d = X.shape
    return (X[:, rows].float() - mean.reshape(H, 1, d).to(X.device)) / scale.reshape(H, 1, -1).to(X.device, torch.float32)


def feature_rows(
    X: Float[Tensor, "H N d"],
    weights: Float[Tensor, " N"],
    mean: Float[Tensor, "H d"],
    scale: Tensor,
    max_rows: int = 4096,
) -> Float[Tensor, "H n d"] | None:
    """The rows ``Z`` with ``Z^T Z`` = :func:`feature_covariance`'s estimate, when they are fewer than ``d``
    (then the preconditioner is cheaper through them); None otherwise."""
    H, N, d = X.shape
    rows = covariance_rows(weights, max_rows)
    if rows.numel() >= d:
        return None
    return _standardised(X, rows.to(X.device), mean, scale) / math.sqrt(max(1, rows.numel()))


def covariance_rows(weights: Tensor, max_rows: int) -> Tensor:
    """At most ``max_rows`` evenly spaced rows with non-zero weight."""
    rows = torch.nonzero(weights.to("cpu") > 0).flatten()
    if rows.numel() > max_rows:
        rows = rows[torch.linspace(0, rows.numel() - 1, max_rows).round().long()]
    return rows


def precondition_worthwhile(H: int, d: int, n_rows: int, n_groups: int, device: torch.device) -> bool:
    """Whether the covariance estimate and ``d x d`` inverses cost little next to the passes they save.

    Memory for the inverses (``H x groups x d x d`` float32) at most 256 MiB; on CPU the covariance at most
    ~4e10 flops (about a second on two cores).
    """
    if H * n_groups * d * d * 4 > 256 * 2**20:
        return False
    flops = 2.0 * H * min(n_rows, 4096) * d * d
    return device.type != "cpu" or flops <= 4e10
