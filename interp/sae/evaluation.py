"""Streaming an SAE over a store: reconstruction metrics and the rows on which latents fire most."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from interp.errors import AnalysisError, ConfigError
from interp.sae.autoencoder import SAE
from interp.sae.streaming import _as_store, _prefetch, resolve_sae_hook
from interp.store import ActivationStore
from jaxtyping import Float, Int
from torch import Tensor


def _as_sae(sae: SAE | str | os.PathLike) -> SAE:
    return sae if isinstance(sae, SAE) else SAE.load(sae)



# ================================================================================================ metrics


@dataclass
class SAEMetrics:
    """Reconstruction quality of an SAE over store rows.

    ``mse``: mean over rows and dimensions of ``(x_hat - x)**2``; ``fve``: fraction of variance explained,
    ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; ``l0``: mean number of active latents per row;
    ``n_dead``: latents that never fired on these rows; ``firing_frequency``: per latent, the fraction of
    rows it fired on.
    """

    mse: float
    fve: float
    l0: float
    n_dead: int
    dead_fraction: float
    n_rows: int
    firing_frequency: Float[Tensor, " d_sae"]
    hook: str
    store: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mse": self.mse,
            "fve": self.fve,
            "l0": self.l0,
            "n_dead": self.n_dead,
            "dead_fraction": self.dead_fraction,
            "n_rows": self.n_rows,
            "hook": self.hook,
            "store": self.store,
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def __str__(self) -> str:
        return (
            f"SAE on {self.hook} over {self.n_rows} rows: FVE {self.fve:.4f}, MSE {self.mse:.4g}, L0 {self.l0:.2f}, "
            f"dead {self.n_dead} ({100 * self.dead_fraction:.1f}%)"
        )

    def plot(self):
        """Histogram of log10 latent firing frequency (dead latents counted apart)."""
        from interp.plots import sae_feature_density

        model = (self.provenance.get("model") or {}).get("name", "") if self.provenance else ""
        where = f"{self.hook} of {model}" if model else self.hook
        return sae_feature_density(self.firing_frequency, title=f"SAE latent firing frequency at {where}")


def evaluate(
    sae: SAE | str | os.PathLike,
    store: ActivationStore | str | os.PathLike,
    hook: str | int | None = None,
    *,
    rows: Int[Tensor, " n"] | None = None,
    batch_size: int = 8192,
    progress: bool = True,
) -> SAEMetrics:
    """MSE, fraction of variance explained, L0 and dead latents of ``sae`` over a store, streamed in batches."""
    sae, store = _as_sae(sae), _as_store(store)
    hook = resolve_sae_hook(store, sae, hook)
    n = 0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    sum_err = torch.zeros((), dtype=torch.float64)
    sum_l0 = torch.zeros((), dtype=torch.float64)
    fires = torch.zeros(sae.d_sae, dtype=torch.int64)
    with torch.no_grad():
        for _, x in _prefetch(store, hook, rows, batch_size, progress, desc="evaluate"):
            x = x.to(sae.device, torch.float32)
            x_hat, f = sae.reconstruct(x)
            err = (x_hat.float() - x).pow(2).sum()
            if not torch.isfinite(err):
                raise AnalysisError(f"non-finite reconstruction error on hook {hook}: check the store and the SAE")
            active = f != 0
            n += x.shape[0]
            sum_x += x.sum(0).double().cpu()
            sum_x2 += x.double().pow(2).sum().cpu()
            sum_err += err.double().cpu()
            sum_l0 += active.sum().double().cpu()
            fires += active.sum(0).cpu()
    if n == 0:
        raise AnalysisError("no rows to evaluate the SAE on")
    total_var = sum_x2 - sum_x.pow(2).sum() / n
    fve = float(1 - sum_err / total_var) if total_var > 0 else float("nan")
    n_dead = int((fires == 0).sum())
    return SAEMetrics(
        mse=float(sum_err / (n * sae.d_in)),
        fve=fve,
        l0=float(sum_l0 / n),
        n_dead=n_dead,
        dead_fraction=n_dead / sae.d_sae,
        n_rows=n,
        firing_frequency=(fires.double() / n).float(),
        hook=hook,
        store=str(store.path),
        provenance={"sae": repr(sae), "model": store.model_info},
    )


# ================================================================================================ top activations


def _store_tokenizer(store: ActivationStore, tokenizer: Any) -> Any:
    """``tokenizer="auto"``: the tokenizer saved next to the store's model, when it is a local directory."""
    if tokenizer != "auto":
        return getattr(tokenizer, "tokenizer", tokenizer)  # a model that carries its tokenizer
    path = (store.model_info or {}).get("path")
    if not path or not Path(path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer files there: token strings are left out
        return None


def top_activations(
    store: ActivationStore | str | os.PathLike,
    sae: SAE | str | os.PathLike,
    latents: int | Sequence[int],
    *,
    hook: str | int | None = None,
    n: int = 20,
    rows: Int[Tensor, " n"] | None = None,
    tokenizer: Any = "auto",
    batch_size: int = 8192,
    progress: bool = True,
):
    """The ``n`` store rows on which each of ``latents`` fires most strongly: what a latent responds to.

    Returns a ``pandas.DataFrame`` with one row per latent and rank: ``latent``, ``rank``, ``activation``,
    ``row`` (store row), ``example_id``, ``position`` (token index, -1 for mean-pooled rows), ``token_id``,
    ``token`` (when a tokenizer is known: ``"auto"`` loads the one saved with the store's model directory; pass
    a tokenizer or a model to choose, ``None`` for none), ``text`` and ``label`` (the example's, when present).
    Rows where a latent is zero are never listed, so a rarely firing latent can have fewer than ``n``.
    One pass over the store (or ``rows``), streamed in batches.
    """
    import pandas as pd

    store, sae = _as_store(store), _as_sae(sae)
    hook = resolve_sae_hook(store, sae, hook)
    try:  # an int, a list of them, or a tensor / array of latent ids (such as comparison.ranking[:5])
        ids = [int(v) for v in torch.as_tensor(latents).flatten().tolist()]
        if torch.as_tensor(latents).is_floating_point():
            raise TypeError
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"latents must be integer latent ids, got {latents!r}") from None
    if not ids:
        raise ConfigError("give at least one latent")
    bad = [v for v in ids if not 0 <= v < sae.d_sae]
    if bad:
        raise ConfigError(f"latents {bad} are outside 0..{sae.d_sae - 1}")
    if n <= 0:
        raise ConfigError(f"n must be positive, got {n}")
    cols = torch.tensor(ids, dtype=torch.int64)
    best_v = torch.full((len(ids), 0), float("-inf"))
    best_r = torch.zeros((len(ids), 0), dtype=torch.int64)
    for rows_b, f in sae.iter_encode(store, hook, rows=rows, batch_size=batch_size, progress=progress):
        a = f[:, cols.to(f.device)].float().cpu().T  # [L, b]
        v = torch.cat([best_v, a], 1)
        r = torch.cat([best_r, rows_b.expand(len(ids), -1)], 1)
        top = v.topk(min(n, v.shape[1]), dim=1)
        best_v, best_r = top.values, r.gather(1, top.indices)
    tok = _store_tokenizer(store, tokenizer)
    examples = store.examples()
    ex_ids, positions, token_ids = store.example_ids(), store.token_positions(), store.token_ids()
    records = []
    for i, latent in enumerate(ids):
        for rank, (value, row) in enumerate(zip(best_v[i].tolist(), best_r[i].tolist())):
            if not value > 0:
                break
            ex = examples[int(ex_ids[row])]
            t_id = int(token_ids[row])
            rec = {"latent": latent, "rank": rank, "activation": value, "row": row, "example_id": int(ex_ids[row]),
                   "position": int(positions[row]), "token_id": t_id}  # fmt: skip
            if tok is not None and t_id >= 0:
                rec["token"] = tok.convert_ids_to_tokens(t_id)
            rec["text"] = ex.get("text")
            if "label" in ex:
                rec["label"] = ex["label"]
            records.append(rec)
    return pd.DataFrame.from_records(records)
