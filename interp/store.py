"""ActivationStore: activations on disk as sharded safetensors (store format version 1).

A store is a directory::

    manifest.json                 written last, atomically (temp file + fsync + rename)
    examples.jsonl                one line per example; only the first ``examples_bytes`` bytes are committed
    shard-000000.safetensors      one file per shard, committed atomically, never rewritten
    .lock                         held by the single writer

Each shard holds, for ``rows`` token positions, one ``[rows, d_model]`` tensor per hook (named by its canonical
TransformerLens hook name), ``example_id`` int64, ``position`` int32, ``token_id`` int32 and optionally
``token_label`` int8. A shard belongs to the store only once the manifest names it, so a writer that dies
leaves the store readable up to its last committed shard and a new writer resumes from there.

Readers memory-map shards: nothing is loaded until asked for, and random row access (shuffled batches for
SAE training) touches only the pages it needs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import ConfigError, HookError, StoreCorruptError, StoreError, StoreLockedError, close_matches

FORMAT_NAME = "interp.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
LOCK = ".lock"
SHARD_RE = re.compile(r"shard-\d{6}\.safetensors")
META_TENSORS = ("example_id", "position", "token_id", "token_label")

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: read the bits, view in torch
    "F32": (np.dtype("<f4"), torch.float32),
    "F64": (np.dtype("<f8"), torch.float64),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
}


def dtype_from_name(name: str | torch.dtype) -> tuple[str, torch.dtype]:
    """``"float16"`` / ``torch.float16`` -> ``("float16", torch.float16)``; anything else is a ConfigError."""
    if isinstance(name, torch.dtype):
        for k, v in DTYPES.items():
            if v == name:
                return k, v
        name = str(name)
    key = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(
        str(name).replace("torch.", ""), str(name).replace("torch.", "")
    )
    if key not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    return key, DTYPES[key]


# ----------------------------------------------------------------------------------------------- hook names

_STATIC_ALIASES = [  # classic HookedTransformer names -> TransformerLens 4 canonical names
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), r"blocks.\1.hook_out"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), r"blocks.\1.hook_in"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), r"blocks.\1.attn.hook_out"),
]
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def layer_of(hook: str) -> int | None:
    """The block index a hook name belongs to (``blocks.4.hook_out`` -> 4), or None."""
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


def static_canonical(name: str) -> str:
    """Map the classic aliases that mean the same in every architecture to their canonical names."""
    for pattern, repl in _STATIC_ALIASES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


# ----------------------------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}


def write_safetensors(path: Path, tensors: Mapping[str, Sequence[Tensor]], metadata: Mapping[str, str]) -> tuple[int, str]:
    """Write a safetensors file atomically from tensors given as lists of row chunks (concatenated on disk,
    never in memory), hashing while writing. Returns ``(bytes written, sha256)``."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, parts in tensors.items():
        first = parts[0]
        shape = [sum(int(p.shape[0]) for p in parts), *first.shape[1:]]
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        header[name] = {"dtype": _TORCH_TO_ST[first.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    h = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for block in (struct.pack("<Q", len(raw)), raw):
            f.write(block)
            h.update(block)
        for parts in tensors.values():
            for p in parts:
                t = p.detach().contiguous().cpu()
                if t.dtype == torch.bfloat16:
                    t = t.view(torch.int16)
                mv = memoryview(t.numpy()).cast("B")
                f.write(mv)
                h.update(mv)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return 8 + len(raw) + offset, h.hexdigest()


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header: ``({name: {dtype, shape, data_offsets}}, data_start)``.

    Checks what a memory map would otherwise trip over later: header length, JSON, dtypes, offsets inside the
    file and a file exactly as long as the header says (a truncated shard fails here, by name).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > min(size - 8, 100_000_000):
                raise ValueError(f"header length {hlen} does not fit in a {size}-byte file")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise StoreCorruptError(f"shard {path} is missing: the store is damaged; recapture or restore it") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"shard {path.name} has a damaged header ({e}); run `interp store verify`") from None
    if not isinstance(header, dict):
        raise StoreCorruptError(f"shard {path.name} has a damaged header; run `interp store verify`")
    header.pop("__metadata__", None)
    data_start = 8 + hlen
    end = 0
    for name, spec in header.items():
        try:
            lo, hi = spec["data_offsets"]
            st_dtype = spec["dtype"]
            shape = spec["shape"]
        except (KeyError, TypeError, ValueError):
            raise StoreCorruptError(f"shard {path.name}: tensor {name!r} has a damaged header entry") from None
        if st_dtype not in _ST_DTYPES:
            raise StoreCorruptError(f"shard {path.name}: tensor {name!r} has unsupported dtype {st_dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[st_dtype][0].itemsize
        if hi - lo != nbytes or lo < 0:
            raise StoreCorruptError(f"shard {path.name}: tensor {name!r} offsets disagree with its shape")
        end = max(end, hi)
    if data_start + end != size:
        raise StoreCorruptError(
            f"shard {path.name} is truncated or padded: {size} bytes on disk, header needs {data_start + end};"
            " run `interp store verify` and recapture the damaged shard"
        )
    return header, data_start


class _Shard:
    """One shard: its checked header, whole-tensor sequential reads, and numpy memory maps for row gathers."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = _read_header(path)
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self.header)

    def _map(self, name: str) -> np.memmap:
        if name not in self._maps:
            spec = self.header[name]
            np_dtype, _ = _ST_DTYPES[spec["dtype"]]
            lo, _hi = spec["data_offsets"]
            shape = tuple(spec["shape"])
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype=np_dtype)  # type: ignore[return-value]
            self._maps[name] = np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.data_start + lo, shape=shape)
        return self._maps[name]

    def array(self, name: str) -> np.ndarray:
        """The memory map of tensor ``name`` (numpy; bfloat16 shows as uint16 bits)."""
        if name not in self.header:
            raise StoreCorruptError(f"shard {self.path.name} has no tensor {name!r}: the store is damaged")
        return self._map(name)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read the whole tensor ``name`` into ``out`` (C-contiguous, right size) with plain sequential reads."""
        if name not in self.header:
            raise StoreCorruptError(f"shard {self.path.name} has no tensor {name!r}: the store is damaged")
        lo, hi = self.header[name]["data_offsets"]
        view = memoryview(out).cast("B")
        if view.nbytes != hi - lo:
            raise StoreCorruptError(f"shard {self.path.name}: tensor {name!r} is not the size the manifest says")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + lo)
            got = 0
            while got < view.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise StoreCorruptError(f"shard {self.path.name} ended early; run `interp store verify`")
                got += n



def _to_torch(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(arr)
    return t.view(dtype) if t.dtype != dtype else t


# ----------------------------------------------------------------------------------------------- lock


class _Lock:
    """The single-writer lock: ``.lock`` holds the owner's pid, host and start time.

    A lock left by a process that no longer exists on this host (a writer killed with SIGKILL) is stale and
    taken over, so a crashed capture can resume; a live owner's lock is refused with its details.
    """

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._alive(owner):
                    raise StoreLockedError(
                        f"store is locked by {self.path} (pid {owner.get('pid')} on {owner.get('host')} since "
                        f"{owner.get('since')}): another writer is using it; wait for it to finish, or delete "
                        f"{self.path} if that process is gone"
                    ) from None
                try:  # stale: its owner died
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise StoreLockedError(f"could not take the lock {self.path}; delete it if no writer is running")

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None  # unreadable: half-written by a writer that died while taking it

    @staticmethod
    def _alive(owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot tell for another host: assume it is alive
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- writer


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
    ):
        self.path = Path(path)
        self.dtype_name, self.dtype = dtype_from_name(dtype)
        if not hooks:
            raise ConfigError("a store needs at least one hook")
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory: choose another --out path")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / MANIFEST).exists():
            raise StoreError(
                f"{self.path} is a non-empty directory that is not an activation store: choose an empty or new"
                " --out path"
            )
        settings = {
            "hooks": list(hooks),
            "d_model": int(d_model),
            "dtype": self.dtype_name,
            "positions": positions,
            "has_token_labels": bool(has_token_labels),
        }
        self.shard_bytes = int(shard_bytes)
        self._lock = _Lock(self.path)
        created_dir = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
            manifest_path = self.path / MANIFEST
            if manifest_path.exists():
                manifest = _load_manifest(self.path)
                old = {k: manifest.get(k) for k in settings}
                if not resume:
                    raise StoreError(f"{self.path} already holds a store; choose a new --out path or delete it")
                if old != settings or (model and manifest.get("model", {}).get("name") != model.get("name")):
                    raise StoreError(
                        f"{self.path} holds a store made with other settings ({_diff(old, settings)}); "
                        "resume with the same settings or choose a new --out path"
                    )
                self.manifest = manifest
                self._truncate_examples(manifest["examples_bytes"])
            else:
                self.manifest = {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "created": _now(),
                    "model": dict(model or {}),
                    **settings,
                    "hook_aliases": dict(hook_aliases or {}),
                    "dataset": dict(dataset or {}),
                    "n_examples": 0,
                    "n_rows": 0,
                    "examples_bytes": 0,
                    "complete": False,
                    "shards": [],
                }
                (self.path / EXAMPLES).write_bytes(b"")
                atomic_write_json(manifest_path, self.manifest)
        except BaseException:
            self._lock.release()
            if created_dir:
                _remove_quietly(self.path)
            raise
        self.hooks = list(hooks)
        self.d_model = int(d_model)
        self.has_token_labels = bool(has_token_labels)
        self._buf_acts: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        self._buf_meta: dict[str, list[Tensor]] = {k: [] for k in META_TENSORS}
        self._buf_examples: list[bytes] = []
        self._buf_bytes = 0
        self._closed = False

    @property
    def next_example(self) -> int:
        """Index of the first example not yet committed (examples are numbered from 0 in dataset order)."""
        return int(self.manifest["n_examples"]) + len(self._buf_examples)

    def _truncate_examples(self, committed: int) -> None:
        p = self.path / EXAMPLES
        if p.exists() and p.stat().st_size != committed:
            with open(p, "r+b") as f:
                f.truncate(committed)
                f.flush()
                os.fsync(f.fileno())

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
        eid = self.next_example
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
            line = {"example_id": eid + i, **{k: v for k, v in example.items() if k != "example_id"}}
            self._buf_examples.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
        if self._buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered examples as one shard (no-op when nothing is buffered)."""
        if not self._buf_examples:
            return
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
        self.manifest["shards"].append(
            {
                "file": name,
                "rows": rows,
                "examples": [first, first + n_new],
                "bytes": nbytes,
                "sha256": digest,
            }
        )
        self.manifest["n_examples"] = first + n_new
        self.manifest["n_rows"] = int(self.manifest["n_rows"]) + rows
        self.manifest["examples_bytes"] = int(self.manifest["examples_bytes"]) + sum(map(len, self._buf_examples))
        atomic_write_json(self.path / MANIFEST, self.manifest)
        self._buf_acts = {h: [] for h in self.hooks}
        self._buf_meta = {k: [] for k in META_TENSORS}
        self._buf_examples = []
        self._buf_bytes = 0

    def close(self, complete: bool = True) -> None:
        """Flush, mark the store complete (when ``complete``), and release the lock."""
        if self._closed:
            return
        try:
            self.flush()
            if complete:
                self.manifest["complete"] = True
                self.manifest["completed"] = _now()
                atomic_write_json(self.path / MANIFEST, self.manifest)
        finally:
            self._closed = True
            self._lock.release()

    def abort(self) -> None:
        """Release the lock without committing what is buffered; committed shards stay readable."""
        self._closed = True
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in new if old.get(k) != new.get(k))


def _remove_quietly(path: Path) -> None:
    try:
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    except OSError:
        pass


def _load_manifest(path: Path) -> dict[str, Any]:
    mp = path / MANIFEST
    try:
        manifest = json.loads(mp.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is not an activation store (no {MANIFEST}); capture into it first") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"{mp} is damaged ({e}); the store cannot be read") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{mp} is not an interp activation store manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(
            f"{path} uses store format version {manifest.get('version')}; this interp reads version {FORMAT_VERSION}"
        )
    for shard in manifest.get("shards", []):
        name = shard.get("file", "")
        if not isinstance(name, str) or not SHARD_RE.fullmatch(name):
            raise StoreCorruptError(
                f"{mp} names shard file {name!r}, which is not a shard-NNNNNN.safetensors file inside the store;"
                " refusing to read outside the store directory"
            )
    return manifest


# ----------------------------------------------------------------------------------------------- reader


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: OK ({self.shards_checked} shards, every sha256 matches)"
        return f"{self.path}: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


class ActivationStore:
    """A read-only view of a store directory. Opening reads the manifest only; shards are memory-mapped lazily.

    >>> store = ActivationStore("runs/capitals")
    >>> X = store.activations("blocks.3.hook_resid_post")      # [rows, d_model], aliases accepted
    >>> y = store.labels()                                      # [rows], example label of each row
    >>> train, test = store.train_test_split()                  # row indices, grouped by example
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory")
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}: check the path, or capture one with `interp capture`")
        self.manifest = _load_manifest(self.path)
        self.hooks: list[str] = list(self.manifest["hooks"])
        self.d_model: int = int(self.manifest["d_model"])
        self.dtype_name, self.dtype = dtype_from_name(self.manifest["dtype"])
        self._shards: dict[int, _Shard] = {}
        bounds = np.cumsum([0] + [int(s["rows"]) for s in self.manifest["shards"]])
        self._bounds = bounds  # shard i holds global rows [bounds[i], bounds[i+1])
        self._meta_cache: dict[str, Tensor] = {}
        self._examples: list[dict[str, Any]] | None = None

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
    def _shard(self, i: int) -> _Shard:
        if i not in self._shards:
            self._shards[i] = _Shard(self.path / self.manifest["shards"][i]["file"])
        return self._shards[i]

    def _read_rows(self, name: str, rows: Tensor | np.ndarray | None) -> Tensor:
        """Rows of tensor ``name`` across shards, copied once from the memory maps into one new array."""
        n_shards = len(self.manifest["shards"])
        if n_shards == 0:
            return self._empty(name)
        np_dtype, tail, dtype = self._spec(name)
        if rows is None:
            out = np.empty((len(self), *tail), dtype=np_dtype)
            for i in range(n_shards):  # whole tensors: one sequential read each, straight into place
                self._shard(i).read_into(name, out[self._bounds[i] : self._bounds[i + 1]])
            return _to_torch(out, dtype)
        rows_np = np.asarray(rows, dtype=np.int64).reshape(-1)
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
        return _to_torch(out, dtype)

    def _spec(self, name: str) -> tuple[np.dtype, tuple[int, ...], torch.dtype]:
        """numpy dtype, per-row shape and torch dtype of a stored tensor, from the manifest alone."""
        if name in self.hooks:
            st = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[self.dtype_name]
            return _ST_DTYPES[st][0], (self.d_model,), self.dtype
        st = {"example_id": "I64", "token_label": "I8"}.get(name, "I32")
        return _ST_DTYPES[st][0], (), _ST_DTYPES[st][1]

    def _empty(self, name: str) -> Tensor:
        if name in self.hooks:
            return torch.empty((0, self.d_model), dtype=self.dtype)
        return torch.empty((0,), dtype={"example_id": torch.int64, "token_label": torch.int8}.get(name, torch.int32))

    def activations(
        self, hook: str | int, rows: Int[Tensor, " n"] | Sequence[int] | None = None
    ) -> Float[Tensor, "n d_model"]:
        """Activations of one hook, in the store's dtype: every row, or the given row indices (in that order)."""
        return self._read_rows(self.resolve_hook(hook), None if rows is None else torch.as_tensor(rows))

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
        """The committed examples' metadata lines, in example_id order."""
        if self._examples is None:
            n = int(self.manifest["examples_bytes"])
            try:
                with open(self.path / EXAMPLES, "rb") as f:
                    raw = f.read(n)
            except FileNotFoundError:
                raise StoreCorruptError(f"{self.path / EXAMPLES} is missing; the store is damaged") from None
            if len(raw) != n:
                raise StoreCorruptError(f"{self.path / EXAMPLES} is shorter than the manifest says; store damaged")
            self._examples = [json.loads(line) for line in raw.decode().splitlines() if line]
        return self._examples

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
        order = torch.arange(len(self)) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
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
        except StoreError:
            pass
        return info

    def verify(self) -> VerifyReport:
        """Check every committed shard's existence, size, header and sha256, and examples.jsonl's length."""
        report = VerifyReport(self.path, 0)
        total_rows = 0
        for i, s in enumerate(self.manifest["shards"]):
            p = self.path / s["file"]
            report.shards_checked += 1
            if not p.exists():
                report.problems.append(f"{s['file']}: missing")
                continue
            size = p.stat().st_size
            if "bytes" in s and size != int(s["bytes"]):
                report.problems.append(f"{s['file']}: {size} bytes on disk, manifest says {s['bytes']} (truncated?)")
            digest = sha256_file(p)
            if digest != s["sha256"]:
                report.problems.append(f"{s['file']}: sha256 mismatch (bytes changed on disk)")
            try:
                shard = _Shard(p)
                names = set(shard.names())
                for h in self.hooks + ["example_id", "position", "token_id"]:
                    if h not in names:
                        report.problems.append(f"{s['file']}: tensor {h!r} missing")
                rows = shard.header["example_id"]["shape"][0] if "example_id" in names else -1
                if rows != int(s["rows"]):
                    report.problems.append(f"{s['file']}: {rows} rows, manifest says {s['rows']}")
                total_rows += int(s["rows"])
            except StoreCorruptError as e:
                if digest == s["sha256"]:
                    report.problems.append(str(e))
        ex = self.path / EXAMPLES
        if not ex.exists() or ex.stat().st_size < int(self.manifest["examples_bytes"]):
            report.problems.append(f"{EXAMPLES}: missing or shorter than the manifest says")
        else:
            try:
                n = len(self.examples())
                if n != self.n_examples:
                    report.problems.append(f"{EXAMPLES}: {n} examples, manifest says {self.n_examples}")
            except (ValueError, StoreError) as e:
                report.problems.append(f"{EXAMPLES}: unreadable ({e})")
        return report

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
        n = int(acts[hooks[0]].shape[0])
        d = int(acts[hooks[0]].shape[1])
        for h, a in acts.items():
            if tuple(a.shape) != (n, d):
                raise ConfigError(f"hook {h}: shape {list(a.shape)} differs from {[n, d]}")
        if examples is None:
            lab = labels.tolist() if isinstance(labels, Tensor) else list(labels) if labels is not None else None
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
