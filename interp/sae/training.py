"""TopK SAE training on a store (Gao et al. 2024): AuxK, unit-norm decoder, checkpoints, bit-exact resume."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from interp.artifacts import jsonable as _jsonable
from interp.artifacts import save_tensors
from interp.devices import resolve_device
from interp.errors import AnalysisError, ConfigError, SAEError
from interp.sae.autoencoder import CFG_FILE, OPTIMIZER_STATE, SAE, TRAINING_STATE, WEIGHTS_FILE
from interp.sae.formats import _read_weights
from interp.sae.streaming import _as_store, _prefetch
from interp.store import ActivationStore, atomic_write_json
from jaxtyping import Int
from torch import Tensor


def _geometric_median(X: Tensor, iters: int = 64, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's iterations, started from the mean."""
    m = X.mean(0)
    for _ in range(iters):
        w = 1.0 / (X - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * X).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            return new
        m = new
    return m


def _epoch_order(rows: Tensor, epoch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return rows[torch.randperm(rows.numel(), generator=g)]


def _lr_at(step: int, cfg: Mapping[str, Any]) -> float:
    total, warm, decay = cfg["total_steps"], cfg["warmup_steps"], cfg["decay_frac"]
    scale = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    start_decay = total * (1 - decay)
    if decay > 0 and step >= start_decay:
        scale *= max(0.0, (total - step) / (total * decay))
    return cfg["lr"] * scale


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step_(\d+)", p.name)
            if m and (p / TRAINING_STATE).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _save_checkpoint(
    path: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: Tensor, state: dict[str, Any]
) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    sae.save(tmp)
    tensors: dict[str, Tensor] = {"since_fired": since_fired}
    for name in _PARAMS:
        st = opt.state.get(getattr(sae, name), {})
        if st:
            tensors[f"exp_avg.{name}"] = st["exp_avg"]
            tensors[f"exp_avg_sq.{name}"] = st["exp_avg_sq"]
            tensors[f"step.{name}"] = torch.as_tensor(st["step"]).float().reshape(1)
    save_tensors(tmp / OPTIMIZER_STATE, tensors, {"format": "pt"})
    atomic_write_json(tmp / TRAINING_STATE, _jsonable(state))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path, device: Any
) -> tuple[SAE, dict[str, Tensor], dict[str, Any]]:
    try:
        state = json.loads((path / TRAINING_STATE).read_text())
    except (OSError, ValueError) as e:
        raise SAEError(f"checkpoint {path} has a damaged {TRAINING_STATE} ({e}); delete that checkpoint") from None
    sae = SAE.load(path, device=device, dtype=torch.float32)
    opt_tensors = _read_weights(path / OPTIMIZER_STATE) if (path / OPTIMIZER_STATE).exists() else {}
    if "since_fired" not in opt_tensors:
        raise SAEError(
            f"checkpoint {path} lacks {OPTIMIZER_STATE}; delete that checkpoint to resume from an earlier one"
        )
    return sae, opt_tensors, state


