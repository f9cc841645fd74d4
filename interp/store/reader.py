"""ActivationStore: the read-only, memory-mapped view of a store directory (see :mod:`interp.store`).

Opening reads and checks the manifest only; a shard's header is read and checked against its manifest entry
(tensor names, dtypes, shapes, example range) the first time it is touched; ``examples.jsonl`` is checked
against its sha256 whenever it is read. Shard *data* bytes are not hashed on every read (that would read the
whole store): ``ActivationStore(path, verify=True)`` or ``interp probe --verify`` hashes everything first.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import ConfigError, HookError, StoreCorruptError, StoreError, close_matches
from interp.store.files import ST_DTYPES, Shard, atomic_write_json, sha256_file, to_torch
from interp.store.lock import now
from interp.store.manifest import EXAMPLES, MANIFEST, VERIFIED, load_manifest
from interp.store.names import dtype_from_name, layer_of, static_canonical
from interp.store.writer import StoreWriter


@dataclass
class Batch:
    """Rows of a store: activations per hook plus the per-row metadata, all on CPU."""

    acts: dict[str, Tensor]
    rows: Int[Tensor, " batch"]
    example_id: Int[Tensor, " batch"]
    position: Int[Tensor, " batch"]
    token_id: Int[Tensor, " batch"]
    token_label: Int[Tensor, " batch"] | None = None


@dataclass
class VerifyReport:
    """What :meth:`ActivationStore.verify` found; ``ok`` when ``problems`` is empty."""

    path: Path
    shards_checked: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "shards_checked": self.shards_checked,
                "problems": self.problems, "notes": self.notes}

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        if self.ok:
            return f"{self.path}: OK ({self.shards_checked} shards, every sha256 matches){notes}"
        return (f"{self.path}: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)
                + notes)


class ActivationStore:
    """A read-only view of a store directory. Opening reads the manifest only; shards are memory-mapped lazily.

    >>> store = ActivationStore("runs/capitals")
    >>> X = store.activations("blocks.3.hook_resid_post")      # [rows, d_model], aliases accepted
    >>> y = store.labels()                                      # [rows], example label of each row
    >>> train, test = store.train_test_split()                  # row indices, grouped by example
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.path = Path(path)
        try:
            exists, is_dir = self.path.exists(), self.path.is_dir()
        except OSError as e:
            raise StoreError(f"cannot reach {self.path} ({e.strerror}); check the path and its permissions") from None
        if exists and not is_dir:
            raise StoreError(f"{self.path} is a file, not a store directory")
        if not exists:
            raise StoreError(f"no store at {self.path}: check the path, or capture one with `interp capture`")
        self.manifest = load_manifest(self.path)
        self.hooks: list[str] = list(self.manifest["hooks"])
        self.d_model: int = int(self.manifest["d_model"])
        self.dtype_name, self.dtype = dtype_from_name(self.manifest["dtype"])
        self._shards: dict[int, Shard] = {}
        bounds = np.cumsum([0] + [int(s["rows"]) for s in self.manifest["shards"]])
        self._bounds = bounds  # shard i holds global rows [bounds[i], bounds[i+1])
        self._meta_cache: dict[str, Tensor] = {}
        self._examples: list[dict[str, Any]] | None = None
        if verify:
            report = self.verify()
            if not report.ok:
                more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
                raise StoreCorruptError(
                    f"store {self.path} failed verification: {report.problems[0]}{more}; run `interp store verify`"
                    " for the list, then restore or recapture the damaged files"
                )

    # ---- basic facts
    def __len__(self) -> int:
        return int(self._bounds[-1])

    @property
    def n_rows(self) -> int:
        return len(self)

    @property
    def n_examples(self) -> int:
        return int(self.manifest["n_examples"])

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.manifest.get("model", {}))

    @property
    def positions(self) -> str:
        return str(self.manifest["positions"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def layers(self) -> list[int | None]:
        return [layer_of(h) for h in self.hooks]

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, rows={len(self)}, examples={self.n_examples}, "
            f"hooks={len(self.hooks)}, d_model={self.d_model}, dtype={self.dtype_name}, positions={self.positions!r})"
        )

    # ---- hooks
    def resolve_hook(self, hook: str | int) -> str:
        """A stored hook's canonical name from a canonical name, an alias, or a layer index."""
        if isinstance(hook, (int, np.integer)) and not isinstance(hook, bool):
            matches = [h for h in self.hooks if layer_of(h) == int(hook)]
            if len(matches) == 1:
                return matches[0]
            layers = sorted({layer_of(h) for h in self.hooks if layer_of(h) is not None})
            raise HookError(
                f"layer {hook} is not in this store" if not matches else f"layer {hook} has several hooks {matches}"
                f"; stored layers: {layers}; pass a hook name instead"
            )
        name = str(hook)
        if name in self.hooks:
            return name
        aliases = self.manifest.get("hook_aliases", {})
        for candidate in (aliases.get(name), static_canonical(name)):
            if candidate in self.hooks:
                return candidate
        raise HookError(
            f"hook {name!r} is not in store {self.path}; {close_matches(name, self.hooks + list(aliases))}"
        )

    def resolve_hooks(self, hooks: str | int | Sequence[str | int] | None) -> list[str]:
        """``None`` or ``"all"`` -> every stored hook; otherwise each one resolved."""
        if hooks is None or hooks == "all":
            return list(self.hooks)
        if isinstance(hooks, (str, int)):
            return [self.resolve_hook(hooks)]
        return [self.resolve_hook(h) for h in hooks]

    # ---- shards
    def _shard(self, i: int) -> Shard:
        if i not in self._shards:
            self._shards[i] = self._open_shard(i)
        return self._shards[i]

    def _check_shards(self) -> None:
        """Open every shard (checking its header against the manifest) before sizing anything by the manifest."""
        for i in range(len(self.manifest["shards"])):
            self._shard(i)

    def _open_shard(self, i: int) -> Shard:
        """Open shard ``i`` and check it is the one its manifest entry describes: every tensor's dtype and shape,
        and its first and last example ids inside the entry's example range (a swapped shard fails here)."""
        entry = self.manifest["shards"][i]
        shard = Shard(self.path / entry["file"])
        rows = int(entry["rows"])
        names = [*self.hooks, "example_id", "position", "token_id"]
        names += ["token_label"] if self.manifest.get("has_token_labels") else []
        expected = {}
        for name in names:
            st, tail = self._st_spec(name)
            expected[name] = (st, (rows, *tail))
        shard.check(expected)
        if rows:
            ids = shard.array("example_id")
            lo, hi = entry["examples"]
            first, last = int(ids[0]), int(ids[-1])
            if not lo <= first <= last < hi:
                raise StoreCorruptError(
                    f"shard {entry['file']} holds examples {first}..{last}, its manifest entry says [{lo}, {hi}): the"
                    " shard does not belong here (swapped or replaced); run `interp store verify`"
                )
        return shard

    def _read_rows(self, name: str, rows: Tensor | np.ndarray | None) -> Tensor:
        """Rows of tensor ``name`` across shards, copied once from the memory maps into one new array."""
        n_shards = len(self.manifest["shards"])
        if n_shards == 0:
            return self._empty(name)
        np_dtype, tail, dtype = self._spec(name)
        if rows is None:
            self._check_shards()
            out = np.empty((len(self), *tail), dtype=np_dtype)
            for i in range(n_shards):  # whole tensors: one sequential read each, straight into place
                self._shard(i).read_into(name, out[self._bounds[i] : self._bounds[i + 1]])
            return to_torch(out, dtype)
        rows_np = _row_indices(rows)
        if rows_np.size and (rows_np.min() < 0 or rows_np.max() >= len(self)):
            raise StoreError(f"row index out of range for a store of {len(self)} rows")
        out = np.empty((rows_np.size, *tail), dtype=np_dtype)
        order = np.argsort(rows_np, kind="stable")
        sorted_rows = rows_np[order]
        shard_of = np.searchsorted(self._bounds, sorted_rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, sorted_rows.size]):
            if hi_i <= lo_i:
                continue
            i = int(shard_of[lo_i])
            local = sorted_rows[lo_i:hi_i] - self._bounds[i]
            arr = self._shard(i).array(name)
            a, b = int(local[0]), int(local[-1]) + 1
            # contiguous runs are a slice of the map; scattered rows gather only the pages they touch
            out[order[lo_i:hi_i]] = arr[a:b] if b - a == local.size else arr[local]
        return to_torch(out, dtype)

    def _st_spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """safetensors dtype and per-row shape of a stored tensor, from the manifest alone."""
        if name in self.hooks:
            return {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[self.dtype_name], (self.d_model,)
        return {"example_id": "I64", "token_label": "I8"}.get(name, "I32"), ()

    def _spec(self, name: str) -> tuple[np.dtype, tuple[int, ...], torch.dtype]:
        """numpy dtype, per-row shape and torch dtype of a stored tensor, from the manifest alone."""
        st, tail = self._st_spec(name)
        return ST_DTYPES[st][0], tail, self.dtype if name in self.hooks else ST_DTYPES[st][1]

    def _empty(self, name: str) -> Tensor:
        if name in self.hooks:
            return torch.empty((0, self.d_model), dtype=self.dtype)
        return torch.empty((0,), dtype={"example_id": torch.int64, "token_label": torch.int8}.get(name, torch.int32))

    def activations(
        self, hook: str | int, rows: Int[Tensor, " n"] | Sequence[int] | None = None
    ) -> Float[Tensor, "n d_model"]:
        """Activations of one hook, in the store's dtype: every row, or the given row indices (in that order)."""
        return self._read_rows(self.resolve_hook(hook), None if rows is None else torch.as_tensor(rows))

    def activation_range(self, hook: str | int, start: int, stop: int) -> Float[Tensor, "n d_model"]:
        """Rows ``start:stop`` of one hook, read with plain file reads (no memory map): for streaming passes over
        stores larger than memory, where mapped pages would otherwise stay resident in the process."""
        name = self.resolve_hook(hook)
        if not 0 <= start <= stop <= len(self):
            raise StoreError(f"rows {start}:{stop} are outside a store of {len(self)} rows")
        np_dtype, tail, dtype = self._spec(name)
        out = np.empty((stop - start, *tail), dtype=np_dtype)
        first = int(np.searchsorted(self._bounds, start, side="right")) - 1
        pos = start
        for i in range(max(first, 0), len(self.manifest["shards"])):
            if pos >= stop:
                break
            hi = min(stop, int(self._bounds[i + 1]))
            if hi > pos:
                self._shard(i).read_rows_into(name, pos - int(self._bounds[i]), out[pos - start : hi - start])
            pos = max(pos, hi)
        return to_torch(out, dtype)

    def _meta(self, name: str) -> Tensor:
        if name not in self._meta_cache:
            self._meta_cache[name] = self._read_rows(name, None)
        return self._meta_cache[name]

    def example_ids(self) -> Int[Tensor, " rows"]:
        return self._meta("example_id")

    def token_positions(self) -> Int[Tensor, " rows"]:
        """Token index of each row in its example (for pooled positions: -1 for ``mean``, the index for ``last``)."""
        return self._meta("position")

    def token_ids(self) -> Int[Tensor, " rows"]:
        return self._meta("token_id")

    def token_labels(self) -> Int[Tensor, " rows"]:
        """Per-row token labels (-1 = unlabelled); an error when the store has none."""
        if not self.manifest.get("has_token_labels"):
            raise StoreError(f"store {self.path} has no token labels: capture a dataset with `spans` and positions=all")
        return self._meta("token_label")

    # ---- examples and labels
    def examples(self) -> list[dict[str, Any]]:
        """The committed examples' metadata lines, in example_id order (checked against the manifest's sha256)."""
        if self._examples is None:
            self._examples = self._read_examples()
        return self._examples

    def _read_examples(self) -> list[dict[str, Any]]:
        p = self.path / EXAMPLES
        n = int(self.manifest["examples_bytes"])
        fix = "restore the store from a copy or recapture it"
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw = f.read(n) if n <= size else b""  # a damaged length must not become a huge allocation
        except FileNotFoundError:
            raise StoreCorruptError(f"{p} is missing; the store is damaged: {fix}") from None
        except OSError as e:
            raise StoreCorruptError(f"{p} cannot be read ({e.strerror}); the store is damaged: {fix}") from None
        if len(raw) != n:
            raise StoreCorruptError(f"{p} is shorter ({size} bytes) than the manifest says ({n}); {fix}")
        expected = self.manifest.get("examples_sha256")
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise StoreCorruptError(f"{p} does not match its sha256 in the manifest (edited or damaged); {fix}")
        try:
            lines = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line]
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise StoreCorruptError(f"{p} is damaged ({str(e)[:80]}); {fix}") from None
        if len(lines) != self.n_examples or not all(
            isinstance(e, dict) and e.get("example_id") == i for i, e in enumerate(lines)
        ):
            raise StoreCorruptError(f"{p} does not hold examples 0..{self.n_examples - 1} in order; {fix}")
        return lines

    def _example_field(self, name: str) -> list[Any]:
        examples = self.examples()
        missing = [i for i, e in enumerate(examples) if name not in e]
        if missing:
            keys = sorted({k for e in examples for k in e})
            raise StoreError(f"label {name!r} is not a field of this store's examples; {close_matches(name, keys)}")
        return [e[name] for e in examples]

    def label_classes(self, name: str = "label") -> list[Any]:
        """The distinct values of an example field, sorted; ``labels`` returns indices into this list."""
        if name == "token_label":
            vals = self.token_labels()
            return sorted(int(v) for v in torch.unique(vals) if v >= 0)
        return sorted(set(self._example_field(name)), key=lambda v: (str(type(v)), v))

    def example_labels(self, name: str = "label") -> Int[Tensor, " examples"]:
        """One label per example, as indices into :meth:`label_classes` (ints 0/1 stay 0/1)."""
        values = self._example_field(name)
        classes = self.label_classes(name)
        if classes == list(range(len(classes))):
            return torch.tensor(values, dtype=torch.int64)
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index[v] for v in values], dtype=torch.int64)

    def labels(self, name: str = "label") -> Int[Tensor, " rows"]:
        """One label per row: the example's label (``name`` is an example field) or ``token_label`` per token."""
        if name == "token_label":
            return self.token_labels().to(torch.int64)
        return self.example_labels(name)[self.example_ids()]

    # ---- splits
    def example_splits(self) -> list[str | None]:
        return [e.get("split") for e in self.examples()]

    def train_test_split(
        self, test_size: float = 0.25, seed: int = 0, use_dataset_split: bool = True
    ) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
        """Row indices of the train and test rows, split by example (an example's rows stay together).

        Uses the dataset's ``split`` field when every example has ``train`` or ``test``; otherwise a seeded
        random split of the examples with ``test_size`` of them held out.
        """
        splits = self.example_splits()
        if use_dataset_split and splits and all(s in ("train", "test") for s in splits):
            is_test = torch.tensor([s == "test" for s in splits])
        else:
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(self.n_examples, generator=g)
            n_test = max(1, int(round(test_size * self.n_examples))) if self.n_examples > 1 else 0
            is_test = torch.zeros(self.n_examples, dtype=torch.bool)
            is_test[perm[:n_test]] = True
        row_test = is_test[self.example_ids()]
        return torch.nonzero(~row_test).flatten(), torch.nonzero(row_test).flatten()

    # ---- iteration
    def iter_batches(
        self,
        hooks: str | int | Sequence[str | int] | None = None,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        rows: Int[Tensor, " n"] | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Stream batches of rows (all rows, or ``rows``), for one or many hooks, never loading the store whole.

        With ``shuffle``, rows are drawn in a seeded uniformly random order across all shards; each batch is
        gathered from the memory maps (only the pages holding its rows are read).
        """
        names = self.resolve_hooks(hooks)
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if rows is None:
            self._check_shards()
        order = torch.arange(len(self)) if rows is None else torch.from_numpy(_row_indices(rows))
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            order = order[torch.randperm(order.numel(), generator=g)]
        has_tl = bool(self.manifest.get("has_token_labels"))
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and idx.numel() < batch_size:
                break
            yield Batch(
                acts={h: self._read_rows(h, idx) for h in names},
                rows=idx,
                example_id=self.example_ids().index_select(0, idx),
                position=self.token_positions().index_select(0, idx),
                token_id=self.token_ids().index_select(0, idx),
                token_label=self.token_labels().index_select(0, idx) if has_tl else None,
            )

    # ---- summaries and checks
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: model, hooks, rows, examples, dtype, positions, shards, bytes, label counts."""
        m = self.manifest
        info: dict[str, Any] = {
            "path": str(self.path),
            "format": f"{m['format']} v{m['version']}",
            "model": m.get("model", {}),
            "hooks": self.hooks,
            "d_model": self.d_model,
            "dtype": self.dtype_name,
            "positions": self.positions,
            "examples": self.n_examples,
            "rows": len(self),
            "shards": len(m["shards"]),
            "bytes": int(sum(int(s.get("bytes", 0)) for s in m["shards"])),
            "complete": self.complete,
            "dataset": m.get("dataset", {}),
            "token_labels": bool(m.get("has_token_labels")),
        }
        try:
            values = self._example_field("label")
            counts: dict[str, int] = {}
            for v in values:
                counts[str(v)] = counts.get(str(v), 0) + 1
            info["label_counts"] = dict(sorted(counts.items()))
        except StoreCorruptError as e:
            info["examples_error"] = str(e)
        except StoreError:
            pass
        info["last_verified"] = self.last_verified()
        return info

    def verify(self, record: bool = True) -> VerifyReport:
        """Check every committed shard (a regular file, its size, its sha256, its header against the manifest)
        and ``examples.jsonl`` (its committed bytes against their sha256, one line per example).

        With ``record``, the result is written atomically to the ``verified.json`` sidecar (never into the
        manifest), which :meth:`info` and ``interp store info`` show as the last verification.
        """
        report = VerifyReport(self.path, 0)
        for i, s in enumerate(self.manifest["shards"]):
            p = self.path / s["file"]
            report.shards_checked += 1
            if not p.is_file():
                report.problems.append(f"{s['file']}: {'not a regular file' if p.exists() else 'missing'}")
                continue
            size = p.stat().st_size
            if "bytes" in s and size != int(s["bytes"]):
                report.problems.append(f"{s['file']}: {size} bytes on disk, manifest says {s['bytes']} (truncated?)")
            try:
                digest = sha256_file(p)
            except OSError as e:
                report.problems.append(f"{s['file']}: cannot be read ({e.strerror})")
                continue
            if digest != s["sha256"]:
                report.problems.append(f"{s['file']}: sha256 mismatch (bytes changed on disk)")
                continue
            try:
                self._open_shard(i)
            except StoreCorruptError as e:
                report.problems.append(str(e))
        try:
            self._read_examples()
        except StoreCorruptError as e:
            report.problems.append(str(e))
        if self.manifest.get("examples_sha256") is None:
            report.notes.append(f"{EXAMPLES} is unhashed (written by an older interp): its contents are unchecked")
        if record:
            self._record_verification(report)
        return report

    def _record_verification(self, report: VerifyReport) -> None:
        try:
            manifest_sha = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
            record = {"verified": now(), "ok": report.ok, "problems": report.problems[:20],
                      "manifest_sha256": manifest_sha}
            atomic_write_json(self.path / VERIFIED, record)
        except OSError:
            pass  # a read-only store: the check still ran, it just is not remembered

    def last_verified(self) -> dict[str, Any] | None:
        """``{"verified": time, "ok": bool, "current": bool}`` from the last :meth:`verify` (``current`` is False
        when the store changed since), or None if it was never verified."""
        try:
            with open(self.path / VERIFIED, "rb") as f:
                rec = json.loads(f.read(1_000_000).decode("utf-8"))
            manifest_sha = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("verified"), str):
            return None
        return {"verified": rec["verified"][:40], "ok": rec.get("ok") is True,
                "current": rec.get("manifest_sha256") == manifest_sha}

    # ---- building a store from tensors (synthetic data, tests, imports from other tools)
    @classmethod
    def from_tensors(
        cls,
        path: str | os.PathLike,
        acts: Mapping[str, Float[Tensor, "rows d_model"]],
        labels: Sequence[Any] | Tensor | None = None,
        *,
        examples: Sequence[Mapping[str, Any]] | None = None,
        example_id: Int[Tensor, " rows"] | None = None,
        position: Int[Tensor, " rows"] | None = None,
        token_id: Int[Tensor, " rows"] | None = None,
        token_label: Int[Tensor, " rows"] | None = None,
        dtype: str | torch.dtype = "float32",
        model: Mapping[str, Any] | None = None,
        positions: str = "mean",
        shard_bytes: int = 256 * 2**20,
    ) -> ActivationStore:
        """Write in-memory activations as a new store and open it.

        ``acts`` maps hook names to ``[rows, d]`` tensors. Without ``examples`` each row is its own example
        whose ``label`` comes from ``labels``; with ``examples`` (one dict per example) ``example_id`` maps
        rows to them (rows of one example must be contiguous and in order).
        """
        hooks = list(acts)
        if not hooks:
            raise ConfigError("from_tensors needs at least one hook")
        acts = {h: _as_matrix(a, f"acts[{h!r}]") for h, a in acts.items()}
        n = int(acts[hooks[0]].shape[0])
        d = int(acts[hooks[0]].shape[1])
        for h, a in acts.items():
            if tuple(a.shape) != (n, d):
                raise ConfigError(f"hook {h}: shape {list(a.shape)} differs from {[n, d]}")
        if examples is None:
            lab = None
            if labels is not None:
                lab = labels.tolist() if isinstance(labels, (Tensor, np.ndarray)) else [
                    v.item() if isinstance(v, (np.generic, Tensor)) else v for v in labels]
            if lab is not None and len(lab) != n:
                raise ConfigError(f"{len(lab)} labels for {n} rows")
            examples = [{"id": i, **({"label": lab[i]} if lab is not None else {})} for i in range(n)]
            example_id = torch.arange(n)
        elif example_id is None:
            if len(examples) != n:
                raise ConfigError("give example_id when rows and examples differ in number")
            example_id = torch.arange(n)
        example_id = torch.as_tensor(example_id, dtype=torch.int64)
        if example_id.numel() and (torch.diff(example_id) < 0).any():
            raise ConfigError("example_id must be sorted (rows of one example contiguous, examples in order)")
        position = torch.zeros(n, dtype=torch.int32) if position is None else torch.as_tensor(position)
        token_id = torch.zeros(n, dtype=torch.int32) if token_id is None else torch.as_tensor(token_id)
        model = dict(model or {"name": "synthetic", "d_model": d, "n_layers": None})
        model.setdefault("d_model", d)
        writer = StoreWriter(
            path,
            hooks=hooks,
            d_model=d,
            dtype=dtype,
            model=model,
            positions=positions,
            shard_bytes=shard_bytes,
            has_token_labels=token_label is not None,
            resume=False,
        )
        counts = torch.bincount(example_id, minlength=len(examples)) if n else torch.zeros(len(examples), dtype=torch.int64)
        ends = torch.cumsum(counts, 0)
        row_bytes = len(hooks) * d * writer.dtype.itemsize
        rows_per_chunk = max(1, writer.shard_bytes // max(1, row_bytes))  # a chunk never outgrows a shard
        labels_t = None if token_label is None else torch.as_tensor(token_label)
        with writer:
            e0 = 0
            while e0 < len(examples):
                first_row = int(ends[e0 - 1]) if e0 else 0
                # examples whose rows end within one chunk of rows (at least one example)
                e1 = max(e0 + 1, int(torch.searchsorted(ends, first_row + rows_per_chunk, right=True)))
                sl = slice(first_row, int(ends[e1 - 1]))
                writer.add_batch(
                    examples[e0:e1],
                    {h: acts[h][sl] for h in hooks},
                    counts[e0:e1],
                    position[sl],
                    token_id[sl],
                    None if labels_t is None else labels_t[sl],
                )
                e0 = e1
        return cls(path)


def _row_indices(rows: Any) -> np.ndarray:
    """Row indices as int64; floats, booleans and other non-integers are refused (``0.5`` is not row 0)."""
    if isinstance(rows, Tensor):
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise ConfigError(f"row indices must be integers, got a {rows.dtype} tensor; use torch.nonzero for a mask")
        return rows.detach().cpu().to(torch.int64).reshape(-1).numpy()
    arr = np.asarray(rows)
    if arr.size and arr.dtype.kind not in "iu":
        raise ConfigError(f"row indices must be integers, got {arr.dtype} values such as {arr.reshape(-1)[0]!r}")
    return arr.astype(np.int64).reshape(-1)


def _as_matrix(a: Any, what: str) -> Tensor:
    """A ``[rows, d]`` tensor from a tensor or a numpy array (anything else is a ConfigError)."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "fiu":
            raise ConfigError(f"{what} is a numpy array of {a.dtype}; give numbers")
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, Tensor):
        raise ConfigError(f"{what} is a {type(a).__name__}; give a [rows, d_model] tensor or numpy array")
    if a.ndim != 2:
        raise ConfigError(f"{what} has shape {list(a.shape)}; give a [rows, d_model] matrix")
    return a
