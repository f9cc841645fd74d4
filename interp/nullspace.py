"""Iterative nullspace projection (INLP, Ravfogel et al., 2020): find and remove every linear trace of a label.

Repeat: fit a logistic classifier of the label on the (projected) activations, score it on held-out rows; if
its accuracy is still more than ``margin`` above the majority-class rate, project its weight vector(s) out of
the activations and go on, else stop. The result holds the directions found, the projection ``P`` onto the
intersection of their nullspaces (``P = I - B^T B`` with ``B`` an orthonormal basis of the directions; so
``P @ P = P``, ``P = P^T`` and ``w @ P = 0`` for every classifier weight ``w`` found) and the held-out accuracy
of the classifier of every iteration.

Each classifier is fit by the batched L-BFGS solver on ``((x - mean) / s) P`` without ever forming it: the
projection and the centring enter only through the effective weights. Its tolerance defaults to 1e-6, not
scikit-learn's 1e-4: the directions of later rounds depend on every earlier round's weights, and at 1e-4
they stop being reproducible after a few rounds (bench/probes.py shows this against scikit-learn).
``s`` is one global scale (the root mean feature variance of the training rows), not a per-feature one, so
that standardising commutes with projections and the L2 penalty is the same in every direction. Multi-class
labels: each iteration removes all one-vs-rest weight vectors at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import load_json as _load_json
from interp.artifacts import load_tensors as _load_tensors
from interp.artifacts import save_tensors as _save_tensors
from interp.devices import resolve_device
from interp.errors import AnalysisError, ConfigError
from interp.probes.linear import (
    FORMAT_VERSION,
    _open,
    check_finite,
    labelled_rows,
    split_rows,
    store_provenance,
    use_preconditioner,
)
from interp.probes.solver import column_stats, effective_weights, feature_covariance, fit_logistic, linear_scores
from interp.store import ActivationStore, StoreWriter, atomic_write_json, layer_of

INLP_FORMAT = "interp.inlp"


@dataclass
class INLPResult:
    """Directions removed by INLP, the projection that removes them, and the accuracy curve.

    ``accuracies[i]`` is the held-out accuracy of the classifier fit after ``i`` rounds of removal (so
    ``accuracies[0]`` is the plain probe, and the last entry, when ``reached_chance``, is the first classifier
    within ``margin`` of ``majority``); ``removed[i]`` is how many directions had been removed before that fit.
    ``directions`` are orthonormal unit rows in the order found.
    """

    hook: str
    label: str
    directions: Float[Tensor, "k d"]
    projection: Float[Tensor, "d d"]
    accuracies: list[float]
    majority: float
    margin: float | None
    mean: Float[Tensor, " d"]
    classes: list[Any] = field(default_factory=list)
    reached_chance: bool = False
    removed: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_directions(self) -> int:
        return int(self.directions.shape[0])

    @property
    def layer(self) -> int | None:
        return layer_of(self.hook)

    @property
    def basis(self) -> Float[Tensor, "k d"]:
        """An orthonormal basis of the removed subspace."""
        if self.n_directions == 0:
            return self.directions
        q, _ = torch.linalg.qr(self.directions.double().T)
        return q.T.float()

    def __repr__(self) -> str:
        acc = ", ".join(f"{a:.3f}" for a in self.accuracies)
        return (
            f"INLPResult(hook={self.hook!r}, directions={self.n_directions}, accuracies=[{acc}], "
            f"majority={self.majority:.3f})"
        )

    # ---- applying the projection
    def apply(self, acts: Float[Tensor, "... d"], center: bool = True) -> Float[Tensor, "... d"]:
        """Remove the directions from activations (any leading shape), in float32.

        ``center=True`` (default) projects around the training mean, ``x -> (x - mean) P + mean``: the removed
        components are set to their mean value rather than to 0, which keeps the activations in range for a
        model; ``center=False`` applies the linear ``x -> x P``.
        """
        a = torch.as_tensor(acts)
        if a.shape[-1] != self.projection.shape[0]:
            raise AnalysisError(f"activations have d_model {a.shape[-1]}, the projection is {self.projection.shape[0]}")
        P = self.projection.to(a.device)
        x = a.float()
        if not center:
            return x @ P
        mu = self.mean.to(a.device)
        return (x - mu) @ P + mu

    def hook_fn(self, center: bool = True) -> Callable[..., Tensor]:
        """A TransformerLens-style hook ``fn(activation, hook=None)`` that removes the directions live.

        The result keeps the activation's dtype and device: ``model.add_hook(result.hook, result.hook_fn())``.
        """

        def fn(activation: Tensor, hook: Any = None) -> Tensor:
            return self.apply(activation, center=center).to(activation.dtype)

        return fn

    def apply_to_store(
        self,
        store: ActivationStore | str | os.PathLike,
        path: str | os.PathLike,
        center: bool = True,
        batch_size: int = 8192,
        progress: bool = True,
    ) -> ActivationStore:
        """Write a new store at ``path`` holding this hook's activations with the directions removed.

        Examples, positions, token ids and token labels are copied; only the INLP hook is written.
        """
        store = _open(store)
        hook = store.resolve_hook(self.hook)
        if store.d_model != self.projection.shape[0]:
            raise AnalysisError(
                f"store d_model {store.d_model} differs from the projection's {self.projection.shape[0]}"
            )
        m = store.manifest
        has_tl = bool(m.get("has_token_labels"))
        examples = store.examples()
        counts = torch.bincount(store.example_ids(), minlength=store.n_examples).tolist()
        dataset = dict(m.get("dataset", {}))
        dataset["inlp"] = {"source_store": str(store.path), "hook": hook, "label": self.label,
                           "directions_removed": self.n_directions, "center": center}
        writer = StoreWriter(
            path, hooks=[hook], d_model=store.d_model, dtype=store.dtype_name, model=store.model_info,
            positions=store.positions, dataset=dataset, has_token_labels=has_tl, resume=False,
        )
        pend: dict[str, list[Tensor]] = {
            "acts": [torch.empty(0, store.d_model)],
            "position": [torch.empty(0, dtype=torch.int32)],
            "token_id": [torch.empty(0, dtype=torch.int32)],
            "token_label": [torch.empty(0, dtype=torch.int8)],
        }
        n_pend = 0
        e = 0
        batches = store.iter_batches(hook, batch_size=batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(store) // batch_size), desc="projecting store", leave=False)
        with writer:
            def emit_ready() -> None:
                nonlocal e, n_pend
                cat = {k: torch.cat(v) if v else None for k, v in pend.items()}
                off = 0
                while e < len(counts) and counts[e] <= n_pend - off:
                    sl = slice(off, off + counts[e])
                    writer.add_example(
                        examples[e],
                        {hook: cat["acts"][sl]},
                        cat["position"][sl],
                        cat["token_id"][sl],
                        cat["token_label"][sl] if has_tl else None,
                    )
                    off += counts[e]
                    e += 1
                for k in pend:
                    pend[k] = [cat[k][off:]] if cat[k] is not None else []
                n_pend -= off

            emit_ready()
            for batch in batches:
                pend["acts"].append(self.apply(batch.acts[hook], center=center))
                pend["position"].append(batch.position)
                pend["token_id"].append(batch.token_id)
                if has_tl:
                    pend["token_label"].append(batch.token_label)
                n_pend += int(batch.rows.numel())
                emit_ready()
        return ActivationStore(path)

    # ---- figures, save, load
    def plot(self, title: str | None = None):
        """Plotly figure of the held-out accuracy per iteration (Wilson 95% intervals over the held-out rows)
        against the majority-class rate."""
        from interp import plots

        src = plots.source_text(self.provenance)
        where = ", ".join(src[k] for k in ("model", "dataset") if src[k])
        default = f"INLP: removing '{self.label}' at {self.hook}" + (f" ({where})" if where else "")
        return plots.inlp_accuracy_figure(
            self.accuracies, self.majority, self.margin, title=title or default,
            n_test=self.config.get("n_test"), removed=self.removed or None,
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``inlp.safetensors`` (directions, projection, mean) and ``inlp.json`` (curve, settings, provenance)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _save_tensors(
            d / "inlp.safetensors", {"directions": self.directions, "projection": self.projection, "mean": self.mean}
        )
        meta = {
            "format": INLP_FORMAT,
            "version": FORMAT_VERSION,
            "hook": self.hook,
            "layer": self.layer,
            "label": self.label,
            "classes": self.classes,
            "n_directions": self.n_directions,
            "accuracies": self.accuracies,
            "majority": self.majority,
            "margin": self.margin,
            "reached_chance": self.reached_chance,
            "removed": self.removed,
            "config": self.config,
            "provenance": self.provenance,
        }
        atomic_write_json(d / "inlp.json", _jsonable(meta))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> INLPResult:
        """Read a result written by :meth:`save` (safetensors + JSON only)."""
        d = Path(directory)
        meta = _load_json(d / "inlp.json", INLP_FORMAT, FORMAT_VERSION, "INLP result")
        t = _load_tensors(d / "inlp.safetensors", "INLP result")
        missing = {"directions", "projection", "mean"} - set(t)
        if missing:
            raise AnalysisError(f"{d / 'inlp.safetensors'} lacks {sorted(missing)}; save the INLP result again")
        return cls(
            hook=meta["hook"],
            label=meta["label"],
            directions=t["directions"],
            projection=t["projection"],
            accuracies=[float(a) for a in meta["accuracies"]],
            majority=float(meta["majority"]),
            margin=meta.get("margin"),
            mean=t["mean"],
            classes=list(meta.get("classes", [])),
            reached_chance=bool(meta.get("reached_chance")),
            removed=[int(r) for r in meta.get("removed", [])],
            config=dict(meta.get("config", {})),
            provenance=dict(meta.get("provenance", {})),
        )


def projection_from_directions(directions: Float[Tensor, "k d"], d: int | None = None) -> Float[Tensor, "d d"]:
    """``I - B^T B`` with ``B`` an orthonormal basis of the rows of ``directions`` (float64 maths, float32 out)."""
    if directions.numel() == 0:
        assert d is not None
        return torch.eye(d)
    D = directions.double()
    q, _ = torch.linalg.qr(D.T)
    P = torch.eye(D.shape[1], dtype=torch.float64) - q @ q.T
    return (0.5 * (P + P.T)).float()


def inlp_tensors(
    X: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    fit_mask: Tensor,
    test_mask: Tensor,
    max_iter: int = 20,
    margin: float | None = 0.02,
    C: float = 1.0,
    tol: float = 1e-6,
    solver_max_iter: int = 500,
    precondition: bool | str = "auto",
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """INLP on a plain ``[n, d]`` matrix (any float dtype, not copied) with class indices ``y`` in ``[0, K)``.

    ``fit_mask``/``test_mask`` are boolean ``[n]`` masks of the rows that train and score the classifiers.
    Returns a dict with ``directions``, ``projection``, ``accuracies``, ``majority``, ``mean``, ``scale``,
    ``reached_chance``. ``margin=None`` runs all ``max_iter`` iterations.
    """
    if X.dim() != 2:
        raise AnalysisError(f"X must be [n, d], got {list(X.shape)}")
    n, d = X.shape
    dev = X.device
    y = torch.as_tensor(y).reshape(-1).to(torch.int64)
    fit_mask, test_mask = fit_mask.to(torch.bool).cpu(), test_mask.to(torch.bool).cpu()
    K = int(y.max()) + 1
    if torch.unique(y[fit_mask]).numel() < 2:
        raise AnalysisError("the training rows hold a single class: INLP needs at least two")
    if not bool(test_mask.any()):
        raise AnalysisError("INLP needs held-out rows to measure accuracy; none were given")
    check_finite(X, "X")
    X3 = X.unsqueeze(0)
    cols = 1 if K == 2 else K
    Y = ((y[None] == torch.arange(K)[:, None]).float() if K > 2 else (y == 1).float()[None]).to(dev)
    S = fit_mask.float()[None].expand(cols, n).contiguous().to(dev)
    mean, std = column_stats(X3, S[:1])
    s = float(torch.sqrt((std[0, 0] ** 2).mean()).clamp_min(1e-12))
    scale = torch.full((1, 1, 1), s, device=dev)
    cov0 = None
    if use_preconditioner(precondition, 1, d, int(fit_mask.sum()), 1, dev):
        cov0 = feature_covariance(X3, S[0], mean[:, 0], scale)
    y_test = y[test_mask]
    majority = float(torch.bincount(y_test, minlength=K).max()) / y_test.numel()
    B = torch.zeros(0, d, dtype=torch.float64)
    P = torch.eye(d, device=dev)
    accuracies: list[float] = []
    removed: list[int] = []
    reached = False
    it = range(max_iter + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="INLP", leave=False)
    for i in it:
        cov = None if cov0 is None else (cov0 if i == 0 else P @ cov0 @ P)
        res = fit_logistic(
            X3, Y, S, C, mean=mean, scale=scale, proj=P, precond=cov, max_iter=solver_max_iter, tol=tol,
            backend=backend, warn=False,
        )
        W, b = effective_weights(res.coef, res.intercept, mean, scale, P)
        z = linear_scores(X3, W, b)[0].cpu()  # [cols, n]
        zt = z[:, test_mask]
        pred = (zt[0] > 0).long() if cols == 1 else zt.argmax(0)
        acc = float((pred == y_test).double().mean())
        accuracies.append(acc)
        removed.append(int(B.shape[0]))
        if bar is not None:
            bar.set_postfix(acc=f"{acc:.3f}", chance=f"{majority:.3f}")
        if margin is not None and acc <= majority + margin:
            reached = True
            break
        if i == max_iter:
            break
        # the new weight rows, restricted to the current nullspace, orthonormalised against what was found
        w = (res.coef[0] @ P).double().cpu()
        w = w - (w @ B.T) @ B
        for row in w:
            r = row - (row @ B.T) @ B
            nr = float(r.norm())
            if nr > 1e-8 * max(1.0, float(row.norm())):
                B = torch.cat([B, (r / nr)[None]])
        P = (torch.eye(d, dtype=torch.float64) - B.T @ B)
        P = (0.5 * (P + P.T)).float().to(dev)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "directions": B.float(),
        "projection": P.cpu() if B.shape[0] else torch.eye(d),
        "accuracies": accuracies,
        "majority": majority,
        "mean": mean[0, 0].cpu(),
        "scale": s,
        "reached_chance": reached,
        "removed": removed,
    }


def inlp(
    store: ActivationStore | str | os.PathLike,
    hook: str | int,
    label: str = "label",
    max_iter: int = 20,
    margin: float | None = 0.02,
    C: float = 1.0,
    seed: int = 0,
    *,
    test: str = "auto",
    test_size: float = 0.25,
    rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    tol: float = 1e-6,
    solver_max_iter: int = 500,
    precondition: bool | str = "auto",
    backend: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> INLPResult:
    """Run INLP for ``label`` at ``hook``: at most ``max_iter`` directions removed, stopping when held-out
    accuracy is within ``margin`` of the majority-class rate (``margin=None``: always ``max_iter``).

    Held-out rows: the dataset's ``test`` split when it has one (``test="auto"``), else a seeded ``test_size``
    fraction of the examples. Rows of one example stay on one side.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter={max_iter}: INLP needs at least one iteration")
    if margin is not None and margin < 0:
        raise ConfigError(f"margin={margin} must be >= 0 (or None to run every iteration)")
    store = _open(store)
    hook_name = store.resolve_hook(hook)
    lab_rows, y, classes = labelled_rows(store, label)
    if rows is not None:
        want = torch.zeros(len(store), dtype=torch.bool)
        want[torch.as_tensor(rows, dtype=torch.int64)] = True
        keep = want[lab_rows]
        lab_rows, y = lab_rows[keep], y[keep]
    present = torch.unique(y)
    if present.numel() < 2:
        raise AnalysisError(
            f"label {label!r} has a single class in the {lab_rows.numel()} rows used: INLP needs at least two"
        )
    remap = torch.full((len(classes),), -1, dtype=torch.int64)
    remap[present] = torch.arange(present.numel())
    y = remap[y]
    classes = [classes[int(i)] for i in present]
    fit_pos, test_pos, split_kind = split_rows(store, lab_rows, test=test, test_size=test_size, seed=seed, need=True)
    fit_mask = torch.zeros(lab_rows.numel(), dtype=torch.bool)
    fit_mask[fit_pos] = True
    test_mask = torch.zeros_like(fit_mask)
    if test_pos is not None:
        test_mask[test_pos] = True
    dev = resolve_device(device)
    all_rows = lab_rows.numel() == len(store)
    X = store.activations(hook_name, None if all_rows else lab_rows).to(dev)
    check_finite(X, f"hook {hook_name}")
    out = inlp_tensors(
        X, y, fit_mask, test_mask, max_iter=max_iter, margin=margin, C=C, tol=tol, solver_max_iter=solver_max_iter,
        precondition=precondition, backend=backend, progress=progress,
    )
    return INLPResult(
        hook=hook_name,
        label=label,
        directions=out["directions"],
        projection=out["projection"],
        accuracies=out["accuracies"],
        majority=out["majority"],
        margin=margin,
        mean=out["mean"],
        classes=_jsonable(list(classes)),
        reached_chance=out["reached_chance"],
        removed=out["removed"],
        config={"max_iter": max_iter, "C": C, "seed": seed, "split": split_kind, "scale": out["scale"],
                "n_fit": int(fit_mask.sum()), "n_test": int(test_mask.sum()), "tol": tol, "backend": backend},
        provenance=store_provenance(store, hook=hook_name, label=label),
    )