def train_topk_sae(
    store: ActivationStore | str | os.PathLike,
    hook: str | int,
    d_sae: int,
    k: int,
    *,
    out_dir: str | os.PathLike | None = None,
    n_tokens: int | None = None,
    n_steps: int | None = None,
    batch_size: int = 4096,
    lr: float | None = None,
    warmup_steps: int | None = None,
    decay_frac: float = 0.2,
    aux_k: int | None = None,
    aux_coef: float = 1 / 32,
    dead_after_tokens: int | None = None,
    rows: Int[Tensor, " n"] | None = None,
    seed: int = 0,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    log_every: int = 50,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SAE:
    """Train a TopK sparse autoencoder (Gao et al. 2024) on one hook of a store; returns the trained SAE.

    Batches are streamed from the store in a seeded random order (a new permutation each pass over ``rows``,
    default all rows). Loss: normalised MSE ``||x - x_hat||^2 / ||x - mean(x)||^2`` per batch, plus
    ``aux_coef`` times the AuxK loss, in which latents that have not fired for ``dead_after_tokens`` rows
    (default: one pass over the rows, at least 20 batches, at most 10M) reconstruct the residual with their
    top ``aux_k`` (default ``d_in // 2``) pre-activations. ``b_dec`` starts at the geometric median of a
    sample; decoder rows are kept unit-norm and their gradient's parallel component removed; Adam, with
    linear warm-up and a linear decay over the last ``decay_frac`` of the steps; ``lr`` defaults to
    ``2e-4 / sqrt(d_sae / 2**14)``. Steps: ``n_steps``, else ``ceil(n_tokens / batch_size)`` (default
    ``n_tokens`` = max(2M, one pass)).

    With ``out_dir``, a checkpoint (SAELens layout + ``training_state.json`` + ``optimizer.safetensors``) is
    written to ``out_dir/checkpoints/step_NNNNNN`` every ``checkpoint_every`` steps (the last
    ``keep_checkpoints`` kept), and the final SAE to ``out_dir``. ``resume=True`` continues from the latest
    checkpoint and reproduces an uninterrupted run bit for bit on the same machine and thread count.
    """
    from tqdm.auto import tqdm

    store = _as_store(store)
    device = resolve_device(device)
    hook = store.resolve_hook(hook)
    d_in, d_sae, k = store.d_model, int(d_sae), int(k)
    if d_sae <= 0 or not 0 < k <= d_sae:
        raise ConfigError(f"need d_sae > 0 and 0 < k <= d_sae, got d_sae={d_sae}, k={k}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    rows_t = torch.arange(len(store)) if rows is None else torch.as_tensor(rows, dtype=torch.int64).flatten()
    n = int(rows_t.numel())
    if n < batch_size:
        raise ConfigError(f"{n} training rows is fewer than one batch of {batch_size}: lower batch_size (--batch-size)")
    steps_per_epoch = n // batch_size
    if n_steps is None:
        n_tokens = max(2_000_000, n) if n_tokens is None else int(n_tokens)
        n_steps = math.ceil(n_tokens / batch_size)
    total = int(n_steps)
    if total <= 0:
        raise ConfigError(f"the number of training steps must be positive, got {total}")
    import hashlib

    cfg: dict[str, Any] = {
        "hook": hook,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch_size": int(batch_size),
        "total_steps": total,
        "lr": float(lr) if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14),
        "warmup_steps": int(warmup_steps) if warmup_steps is not None else min(1000, total // 20),
        "decay_frac": float(decay_frac),
        "aux_k": int(aux_k) if aux_k is not None else max(1, min(d_in // 2, d_sae)),
        "aux_coef": float(aux_coef),
        "dead_after_tokens": int(dead_after_tokens) if dead_after_tokens else min(10_000_000, max(n, 20 * batch_size)),
        "seed": int(seed),
        "n_rows": n,
        "rows_sha256": hashlib.sha256(rows_t.numpy().tobytes()).hexdigest(),
    }
    out = Path(out_dir) if out_dir is not None else None
    start_from: Path | None = None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise SAEError(f"{out} is a file: choose a directory for --out")
        started = out.is_dir() and ((out / CFG_FILE).exists() or bool(_checkpoints(out)))
        if started and not resume:
            raise SAEError(
                f"{out} already holds an SAE training run: pass resume=True (--resume) or choose a new --out"
            )
        if started and resume:
            final = out / TRAINING_STATE
            if final.exists() and (out / WEIGHTS_FILE).exists():
                done = json.loads(final.read_text())
                _check_same_config(done.get("config", {}), cfg, out)
                if done.get("step") == total:
                    return SAE.load(out, device=device, dtype=torch.float32)
            ckpts = _checkpoints(out)
            start_from = ckpts[-1][1] if ckpts else None
        out.mkdir(parents=True, exist_ok=True)

    metadata = {
        "model_name": store.model_info.get("name"),
        "hook_name": hook,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": str(store.path),
        "interp": {
            "trained_by": "interp.sae.train_topk_sae",
            "store": str(store.path),
            "hook": hook,
            "positions": store.positions,
            "model": store.model_info,
            "dataset": store.manifest.get("dataset", {}),
        },
    }
    since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
    history: list[dict[str, Any]] = []
    step = 0
    if start_from is not None:
        sae, opt_tensors, state = _load_checkpoint(start_from, device)
        _check_same_config(state.get("config", {}), cfg, start_from)
        step, history = int(state["step"]), list(state.get("history", []))
        since_fired = opt_tensors["since_fired"].to(device)
    else:
        sae = SAE(d_in, d_sae, "topk", k=k, metadata=metadata, seed=seed, device=device)
        sample = torch.sort(_epoch_order(rows_t, -1, seed)[: min(n, 16384)]).values
        with torch.no_grad():
            sae.b_dec.copy_(_geometric_median(store.activations(hook, sample).float().to(device)))
        opt_tensors = {}
    params = [getattr(sae, name) for name in _PARAMS]
    opt = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=6.25e-10)
    for name, p in zip(_PARAMS, params):
        if f"exp_avg.{name}" in opt_tensors:
            opt.state[p] = {
                "step": opt_tensors[f"step.{name}"].reshape(()).float(),
                "exp_avg": opt_tensors[f"exp_avg.{name}"].to(device, torch.float32),
                "exp_avg_sq": opt_tensors[f"exp_avg_sq.{name}"].to(device, torch.float32),
            }

    def state_dict(at: int) -> dict[str, Any]:
        return {"step": at, "config": cfg, "history": history, "store": str(store.path)}

    bar = tqdm(total=total, initial=step, desc=f"train SAE {hook}", unit="step", disable=not progress)
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            order = _epoch_order(rows_t, epoch, seed)[offset * batch_size : steps_per_epoch * batch_size]
            order = order.view(-1, batch_size).sort(dim=1).values.flatten()  # same batches, read in disk order
            batches = _prefetch(store, hook, order, batch_size, False, desc="batches")
            try:
                for _, x in batches:
                    x = x.to(device, torch.float32)
                    fvu, aux, n_dead = _train_step(sae, opt, x, since_fired, cfg, _lr_at(step, cfg))
                    step += 1
                    bar.update(1)
                    if step % max(1, log_every) == 0 or step == total:
                        history.append({"step": step, "fvu": fvu, "aux": aux, "n_dead": n_dead})
                        bar.set_postfix(fvu=f"{fvu:.4f}", dead=n_dead)
                    if out is not None and step < total and checkpoint_every and step % checkpoint_every == 0:
                        _save_checkpoint(
                            out / "checkpoints" / f"step_{step:06d}", sae, opt, since_fired, state_dict(step)
                        )
                        _prune(out, keep_checkpoints)
                    if step >= total:
                        break
            finally:
                batches.close()
    finally:
        bar.close()
    sae.metadata.setdefault("interp", {})["training"] = {k_: v for k_, v in cfg.items() if k_ != "rows_sha256"}
    if out is not None:
        sae.save(out)
        atomic_write_json(out / TRAINING_STATE, _jsonable(state_dict(step)))
    sae.history_ = history
    return sae


def _check_same_config(old: Mapping[str, Any], new: Mapping[str, Any], where: Path) -> None:
    diff = [f"{key}: {old.get(key)!r} there vs {new[key]!r} now" for key in new if old.get(key) != new[key]]
    if diff:
        raise SAEError(
            f"cannot resume {where}: it was trained with other settings ({'; '.join(diff)}); use the same settings"
            " or a new --out"
        )


def _prune(out: Path, keep: int | None) -> None:
    if keep is None or keep <= 0:
        return
    for _, p in _checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _train_step(
    sae: SAE, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, cfg: Mapping[str, Any], lr: float
) -> tuple[float, float, int]:
    """One Adam step on a batch: normalised MSE + AuxK on dead latents; decoder rows kept unit-norm."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat = f @ sae.W_dec + sae.b_dec
    err = x_hat - x
    total_var = (x - x.mean(0)).pow(2).sum()
    if not total_var > 0:
        raise AnalysisError("a training batch has zero variance (constant activations): check the store's hook")
    fvu = err.pow(2).sum() / total_var
    loss = fvu
    dead = since_fired >= cfg["dead_after_tokens"]
    n_dead = int(dead.sum())
    aux_value = 0.0
    if n_dead and cfg["aux_coef"] > 0:
        k_aux = min(cfg["aux_k"], n_dead)
        avals, aidx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        e_hat = torch.zeros_like(pre).scatter(-1, aidx, torch.relu(avals)) @ sae.W_dec
        aux = (e_hat + err.detach()).pow(2).sum() / total_var * min(1.0, n_dead / cfg["aux_k"])
        loss = loss + cfg["aux_coef"] * aux
        aux_value = float(aux.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        W, g = sae.W_dec, sae.W_dec.grad
        g -= (g * W).sum(-1, keepdim=True) * W
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        W /= W.norm(dim=-1, keepdim=True)
        fired = (f > 0).any(0)
        since_fired += x.shape[0]
        since_fired[fired] = 0
    return float(fvu.detach()), aux_value, n_dead


# ================================================================================================ top activations
