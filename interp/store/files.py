"""Files of a store: atomic writes, hashing, and safetensors shards written streaming and read defensively.

Every header is parsed as hostile input: its length, JSON, dtypes, shapes and offsets are checked against the
file's size before anything is mapped, with Python integers (no overflow), so a damaged or crafted shard is a
one-line :class:`StoreCorruptError`, never an out-of-bounds read or a huge allocation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interp.errors import StoreCorruptError

MAX_HEADER = 16 * 2**20  # a store's headers are a few KiB; a larger one is damage, not worth allocating for
ST_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
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
TORCH_TO_ST = {t: name for name, (_, t) in ST_DTYPES.items()}


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temp file a write to ``path`` goes through (``.NAME.tmp-PID``); writers clean leftovers by this form."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new contents to (fsync'd by the caller); on success it replaces
    ``path`` atomically, on failure (disk full, no permission, an exception) it is removed."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with replacing(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_safetensors(path: Path, tensors: Mapping[str, Sequence[Tensor]], metadata: Mapping[str, str]) -> tuple[int, str]:
    """Write a safetensors file atomically from tensors given as lists of row chunks (concatenated on disk,
    never in memory), hashing while writing. Returns ``(bytes written, sha256)``."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, parts in tensors.items():
        first = parts[0]
        shape = [sum(int(p.shape[0]) for p in parts), *first.shape[1:]]
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        header[name] = {"dtype": TORCH_TO_ST[first.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    h = hashlib.sha256()
    with replacing(path) as tmp, open(tmp, "wb") as f:
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
    return 8 + len(raw) + offset, h.hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header: ``({name: {dtype, shape, data_offsets}}, data_start)``.

    Checks what a memory map would otherwise trip over later: header length, JSON, dtypes, shapes, offsets
    inside the file and a file exactly as long as the header says (a truncated shard fails here, by name).
    """
    name = path.name
    try:
        if not path.is_file():
            if path.exists():
                raise StoreCorruptError(f"shard {path} is not a regular file; the store is damaged: recapture it")
            raise StoreCorruptError(f"shard {path} is missing: the store is damaged; recapture or restore it")
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {hlen} does not fit in a {size}-byte file")
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise StoreCorruptError(f"shard {path} cannot be read ({e.strerror}); check the store's files") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StoreCorruptError(f"shard {name} has a damaged header ({str(e)[:120]}); run `interp store verify`") from None
    if not isinstance(header, dict):
        raise StoreCorruptError(f"shard {name} has a damaged header; run `interp store verify`")
    header.pop("__metadata__", None)
    data_start = 8 + hlen
    end = 0
    for tname, spec in header.items():
        bad = f"shard {name}: tensor {tname!r} has a damaged header entry"
        if not isinstance(spec, dict):
            raise StoreCorruptError(bad)
        st_dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(st_dtype, str) or st_dtype not in ST_DTYPES:
            raise StoreCorruptError(f"shard {name}: tensor {tname!r} has unsupported dtype {str(st_dtype)[:20]}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
            raise StoreCorruptError(f"{bad} (shape {str(shape)[:60]})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise StoreCorruptError(f"{bad} (offsets)")
        lo, hi = offsets
        nbytes = ST_DTYPES[st_dtype][0].itemsize
        for d in shape:  # Python ints: a crafted 2**32 x 2**32 shape cannot wrap around
            nbytes *= d
        if lo < 0 or hi - lo != nbytes or data_start + hi > size:
            raise StoreCorruptError(f"shard {name}: tensor {tname!r} offsets disagree with its shape or the file size")
        end = max(end, hi)
    if data_start + end != size:
        raise StoreCorruptError(
            f"shard {name} is truncated or padded: {size} bytes on disk, header needs {data_start + end};"
            " run `interp store verify` and recapture the damaged shard"
        )
    return header, data_start


class Shard:
    """One shard: its checked header, whole-tensor sequential reads, and numpy memory maps for row gathers."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = read_header(path)
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self.header)

    def check(self, expected: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        """Raise unless every tensor ``name -> (dtype, shape)`` in ``expected`` is in the header as given."""
        for tname, (st, shape) in expected.items():
            spec = self.header.get(tname)
            if spec is None:
                raise StoreCorruptError(
                    f"shard {self.path.name} has no tensor {tname!r}: the store is damaged; run `interp store verify`"
                )
            if spec["dtype"] != st or tuple(spec["shape"]) != tuple(shape):
                raise StoreCorruptError(
                    f"shard {self.path.name}: tensor {tname!r} is {spec['dtype']} {spec['shape']}, the manifest says"
                    f" {st} {list(shape)}; the shard does not belong here: run `interp store verify`"
                )

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            spec = self.header[name]
            np_dtype, _ = ST_DTYPES[spec["dtype"]]
            lo, _hi = spec["data_offsets"]
            shape = tuple(spec["shape"])
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype=np_dtype)
            self._maps[name] = np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.data_start + lo, shape=shape)
        return self._maps[name]

    def array(self, name: str) -> np.ndarray:
        """The memory map of tensor ``name`` (numpy; bfloat16 shows as uint16 bits)."""
        if name not in self.header:
            raise StoreCorruptError(f"shard {self.path.name} has no tensor {name!r}: the store is damaged")
        try:
            return self._map(name)
        except OSError as e:
            raise StoreCorruptError(f"shard {self.path.name} cannot be mapped ({e.strerror})") from None

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read the whole tensor ``name`` into ``out`` (C-contiguous, right size) with plain sequential reads."""
        if name not in self.header:
            raise StoreCorruptError(f"shard {self.path.name} has no tensor {name!r}: the store is damaged")
        lo, hi = self.header[name]["data_offsets"]
        view = memoryview(out).cast("B")
        if view.nbytes != hi - lo:
            raise StoreCorruptError(f"shard {self.path.name}: tensor {name!r} is not the size the manifest says")
        self._read_at(name, lo, view)

    def read_rows_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Read rows ``start .. start + len(out)`` of tensor ``name`` into ``out`` with plain reads: no memory map,
        so the pages read do not stay resident in the process (streaming reads of stores larger than memory)."""
        if name not in self.header:
            raise StoreCorruptError(f"shard {self.path.name} has no tensor {name!r}: the store is damaged")
        spec = self.header[name]
        lo, hi = spec["data_offsets"]
        n_rows = int(spec["shape"][0]) if spec["shape"] else 0
        view = memoryview(out).cast("B")
        row_bytes = (hi - lo) // n_rows if n_rows else 0
        if start < 0 or start * row_bytes + view.nbytes > hi - lo or view.nbytes % max(row_bytes, 1):
            raise StoreCorruptError(f"shard {self.path.name}: rows {start}+ of {name!r} are outside the tensor")
        self._read_at(name, lo + start * row_bytes, view)

    def _read_at(self, name: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` from the tensor data at byte ``offset`` (from the start of the data section)."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + offset)
                got = 0
                while got < view.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise StoreCorruptError(f"shard {self.path.name} ended early; run `interp store verify`")
                    got += n
        except OSError as e:
            raise StoreCorruptError(f"shard {self.path.name} cannot be read ({e.strerror})") from None


def to_torch(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(arr)
    return t.view(dtype) if t.dtype != dtype else t
