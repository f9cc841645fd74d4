"""StoreWriter: the single, resumable writer of a store.

Protocol (the manifest is the single commit point):

1. take the ``.lock`` (atomic; see :mod:`interp.store.lock`) before writing anything in the directory;
2. a directory without a manifest that holds only a lock, temp files, shard files or an ``examples.jsonl`` is
   a store in creation left by a writer that died: its leftovers are removed and the store starts afresh;
   in a committed store, temp files, shards the manifest does not name and examples past ``examples_bytes``
   are removed, and the writer resumes after the last committed example;
3. a commit writes the shard (temp + fsync + rename), appends the examples' lines to ``examples.jsonl``
   (fsync), then writes the manifest naming both with their sha256 (temp + fsync + rename).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import ConfigError, StoreCorruptError, StoreError
from interp.store.files import atomic_write_json, replacing, write_safetensors
from interp.store.lock import LOCK, WriterLock, now
from interp.store.manifest import (
    EXAMPLES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, SHARD_RE, TEMP_RE, VERIFIED, example_line, load_manifest,
)
from interp.store.names import dtype_from_name

PARTS = ".parts"  # a distributed capture's per-rank part stores, until rank 0 commits them into the store

META_TENSORS = ("example_id", "position", "token_id", "token_label")


def _io_error(path: Path, e: OSError) -> StoreError:
    return StoreError(
        f"cannot write to store {path} ({e.strerror or e}); free space or fix permissions, then run the same"
        " capture again: it resumes after the last committed shard"
    )


class StoreWriter:
    """Appends shards to a store; the single writer. Use as a context manager.

    ``StoreWriter(path, hooks=..., d_model=..., dtype=..., model=..., positions=...)`` creates a new store or
    reopens an unfinished one with the same settings (``resume=True``), after which ``next_example`` is the
    first example not yet committed. ``add_example`` buffers one example's rows; a shard is committed
    (shard file, then examples.jsonl, then manifest) once the buffer reaches ``shard_bytes``, and on ``close``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        hooks: Sequence[str],
        d_model: int,
        dtype: str | torch.dtype = "float16",
        model: Mapping[str, Any] | None = None,
        positions: str = "all",
        hook_aliases: Mapping[str, str] | None = None,
        dataset: Mapping[str, Any] | None = None,
        shard_bytes: int = 256 * 2**20,
        has_token_labels: bool = False,
        resume: bool = True,
        example_offset: int = 0,
    ):
        self.path = Path(path)
        self.example_offset = int(example_offset)  # a part of a distributed capture numbers its examples from here
        self.dtype_name, self.dtype = dtype_from_name(dtype)
        if not hooks:
            raise ConfigError("a store needs at least one hook")
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, (int, float)) or not math.isfinite(shard_bytes) \
                or shard_bytes <= 0:
            raise ConfigError(f"shard size must be a positive number of bytes, got {shard_bytes!r}")
        try:
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} is a file, not a store directory: choose another --out path")
            self._created_dir = not self.path.exists()
        except OSError as e:
            raise StoreError(f"cannot reach {self.path} ({e.strerror}); choose an --out path you can write to") from None
        settings = {
            "hooks": list(hooks),
            "d_model": int(d_model),
            "dtype": self.dtype_name,
            "positions": positions,
            "has_token_labels": bool(has_token_labels),
        }
        self.shard_bytes = int(shard_bytes)
        self._lock = WriterLock(self.path)
        self.fresh = False  # True when this writer started the store (nothing committed before it)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {self.path} ({e.strerror}); choose an --out path you can write to") from None
        try:
            self._lock.acquire()
            if (self.path / MANIFEST).exists():
                manifest = load_manifest(self.path)
                if not resume:
                    raise StoreError(f"{self.path} already holds a store; choose a new --out path or delete it")
                old = {k: manifest.get(k) for k in settings}
                if old != settings or (model and manifest.get("model", {}).get("name") != model.get("name")):
                    raise StoreError(
                        f"{self.path} holds a store made with other settings ({_diff(old, settings)}); "
                        "resume with the same settings or choose a new --out path"
                    )
                self.manifest = manifest
                self._remove_uncommitted()
                self._examples_hash = self._committed_examples_hash()
            else:
                self._clear_store_in_creation()
                self.fresh = True
                self.manifest = {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "created": now(),
                    "model": dict(model or {}),
                    **settings,
                    "hook_aliases": dict(hook_aliases or {}),
                    "dataset": dict(dataset or {}),
                    "n_examples": 0,
                    "n_rows": 0,
                    "examples_bytes": 0,
                    "examples_sha256": hashlib.sha256().hexdigest(),
                    "complete": False,
                    "shards": [],
                    **({"example_offset": self.example_offset} if self.example_offset else {}),
                }
                self._examples_hash = hashlib.sha256()
                (self.path / EXAMPLES).write_bytes(b"")
                atomic_write_json(self.path / MANIFEST, self.manifest)
        except OSError as e:
            self._discard_or_release()
            raise _io_error(self.path, e) from None
        except BaseException:
            self._discard_or_release()
            raise
        self.hooks = list(hooks)
        self.d_model = int(d_model)
        self.has_token_labels = bool(has_token_labels)
        self._buf_acts: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        self._buf_meta: dict[str, list[Tensor]] = {k: [] for k in META_TENSORS}
        self._buf_examples: list[bytes] = []
        self._buf_bytes = 0
        self._closed = False

    # ---- opening: what a writer that died may have left
    def _clear_store_in_creation(self) -> None:
        """No manifest: the directory must be empty or hold only what a writer leaves before its first commit."""
        entries = [p for p in self.path.iterdir() if p.name not in (LOCK, PARTS)]
        leftovers = {EXAMPLES, VERIFIED}
        other = [p.name for p in entries
                 if not (p.name in leftovers or SHARD_RE.fullmatch(p.name) or TEMP_RE.fullmatch(p.name)) or p.is_dir()]
        if other:
            raise StoreError(
                f"{self.path} is a non-empty directory that is not an activation store (it holds {other[0]!r});"
                " choose an empty or new --out path"
            )
        for p in entries:
            p.unlink()

    def _remove_uncommitted(self) -> None:
        named = {s["file"] for s in self.manifest["shards"]}
        for p in self.path.iterdir():
            if (TEMP_RE.fullmatch(p.name) or (SHARD_RE.fullmatch(p.name) and p.name not in named)) and p.is_file():
                p.unlink()
        p = self.path / EXAMPLES
        committed = int(self.manifest["examples_bytes"])
        if not p.is_file() or p.stat().st_size < committed:
            raise StoreCorruptError(
                f"{p} is missing or shorter than the manifest says; the store is damaged: recapture into a new --out"
            )
        if p.stat().st_size != committed:
            with open(p, "r+b") as f:
                f.truncate(committed)
                f.flush()
                os.fsync(f.fileno())

    def _committed_examples_hash(self) -> Any:
        h = hashlib.sha256()
        with open(self.path / EXAMPLES, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        expected = self.manifest.get("examples_sha256")
        if expected is not None and h.hexdigest() != expected:
            raise StoreCorruptError(
                f"{self.path / EXAMPLES} does not match the sha256 in the manifest (edited or damaged); it cannot be"
                " resumed: restore it or recapture into a new --out"
            )
        return h

    def committed_lines(self) -> list[bytes]:
        """The committed lines of ``examples.jsonl`` (checked against the manifest when the writer opened)."""
        with open(self.path / EXAMPLES, "rb") as f:
            return f.read(int(self.manifest["examples_bytes"])).splitlines(keepends=True)

    @property
    def next_example(self) -> int:
        """Index of the first example not yet committed (examples are numbered from 0 in dataset order)."""
        return int(self.manifest["n_examples"]) + len(self._buf_examples)

    @property
    def buffered_bytes(self) -> int:
        """Activation bytes buffered for the next shard (not yet committed)."""
        return self._buf_bytes

    # ---- writing
    def add_example(
        self,
        example: Mapping[str, Any],
        acts: Mapping[str, Float[Tensor, "rows d_model"]],
        position: Int[Tensor, " rows"],
        token_id: Int[Tensor, " rows"],
        token_label: Int[Tensor, " rows"] | None = None,
    ) -> None:
        """Buffer one example (its metadata line and its rows); commits a shard when the buffer is full."""
        self.add_batch([example], acts, torch.tensor([int(position.shape[0])]), position, token_id, token_label)

    def add_batch(
        self,
        examples: Sequence[Mapping[str, Any]],
        acts: Mapping[str, Float[Tensor, "rows d_model"]],
        counts: Int[Tensor, " examples"],
        position: Int[Tensor, " rows"],
        token_id: Int[Tensor, " rows"],
        token_label: Int[Tensor, " rows"] | None = None,
    ) -> None:
        """Buffer consecutive examples at once: ``counts[i]`` rows belong to ``examples[i]``, in order.

        The batch lands in one shard (shards hold whole examples); a shard is committed once the buffer
        reaches ``shard_bytes``.
        """
        if self._closed:
            raise StoreError("this writer is closed")
        counts = torch.as_tensor(counts, dtype=torch.int64)
        rows = int(position.shape[0])
        if len(examples) != counts.numel() or int(counts.sum()) != rows:
            raise StoreError(f"{len(examples)} examples with {int(counts.sum())} rows, but {rows} rows given")
        eid = self.example_offset + self.next_example
        for h in self.hooks:
            a = acts[h]
            if tuple(a.shape) != (rows, self.d_model):
                raise StoreError(f"hook {h}: expected activations [{rows}, {self.d_model}], got {list(a.shape)}")
            a = a.detach().to("cpu", self.dtype)
            self._buf_acts[h].append(a)
            self._buf_bytes += a.numel() * a.element_size()
        ids = torch.arange(eid, eid + len(examples), dtype=torch.int64)
        self._buf_meta["example_id"].append(torch.repeat_interleave(ids, counts))
        self._buf_meta["position"].append(position.detach().to("cpu", torch.int32))
        self._buf_meta["token_id"].append(token_id.detach().to("cpu", torch.int32))
        if self.has_token_labels:
            tl = token_label if token_label is not None else torch.full((rows,), -1)
            self._buf_meta["token_label"].append(tl.detach().to("cpu", torch.int8))
        for i, example in enumerate(examples):
            self._buf_examples.append(example_line(eid + i, example))
        if self._buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self, complete: bool = False) -> None:
        """Commit the buffered examples as one shard (no-op when nothing is buffered); ``complete``: the same
        manifest write also marks the store complete (the last shard of a capture: one commit, not two)."""
        if not self._buf_examples:
            return
        try:
            self._commit(complete)
        except OSError as e:
            self.abort()
            raise _io_error(self.path, e) from None

    def _commit(self, complete: bool = False) -> None:
        idx = len(self.manifest["shards"])
        name = f"shard-{idx:06d}.safetensors"
        chunks: dict[str, list[Tensor]] = {h: self._buf_acts[h] for h in self.hooks}
        chunks.update({k: parts for k, parts in self._buf_meta.items() if parts})
        rows = sum(int(t.shape[0]) for t in self._buf_meta["example_id"])
        nbytes, digest = write_safetensors(
            self.path / name, chunks, {"format": "pt", "store_format": f"{FORMAT_NAME}/{FORMAT_VERSION}"}
        )
        first = int(self.manifest["n_examples"])
        n_new = len(self._buf_examples)
        with open(self.path / EXAMPLES, "ab") as f:
            for line in self._buf_examples:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        ex_hash = self._examples_hash.copy()
        for line in self._buf_examples:
            ex_hash.update(line)
        manifest = dict(self.manifest)
        manifest["shards"] = [
            *self.manifest["shards"],
            {"file": name, "rows": rows, "examples": [first, first + n_new], "bytes": nbytes, "sha256": digest},
        ]
        manifest["n_examples"] = first + n_new
        manifest["n_rows"] = int(self.manifest["n_rows"]) + rows
        manifest["examples_bytes"] = int(self.manifest["examples_bytes"]) + sum(map(len, self._buf_examples))
        manifest["examples_sha256"] = ex_hash.hexdigest()
        if complete:
            manifest.update(complete=True, completed=now())
        atomic_write_json(self.path / MANIFEST, manifest)  # the commit point
        self.manifest = manifest
        self._examples_hash = ex_hash
        self._buf_acts = {h: [] for h in self.hooks}
        self._buf_meta = {k: [] for k in META_TENSORS}
        self._buf_examples = []
        self._buf_bytes = 0

    def commit_parts(self, parts: Sequence[Path]) -> None:
        """Append finished part stores as this store's next shards and examples, in order, in one commit.

        Each part is a complete store written with the same settings and ``example_offset`` equal to the number of
        examples before it, so its shards and lines already carry their final example ids: its shards are
        hard-linked (copied where links are not supported) under the next shard names, byte for byte (their
        sha256 stands), its committed lines appended to ``examples.jsonl``, then the manifest names them all. A
        writer that dies before that manifest leaves the parts intact and the store as it was.
        """
        self.flush()
        m = dict(self.manifest)
        shards, ex_hash = list(m["shards"]), self._examples_hash.copy()
        n_ex, n_rows, ex_bytes = int(m["n_examples"]), int(m["n_rows"]), int(m["examples_bytes"])
        try:
            with open(self.path / EXAMPLES, "ab") as out:
                for part in map(Path, parts):
                    pm = load_manifest(part)
                    same = all(pm.get(k) == m.get(k) for k in ("hooks", "d_model", "dtype", "positions", "has_token_labels"))
                    if not (pm["complete"] and same and pm.get("example_offset", 0) == n_ex):
                        raise StoreError(f"part {part} is unfinished or does not continue {self.path} at example {n_ex};"
                                         " rerun the same capture: it resumes each part")
                    with open(part / EXAMPLES, "rb") as f:
                        lines = f.read(int(pm["examples_bytes"]))
                    if len(lines) != pm["examples_bytes"] or hashlib.sha256(lines).hexdigest() != pm["examples_sha256"]:
                        raise StoreCorruptError(f"{part / EXAMPLES} does not match its manifest; delete {part} and rerun")
                    for s in pm["shards"]:
                        name = f"shard-{len(shards):06d}.safetensors"
                        _link_or_copy(part / s["file"], self.path / name)
                        shards.append({**s, "file": name, "examples": [n_ex + s["examples"][0], n_ex + s["examples"][1]]})
                    out.write(lines)
                    ex_hash.update(lines)
                    n_ex, n_rows, ex_bytes = n_ex + pm["n_examples"], n_rows + pm["n_rows"], ex_bytes + len(lines)
                out.flush()
                os.fsync(out.fileno())
            m.update(shards=shards, n_examples=n_ex, n_rows=n_rows, examples_bytes=ex_bytes,
                     examples_sha256=ex_hash.hexdigest())
            atomic_write_json(self.path / MANIFEST, m)  # the commit point
        except OSError as e:
            self.abort()
            raise _io_error(self.path, e) from None
        self.manifest, self._examples_hash = m, ex_hash

    def close(self, complete: bool = True) -> None:
        """Flush, mark the store complete (when ``complete``), and release the lock."""
        if self._closed:
            return
        self.flush(complete)
        try:
            if complete and not self.manifest.get("complete"):
                self.manifest = {**self.manifest, "complete": True, "completed": now()}
                atomic_write_json(self.path / MANIFEST, self.manifest)
        except OSError as e:
            self.abort()
            raise _io_error(self.path, e) from None
        self._closed = True
        self._lock.release()

    def abort(self) -> None:
        """Drop what is buffered and release the lock; committed shards stay readable and resumable.

        A store this writer started that has no committed shard is removed (with its directory, when the
        writer created it): a failed capture leaves no partial output behind.
        """
        if self._closed:
            return
        self._closed = True
        self._buf_examples = []
        self._discard_or_release()

    def _discard_or_release(self) -> None:
        manifest = getattr(self, "manifest", None)
        try:
            if self._lock.held and manifest is not None:
                if self.fresh and not manifest["shards"]:
                    for p in self.path.iterdir():
                        if p.name != LOCK and p.is_file():
                            p.unlink()
                else:
                    self._remove_uncommitted()
        except (OSError, StoreError):
            pass
        finally:
            self._lock.release()
        if self._created_dir and (self.fresh or not (self.path / MANIFEST).exists()):
            try:
                self.path.rmdir()
            except OSError:
                pass

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def prune_parts(path: str | os.PathLike, keep: Sequence[str] = ()) -> None:
    """Remove the part stores under ``path/.parts`` not named in ``keep`` (a distributed capture's leftovers from
    another plan, or parts already committed), each under its own lock: a part a live writer holds is a
    :class:`StoreLockedError`, never deleted from under it."""
    parts = Path(path) / PARTS
    if not parts.is_dir():
        return
    for p in sorted(parts.iterdir()):
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            lock = WriterLock(p)
            lock.acquire()
            try:
                shutil.rmtree(p)
            finally:
                lock.release()
        else:
            p.unlink()
    if not keep:
        try:
            parts.rmdir()
        except OSError:
            pass


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same bytes as ``src``: a hard link, or an atomic copy where the filesystem has none."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        with replacing(dst) as tmp, open(src, "rb") as f, open(tmp, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)
            g.flush()
            os.fsync(g.fileno())


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in new if old.get(k) != new.get(k))
