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
* Memory ``m = 20`` pairs (sklearn/scipy use 10): the two-loop recursion is cheap next to a pass.
* Accumulation is float32 (the kernel's), the L-BFGS state is float32; the stopping test (largest entry of
  the sample-averaged gradient <= ``tol``, as sklearn's lbfgs) uses gradients only.

Besides the optimiser, :func:`column_stats` (the standardisation statistics) and :func:`linear_scores`
(predictions) each read ``X`` once, in float32 chunks.
"""

from __future__ import annotations

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
    max_iter: int = 500,
    tol: float = 1e-4,
    memory: int = 20,
    backend: str = "auto",
    loss_grad=None,
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
    C, with the median ``sw``) and 4 for the intercept.
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
    if precond is not None:
        cov = precond.to(dev, f32)
        c_values, group = torch.unique(Cv, return_inverse=True)  # one inverse per value of C
        eye = torch.eye(d, device=dev, dtype=f32)
        inverses = []
        for gi in range(c_values.numel()):
            lam_g = float(lam[group == gi].median())
            L = torch.linalg.cholesky(0.25 * cov + lam_g * eye)
            inverses.append(torch.cholesky_inverse(L))
        Minv = torch.stack(inverses, 1)  # [H, G, d, d]
        single = c_values.numel() == 1

        def apply_h0(q: Tensor) -> Tensor:
            """Inverse of the Hessian at w = 0 (the quadratic model) applied to ``q`` [H, P, d + 1]."""
            qw = q[..., :d]
            if single:
                out = torch.bmm(qw, Minv[:, 0])
            else:
                out = torch.empty_like(qw)
                for gi in range(c_values.numel()):
                    m = group == gi
                    out[:, m] = torch.bmm(qw[:, m], Minv[:, gi])
            return torch.cat([out, 4.0 * q[..., d:]], dim=-1)

    else:

        def apply_h0(q: Tensor) -> Tensor:
            return q

    def evaluate(theta: Tensor, hooks: Tensor, f: Tensor, g: Tensor) -> None:
        """Objective and gradient at ``theta`` for the hooks in ``hooks``; written into ``f``/``g`` in place."""
        for lo, hi in _runs(hooks):
            w, b = theta[lo:hi, :, :d], theta[lo:hi, :, d]
            mu = None if mean is None else mean[lo:hi]
            sg = None if scale is None else scale[lo:hi]
            Wp, bp = effective_weights(w, b, mu, sg, proj)
            loss, gW, gb = loss_grad(X[lo:hi], Wp.contiguous(), bp.contiguous(), Y, S)
            gv = gW - gb[..., None] * mu if mu is not None else gW
            if sg is not None:
                gv = gv / sg
            if proj is not None:
                gv = gv @ proj
            f[lo:hi] = loss * inv_sw + 0.5 * lam * (w * w).sum(-1)
            g[lo:hi, :, :d] = gv * inv_sw[..., None] + lam[None, :, None] * w
            g[lo:hi, :, d] = gb * inv_sw

    D = d + 1
    theta = torch.zeros(H, P, D, device=dev, dtype=f32)
    f = torch.zeros(H, P, device=dev, dtype=f32)
    g = torch.zeros(H, P, D, device=dev, dtype=f32)
    all_hooks = torch.ones(H, dtype=torch.bool)
    evaluate(theta, all_hooks, f, g)
    n_passes = 1
    gmax = g.abs().amax(-1)
    active = gmax > tol
    n_iter = torch.zeros(H, P, dtype=torch.int64, device=dev)
    S_hist = torch.zeros(memory, H, P, D, device=dev, dtype=f32)
    Y_hist = torch.zeros_like(S_hist)
    rho = torch.zeros(memory, H, P, device=dev, dtype=f32)
    gnorm = g.norm(dim=-1).clamp_min(1e-12)
    direction = -apply_h0(g)
    alpha = torch.ones_like(gnorm) if precond is not None else (1.0 / gnorm).clamp(max=1.0)
    dphi0 = (g * direction).sum(-1)
    fails = torch.zeros(H, P, dtype=torch.int64, device=dev)
    stalled = torch.zeros(H, P, dtype=torch.bool, device=dev)
    f_t = f.clone()
    g_t = g.clone()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc=desc, leave=False)
    last_max_iter = 0
    max_passes = 4 * max_iter + 20
    while bool(active.any()) and n_passes < max_passes:
        step = torch.where(active, alpha, torch.zeros_like(alpha))[..., None] * direction
        trial = theta + step
        hooks = active.any(dim=1).cpu()
        evaluate(trial, hooks, f_t, g_t)
        n_passes += 1
        dphi_t = (g_t * direction).sum(-1)
        armijo = f_t <= f + 1e-4 * alpha * dphi0
        accept = active & (armijo | (dphi_t <= 0))
        reject = active & ~accept

        if bool(accept.any()):
            s = step
            yv = g_t - g
            sy = (s * yv).sum(-1)
            good = accept & (sy > 1e-10 * s.norm(dim=-1) * yv.norm(dim=-1)) & (sy > 0)
            if bool(good.any()):
                gm = good[None, ..., None]
                S_hist = torch.where(gm, torch.cat([S_hist[1:], s[None]]), S_hist)
                Y_hist = torch.where(gm, torch.cat([Y_hist[1:], yv[None]]), Y_hist)
                rho = torch.where(good[None], torch.cat([rho[1:], (1.0 / sy.clamp_min(1e-30))[None]]), rho)
            am = accept[..., None]
            theta = torch.where(am, trial, theta)
            f = torch.where(accept, f_t, f)
            g = torch.where(am, g_t, g)
            n_iter += accept.long()
            fails = torch.where(accept, torch.zeros_like(fails), fails)
            gmax = torch.where(accept, g.abs().amax(-1), gmax)
            active = active & ~(accept & (gmax <= tol)) & (n_iter < max_iter)
            # new quasi-Newton direction (two-loop recursion; empty slots have rho = 0 and do nothing)
            q = g.clone()
            a = torch.zeros(memory, H, P, device=dev, dtype=f32)
            for i in range(memory - 1, -1, -1):
                a[i] = rho[i] * (S_hist[i] * q).sum(-1)
                q = q - a[i][..., None] * Y_hist[i]
            ys, yy = 1.0 / rho[-1].clamp_min(1e-30), (Y_hist[-1] * apply_h0(Y_hist[-1])).sum(-1)
            has_hist = rho[-1] > 0
            gamma = torch.where(has_hist, ys / yy.clamp_min(1e-30), torch.ones_like(ys))
            r = gamma[..., None] * apply_h0(q)
            for i in range(memory):
                beta = rho[i] * (Y_hist[i] * r).sum(-1)
                r = r + (a[i] - beta)[..., None] * S_hist[i]
            new_dir = -r
            new_dphi = (g * new_dir).sum(-1)
            bad = new_dphi >= 0  # not a descent direction (numerical trouble): restart from the initial matrix
            new_dir = torch.where(bad[..., None], -apply_h0(g), new_dir)
            first = torch.ones_like(alpha) if precond is not None else 1.0 / g.norm(dim=-1).clamp_min(1e-12)
            new_alpha = torch.where(has_hist & ~bad, torch.ones_like(alpha), first)
            if bool((accept & bad).any()):
                keep = ~(accept & bad)
                rho = rho * keep[None]
            direction = torch.where(am, new_dir, direction)
            alpha = torch.where(accept, new_alpha, alpha)
            dphi0 = torch.where(accept, (g * direction).sum(-1), dphi0)

        if bool(reject.any()):
            # secant on the directional derivative: the minimiser of the quadratic through phi'(0) and phi'(a)
            denom = (dphi_t - dphi0).clamp_min(1e-30)
            ratio = (-dphi0 / denom).clamp(0.05, 0.9)
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 0.5))
            alpha = torch.where(reject, alpha * ratio, alpha)
            fails = fails + reject.long()
            restart = reject & (fails == 25)
            if bool(restart.any()):  # the quasi-Newton model is useless here: forget it, go steepest descent
                rho = rho * (~restart)[None]
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
    X: Float[Tensor, "H N d"], S: Float[Tensor, "P N"], chunk: int = 8192
) -> tuple[Float[Tensor, "H P d"], Float[Tensor, "H P d"]]:
    """Weighted per-feature mean and standard deviation of every hook for every weight row ``S[p]``.

    One chunked pass over ``X`` (each chunk upcast to float32, never the whole matrix). Features with
    (near-)zero variance get a standard deviation of 1, as scikit-learn's ``StandardScaler`` does.
    """
    H, N, d = X.shape
    S = S.to(X.device, torch.float32)
    # accumulate around a shift (the first rows' mean) so that E[x^2] - E[x]^2 does not cancel in float32
    shift = X[:, : min(N, 1024)].float().mean(1, keepdim=True)  # [H, 1, d]
    s1 = torch.zeros(H, S.shape[0], d, device=X.device)
    s2 = torch.zeros_like(s1)
    for lo in range(0, N, chunk):
        xc = X[:, lo : lo + chunk].float() - shift
        sc = S[:, lo : lo + chunk]
        s1 += torch.einsum("pn,hnd->hpd", sc, xc)
        s2 += torch.einsum("pn,hnd->hpd", sc, xc * xc)
    sw = S.sum(-1)[None, :, None].clamp_min(1e-12)
    m1 = s1 / sw
    var = (s2 / sw - m1 * m1).clamp_min(0.0)
    mean = m1 + shift
    # constant features (variance at the float32 rounding level of the values) are left unscaled
    tiny = var <= 1e-10 * (mean * mean).clamp_min(1e-30)
    tiny |= var == 0
    std = torch.where(tiny, torch.ones_like(var), var.sqrt())
    return mean, std


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
    rows = torch.nonzero(weights.to("cpu") > 0).flatten()
    if rows.numel() > max_rows:
        rows = rows[torch.linspace(0, rows.numel() - 1, max_rows).round().long()]
    rows = rows.to(X.device)
    cov = torch.zeros(H, d, d, device=X.device)
    scale = scale.reshape(H, 1, -1).to(X.device, torch.float32)
    for lo in range(0, rows.numel(), chunk):
        xc = (X[:, rows[lo : lo + chunk]].float() - mean.reshape(H, 1, d).to(X.device)) / scale
        cov += torch.bmm(xc.transpose(1, 2), xc)
    return cov / max(1, rows.numel())


def precondition_worthwhile(H: int, d: int, n_rows: int, n_groups: int, device: torch.device) -> bool:
    """Whether the covariance estimate and ``d x d`` inverses cost little next to the passes they save.

    Memory for the inverses (``H x groups x d x d`` float32) at most 256 MiB; on CPU the covariance at most
    ~4e10 flops (about a second on two cores).
    """
    if H * n_groups * d * d * 4 > 256 * 2**20:
        return False
    flops = 2.0 * H * min(n_rows, 4096) * d * d
    return device.type != "cpu" or flops <= 4e10
