"""Activation stores: activations on disk as sharded safetensors (store format version 1).

A store is a directory::

    manifest.json                 the single commit point: written last, atomically (temp + fsync + rename)
    examples.jsonl                one line per example; its first ``examples_bytes`` bytes are committed, sha256'd
    shard-000000.safetensors      one file per shard, committed atomically, never rewritten, sha256'd
    .lock                         held by the single writer (flock; pid, host and start time inside)
    .parts/                       only during a distributed capture: one part store per rank (docs/scale.md)
    verified.json                 optional sidecar: when ``verify`` last ran, and its result

Each shard holds, for ``rows`` token positions, one ``[rows, d_model]`` tensor per hook (named by its canonical
TransformerLens hook name), ``example_id`` int64, ``position`` int32, ``token_id`` int32 and optionally
``token_label`` int8. A shard belongs to the store only once the manifest names it, so a writer that dies
leaves the store readable up to its last committed shard and a new writer resumes from there.

Modules: :mod:`~interp.store.names` (dtypes, hook names), :mod:`~interp.store.files` (atomic writes,
safetensors I/O), :mod:`~interp.store.manifest` (the manifest and its checks), :mod:`~interp.store.lock`
(the writer lock), :mod:`~interp.store.writer` (StoreWriter), :mod:`~interp.store.reader` (ActivationStore).
"""

from interp.store.files import Shard, atomic_write_bytes, atomic_write_json, read_header, sha256_file, write_safetensors
from interp.store.lock import LOCK, WriterLock
from interp.store.manifest import (
    EXAMPLES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, SHARD_RE, VERIFIED, example_line, lines_sha256, load_manifest,
)
from interp.store.names import DTYPES, dtype_from_name, layer_of, static_canonical
from interp.store.reader import ActivationStore, Batch, VerifyReport
from interp.store.writer import META_TENSORS, PARTS, StoreWriter, prune_parts

_read_header = read_header  # the name bench/capture.py uses

__all__ = [
    "ActivationStore", "Batch", "DTYPES", "EXAMPLES", "FORMAT_NAME", "FORMAT_VERSION", "LOCK", "MANIFEST",
    "META_TENSORS", "PARTS", "SHARD_RE", "Shard", "StoreWriter", "VERIFIED", "VerifyReport", "WriterLock",
    "atomic_write_bytes", "atomic_write_json", "dtype_from_name", "example_line", "layer_of", "lines_sha256",
    "load_manifest", "prune_parts", "read_header", "sha256_file", "static_canonical", "write_safetensors",
]
