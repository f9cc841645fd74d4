"""capture: run a dataset through a model and stream the chosen hooks' activations into a store.

Batches are padded with attention masks (padding never reaches the store), the forward stops after the last
layer asked for, and shards are committed as they fill, so memory stays flat whatever the dataset's size. A
capture that dies is resumed by running the same call again on the same directory.

Position policies: ``all`` (every token), ``last`` (the last real token), ``mean`` (mean over real tokens,
special tokens included), a region name from the dataset's ``regions`` (every token in it, e.g.
``response``), or ``mean:REGION`` / ``last:REGION`` (pooled over that region). Chat rows (``messages``) are rendered
with the model's chat template (``interp.chat``), and their ``response`` region is the final assistant message's
content, without the end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp import distributed
from interp.chat import render_dataset
from interp.datasets import Dataset, Example, load_dataset, token_labels_from_spans, token_mask_for_region
from interp.errors import ConfigError, DatasetError, HookError
from interp.fastpath import StopForward, attach, attn_implementation, fast_points
from interp.fastpath import forward_to_stop as fast_forward_to_stop
from interp.model import Tokens, model_device, model_identity, resolve_hooks, tokenize
from interp.model import max_length as model_max_length
from interp.store import (
    PARTS, ActivationStore, StoreWriter, dtype_from_name, example_line, lines_sha256, prune_parts,
)

POOLS = ("all", "last", "mean")
# while the last batch's forward runs, a buffer at least this large is committed as a shard, so that what is
# left to write after the last forward is one batch's rows, not a whole shard (its write, sha256 and fsync)
EARLY_FLUSH_BYTES = 8 * 2**20


def parse_positions(positions: str) -> tuple[str, str | None]:
    """``"mean"`` -> ("mean", None); ``"response"`` -> ("all", "response"); ``"last:response"`` -> ("last", ...)."""
    if not isinstance(positions, str) or not positions:
        raise ConfigError(f"positions must be 'all', 'last', 'mean' or a region name, got {positions!r}")
    if positions in POOLS:
        return positions, None
    if ":" in positions:
        pool, region = positions.split(":", 1)
        if pool not in POOLS or not region:
            raise ConfigError(f"positions {positions!r}: use POOL:REGION with POOL one of {', '.join(POOLS)}")
        return pool, region
    return "all", positions


def select_rows(
    acts: Float[Tensor, "batch pos d_model"], mask: Bool[Tensor, "batch pos"], pool: str
) -> tuple[Float[Tensor, "rows d_model"], Int[Tensor, " batch"], Int[Tensor, " rows"], Int[Tensor, " rows"]]:
    """The rows a position policy keeps for a whole padded batch, in a few tensor ops.

    ``mask`` marks the tokens the policy may use (real tokens, or a region's). Returns ``(rows, rows per
    example, batch index of each row, position of each row)``; ``mean`` rows get position -1, and an example
    with no usable token gets no row.
    """
    B, T, _ = acts.shape
    counts_all = mask.sum(1)
    if pool == "all":
        b, t = torch.nonzero(mask, as_tuple=True)
        return acts[b, t], counts_all, b, t
    has = counts_all > 0
    b = torch.nonzero(has).flatten()
    counts = has.to(torch.int64)
    if pool == "last":
        last = (T - 1) - torch.argmax(mask.flip(1).to(torch.int8), dim=1)
        return acts[b, last[b]], counts, b, last[b]
    w = mask[b].to(torch.float32) / counts_all[b, None].to(torch.float32)
    rows = torch.einsum("bt,btd->bd", w, acts[b].float())
    return rows, counts, b, torch.full((b.numel(),), -1)


def capture(
    model,
    dataset: str | os.PathLike | Dataset | Sequence[Any],
    hooks: str | Sequence[str] = "resid_post",
    positions: str = "all",
    out: str | os.PathLike = "activations",
    batch_size: int = 32,
    dtype: str | torch.dtype = "float16",
    layers: Sequence[int] | None = None,
    shard_mb: float = 256,
    max_length: int | None = None,
    progress: bool = True,
    resume: bool = True,
    fast: bool = True,
) -> ActivationStore:
    """Capture ``hooks`` for every example of ``dataset`` into the store at ``out`` and return it opened.

    Everything is checked before the store is created (hooks, layers, dtype, positions, dataset), so bad
    input leaves nothing behind. Running the same call again on an unfinished store resumes after its last
    committed example; on a finished one it returns the store as it is. Either way the dataset must be the
    one the store was started on (the sha256 of its examples' lines), or a DatasetError says what differs.
    Texts longer than ``max_length`` (default: the model's context) are truncated, with one
    :class:`TruncationWarning` giving the count. ``fast``: run the HF model the bridge wraps, with its fastest
    attention and plain torch hooks (:mod:`interp.fastpath`; equal to the bridge to float rounding), where every
    hook maps onto it; ``fast=False`` runs the bridge. The manifest's ``model.attn_implementation`` says which
    attention ran.

    In a distributed job (``torchrun``, or a caller's initialised process group) every rank makes the same call:
    each captures its own slice of whole batches into a part store under ``out/.parts``, and rank 0 then commits
    the parts as the store's shards, in dataset order; the store holds the same rows and examples as a
    single-process capture (docs/scale.md). Only rank 0 shows progress.
    """
    dtype_name, _ = dtype_from_name(dtype)
    pool, region = parse_positions(positions)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(shard_mb, bool) or not isinstance(shard_mb, (int, float)) or not math.isfinite(shard_mb) \
            or shard_mb <= 0:
        raise ConfigError(f"shard size must be a positive number of MiB (--shard-mb), got {shard_mb!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be a positive number of tokens (or None for the model's context), got"
                          f" {max_length!r}")
    hook_names, aliases = resolve_hooks(model, hooks, layers)
    data = render_dataset(model, load_dataset(dataset))  # chat rows: the model's template, 'response' region set
    lines = _example_lines(data)
    if region is not None:
        missing = [e.id for e in data if region not in e.regions]
        if missing:
            raise DatasetError(
                f"positions={positions!r} needs region {region!r} in every example; {len(missing)} lack it "
                f"(first: id {missing[0]!r}); regions look like {{\"{region}\": [start, end]}}"
            )
    out = Path(out)
    has_token_labels = data.has_spans and pool == "all"
    fast = fast and fast_points(model, hook_names) is not None
    ident = {**model_identity(model), "attn_implementation": attn_implementation(model) if fast else
             attn_implementation(model, bridge=True)}
    settings = dict(
        hooks=hook_names,
        d_model=int(model.cfg.d_model),
        dtype=dtype_name,
        model=ident,
        positions=positions,
        hook_aliases=aliases,
        dataset={**data.provenance(), "sha256": lines_sha256(lines)},
        shard_bytes=max(1, int(shard_mb * 2**20)),
        has_token_labels=has_token_labels,
        resume=resume,
    )
    rank, world = distributed.init_from_env()
    if world > 1:  # this rank writes its slice into a part store; rank 0 holds the store and commits the parts
        unit = batch_size
        if pool != "all" and region is None:  # one row per example: slices of whole shards give the same shards
            per_batch = batch_size * len(hook_names) * int(model.cfg.d_model) * dtype_from_name(dtype)[1].itemsize
            shard = batch_size * math.ceil(settings["shard_bytes"] / per_batch)
            unit = shard if -(-len(data) // shard) >= 4 * world else batch_size  # whole shards if balanced
        main, writer, stop = _open_part(out, settings, lines, unit, rank, world)
    else:
        main, writer, stop = None, StoreWriter(out, **settings), len(data)
    failure: Exception | None = None
    try:
        if world == 1:
            prune_parts(out)  # parts a distributed run left: this process captures their examples itself
        start = writer.example_offset + writer.next_example
        _check_same_dataset(writer, out, lines[writer.example_offset : stop])
        device = model_device(model)
        limit = min(max_length or model_max_length(model), model_max_length(model))
        truncated = 0
        bar = tqdm(total=stop - writer.example_offset, initial=start - writer.example_offset, unit="ex",
                   desc=f"capture {out.name}" + (f" (rank 0 of {world})" if world > 1 else ""),
                   disable=not progress or rank != 0)
        batches = [data.examples[b0 : min(b0 + batch_size, stop)] for b0 in range(start, stop, batch_size)]

        def tok(batch: Sequence[Example]) -> Tokens:
            return tokenize(model, [e.text for e in batch], max_length)

        # the next batch is tokenised, and the last one written (rows selected, shards hashed and committed), in
        # worker threads while this batch's forward runs; one write in flight at most, its error raised here. The
        # write that overlaps the last forward also commits what is buffered (EARLY_FLUSH_BYTES)
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="capture") as ex:
            upcoming = ex.submit(tok, batches[0]) if batches else None
            writing = None
            for i, batch in enumerate(batches):
                toks = upcoming.result().to(device)
                if i + 1 < len(batches):
                    upcoming = ex.submit(tok, batches[i + 1])
                truncated += count_truncated(batch, toks, limit)
                cache = run_hooks(model, toks, hook_names, fast=fast)
                if writing is not None:
                    writing.result()
                # only where the dataset ends: a distributed rank's slice of whole shards must stay whole shards
                writing = ex.submit(_add_batch, writer, batch, toks, cache, hook_names, pool, region, has_token_labels,
                                    i + 2 == len(batches) and stop == len(data))
                bar.update(len(batch))
            if writing is not None:
                writing.result()
        bar.close()
        writer.close(complete=True)
    except Exception as e:
        writer.abort()
        if world == 1:
            raise
        failure = e  # the other ranks hear of it in _commit_parts, then every rank raises
    except BaseException:
        writer.abort()
        if main is not None:
            main.abort()
        raise
    if world > 1:
        _commit_parts(main, out, failure)
    if truncated:
        warnings.warn(
            f"{truncated} of {stop - start} examples were longer than {limit} tokens and were truncated to"
            f" {limit} (the {'max_length given' if max_length else 'model context'}); their later tokens are not in"
            " the store",
            TruncationWarning,
            stacklevel=2,
        )
    return ActivationStore(out)


class TruncationWarning(UserWarning):
    """Some texts were longer than the tokens a capture keeps (the model's context or ``max_length``)."""


def count_truncated(batch: Sequence[Example], toks: Tokens, limit: int) -> int:
    """How many examples of a batch the tokenizer cut at ``limit`` tokens: they fill the limit and their last
    token ends before the text does."""
    n = 0
    for ex, length, offs in zip(batch, toks.lengths, toks.offsets):
        if length >= limit and max((b for _, b in offs), default=0) < len(ex.text.rstrip()):
            n += 1
    return n


def _example_lines(data: Dataset) -> list[bytes]:
    """The lines a capture of ``data`` writes to examples.jsonl (their sha256 identifies the dataset)."""
    lines = []
    for i, ex in enumerate(data):
        try:
            lines.append(example_line(i, ex.to_record()))
        except (TypeError, ValueError) as e:
            raise DatasetError(f"example {i} (id {ex.id!r}) has a field that is not JSON ({e}); give plain values")
    return lines


def _check_same_dataset(writer: StoreWriter, out: Path, lines: Sequence[bytes]) -> None:
    """Capturing into an existing store must continue (or re-return) the same dataset: the sha256 of the lines
    it would write must equal the one recorded when the store was started; otherwise say what differs."""
    m = writer.manifest
    committed = int(m["n_examples"])
    recorded = m["dataset"].get("sha256")
    if recorded == lines_sha256(lines) or (committed == 0 and recorded is None):
        return
    fix = "capture the same dataset, or choose a new --out path for this one"
    if committed > len(lines):
        raise DatasetError(f"store {out} already holds {committed} examples but the dataset has {len(lines)}; {fix}")
    for i, (old, new) in enumerate(zip(writer.committed_lines(), lines)):
        if old != new:
            try:
                a, b = json.loads(old), json.loads(new)
                keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)] or ["its bytes"]
            except (ValueError, TypeError):
                a, b, keys = {}, {}, ["its bytes"]
            k = keys[0]
            raise DatasetError(
                f"store {out} holds a capture of another dataset: example {i} differs in {', '.join(keys)} ({k}: "
                f"{str(a.get(k))[:40]!r} in the store, {str(b.get(k))[:40]!r} now); {fix}"
            )
    if recorded is not None:
        n_then = m["dataset"].get("examples")
        what = (f"it had {n_then} examples, this one has {len(lines)}" if n_then != len(lines)
                else f"an example after the {committed} already captured differs")
        raise DatasetError(f"store {out} was started on another version of this dataset ({what}); {fix}")


def _open_part(
    out: Path, settings: dict[str, Any], lines: Sequence[bytes], unit: int, rank: int, world: int
) -> tuple[StoreWriter | None, StoreWriter, int]:
    """Open this rank's part of a distributed capture: ``(rank 0's writer of the store, or None elsewhere; the
    part's writer; the end of this rank's slice)``.

    Rank 0 takes the store's lock, checks it continues the same dataset, plans the slices of the examples not yet
    committed (:func:`interp.distributed.split_range`, in ``unit``s of whole batches) and removes parts of any
    other plan; then every rank opens (or resumes) its part at ``out/.parts/KEY-FIRST-END``, where KEY hashes the settings, the dataset and
    the plan, so a rerun with the same settings and world size finds its parts again.
    """
    main, plan, err = None, None, None
    if rank == 0:
        try:
            main = StoreWriter(out, **settings)
            _check_same_dataset(main, out, lines)
            start = main.next_example
            slices = distributed.split_range(start, len(lines), unit, world)
            ident = {k: v for k, v in settings.items() if k not in ("resume", "hook_aliases")}
            key = hashlib.sha256(json.dumps([ident, start, slices], sort_keys=True).encode()).hexdigest()[:12]
            plan = [(f"{key}-{a:012d}-{b:012d}", a, b) for a, b in slices]
            prune_parts(out, keep=[name for name, _, _ in plan] if settings["resume"] else ())
        except Exception as e:
            if main is not None:
                main.abort()
            err = e
    distributed.agree(err, f"opening store {out}")
    name, a, b = distributed.broadcast(plan)[rank]
    part, err = None, None
    try:
        part_settings = {**settings, "dataset": {**settings["dataset"], "sha256": lines_sha256(lines[a:b]), "slice": [a, b]}}
        part = StoreWriter(out / PARTS / name, **{**part_settings, "resume": True}, example_offset=a)
    except Exception as e:
        err = e
    try:
        distributed.agree(err, f"opening the parts of {out}")
    except BaseException:
        for w in (part, main):
            if w is not None:
                w.abort()
        raise
    return main, part, b


def _commit_parts(main: StoreWriter | None, out: Path, failure: Exception | None) -> None:
    """After every rank closed its part (or failed): rank 0 commits the parts into the store, in dataset order,
    and removes them; every rank raises if any rank failed at either step."""
    try:
        distributed.agree(failure, f"capture into {out}")
    except BaseException:
        if main is not None:
            main.abort()
        raise
    err = None
    if main is not None:
        try:
            parts = sorted(p for p in (out / PARTS).iterdir() if p.is_dir())  # KEY-FIRST-END: one key, padded
            main.commit_parts(parts)
            main.close(complete=True)
            prune_parts(out)
        except Exception as e:
            main.abort()
            err = e
    distributed.agree(err, f"committing store {out}")


def forward_to_stop(model, input_ids: Tensor, **kwargs: Any) -> None:
    """A forward pass (``return_type=None``) that any hook may end early by raising :class:`StopForward`."""
    try:
        model(input_ids, return_type=None, **kwargs)
    except StopForward:
        pass


def run_hooks(
    model, toks: Tokens, hook_names: Sequence[str], stop_early: bool = True, fast: bool = True
) -> dict[str, Float[Tensor, "batch pos d_model"]]:
    """One padded forward pass, returning the activations at ``hook_names`` (nothing else is kept).

    With ``stop_early`` the forward ends as soon as the last of them has fired. ``fast``: run the HF model the
    bridge wraps with plain torch hooks (:mod:`interp.fastpath`) where every hook maps onto it; else the bridge.
    """
    cache: dict[str, Tensor] = {}
    wanted = len(set(hook_names))

    def save(act: Tensor, hook) -> None:
        cache[hook.name] = act.detach()
        if stop_early and len(cache) == wanted:
            raise StopForward

    with attach(model, [(h, save) for h in hook_names], fast) as fm:
        if fm is None:
            forward_to_stop(model, toks.input_ids, attention_mask=toks.attention_mask)
        else:
            fast_forward_to_stop(fm, toks.input_ids, toks.attention_mask)
    missing = [h for h in hook_names if h not in cache]
    if missing:
        raise HookError(f"hooks {missing} never fired in the forward pass; this architecture does not run them")
    return cache


@torch.inference_mode()
def _add_batch(
    writer: StoreWriter,
    batch: Sequence[Example],
    toks: Tokens,
    cache: dict[str, Tensor],
    hook_names: Sequence[str],
    pool: str,
    region: str | None,
    has_token_labels: bool,
    flush: bool = False,
) -> None:
    """Select a batch's rows for the position policy and hand them to the writer; ``flush``: then commit the
    buffer as a shard if it holds at least :data:`EARLY_FLUSH_BYTES`."""
    mask = toks.attention_mask.bool().cpu()
    if region is not None:
        mask = torch.zeros_like(mask)
        for i, ex in enumerate(batch):
            m = token_mask_for_region(toks.offsets[i], ex.regions[region])
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    acts: dict[str, Tensor] = {}
    for h in hook_names:
        rows, counts, b, pos = select_rows(cache[h].cpu(), mask, pool)
        acts[h] = rows.to(writer.dtype)
    ids = toks.input_ids.cpu()
    token_id = ids[b, pos] if pool != "mean" else torch.full((int(b.numel()),), -1)
    token_label = None
    if has_token_labels:  # pool == "all": rows are the masked tokens in order
        labels = torch.full(mask.shape, -1, dtype=torch.int8)
        for i, ex in enumerate(batch):
            if ex.spans:
                tl = token_labels_from_spans(toks.offsets[i], ex.spans)
                labels[i, : len(tl)] = torch.tensor(tl, dtype=torch.int8)
        token_label = labels[b, pos]
    writer.add_batch([ex.to_record() for ex in batch], acts, counts, pos, token_id, token_label)
    if flush and writer.buffered_bytes >= EARLY_FLUSH_BYTES:
        writer.flush()
