"""The manifest: a store's single commit point, parsed as hostile input.

Every file a store depends on is named in the manifest with its sha256 (each shard; ``examples.jsonl``'s
committed prefix as ``examples_bytes`` + ``examples_sha256``) and is written before it. A manifest that is not
valid JSON, or whose fields have the wrong types, ranges or sums, is a one-line :class:`StoreCorruptError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from interp.errors import StoreCorruptError, StoreError
from interp.store.names import DTYPES

FORMAT_NAME = "interp.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
VERIFIED = "verified.json"  # sidecar written by verify(): when the store was last checked, and the result
SHARD_RE = re.compile(r"shard-\d{6}\.safetensors")
TEMP_RE = re.compile(r"\..+\.tmp-\d+")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST = 64 * 2**20


def example_line(example_id: int, record: Mapping[str, Any]) -> bytes:
    """The exact bytes of one example's line in ``examples.jsonl``."""
    line = {"example_id": example_id, **{k: v for k, v in record.items() if k != "example_id"}}
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def lines_sha256(lines: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line)
    return h.hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest(m: Any, mp: Path) -> dict[str, Any]:
    """Check every field a reader or writer relies on; return the manifest (with defaults for optional fields)."""

    def bad(what: str) -> StoreCorruptError:
        return StoreCorruptError(f"{mp} is damaged ({what}); restore the store from a copy or recapture it")

    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise StoreError(f"{mp} is not an interp activation store manifest")
    if m.get("version") != FORMAT_VERSION:
        raise StoreError(f"{mp.parent} uses store format version {str(m.get('version'))[:20]}; this interp reads"
                         f" version {FORMAT_VERSION}")
    hooks = m.get("hooks")
    if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) and h for h in hooks):
        raise bad("'hooks' must be a non-empty list of hook names")
    if len(set(hooks)) != len(hooks):
        raise bad("'hooks' repeats a name")
    if not _is_int(m.get("d_model")) or m["d_model"] <= 0:
        raise bad("'d_model' must be a positive integer")
    if m.get("dtype") not in DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(DTYPES)}")
    if not isinstance(m.get("positions"), str):
        raise bad("'positions' must be a string")
    for k in ("n_examples", "n_rows", "examples_bytes"):
        if not _is_int(m.get(k)) or m[k] < 0:
            raise bad(f"{k!r} must be a non-negative integer")
    sha = m.get("examples_sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA_RE.fullmatch(sha)):
        raise bad("'examples_sha256' is not a sha256")
    for k in ("model", "dataset", "hook_aliases"):
        m.setdefault(k, {})
        if not isinstance(m[k], dict):
            raise bad(f"{k!r} must be an object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m["hook_aliases"].items()):
        raise bad("'hook_aliases' must map names to names")
    for k in ("complete", "has_token_labels"):
        m.setdefault(k, False)
        if not isinstance(m[k], bool):
            raise bad(f"{k!r} must be true or false")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("'shards' must be a list")
    seen: set[str] = set()
    rows = first = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise bad(f"shard entry {i} is not an object")
        name = s.get("file")
        if not isinstance(name, str) or not SHARD_RE.fullmatch(name):
            raise StoreCorruptError(
                f"{mp} names shard file {str(name)[:80]!r}, which is not a shard-NNNNNN.safetensors file inside the"
                " store; refusing to read outside the store directory"
            )
        if name in seen:
            raise bad(f"two shard entries name {name}")
        seen.add(name)
        if not _is_int(s.get("rows")) or s["rows"] < 0:
            raise bad(f"shard {name}: 'rows' must be a non-negative integer")
        ex = s.get("examples")
        if not (isinstance(ex, list) and len(ex) == 2 and all(_is_int(e) for e in ex) and ex[0] == first <= ex[1]):
            raise bad(f"shard {name}: 'examples' must be the range [{first}, end) following the previous shard")
        if "bytes" in s and (not _is_int(s["bytes"]) or s["bytes"] < 0):
            raise bad(f"shard {name}: 'bytes' must be a non-negative integer")
        if not (isinstance(s.get("sha256"), str) and _SHA_RE.fullmatch(s["sha256"])):
            raise bad(f"shard {name}: 'sha256' is not a sha256")
        rows += s["rows"]
        first = ex[1]
    if rows != m["n_rows"] or first != m["n_examples"]:
        raise bad(f"the shards hold {rows} rows of {first} examples, the manifest says {m['n_rows']} of {m['n_examples']}")
    return m


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and check ``path/manifest.json``."""
    mp = path / MANIFEST
    try:
        if mp.is_dir() or (mp.exists() and mp.stat().st_size > MAX_MANIFEST):
            raise StoreCorruptError(f"{mp} is not a manifest file (a directory, or too large); the store is damaged")
        manifest = json.loads(mp.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path} is not an activation store (no {MANIFEST}); capture into it first") from None
    except OSError as e:
        raise StoreError(f"cannot read {mp} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StoreCorruptError(f"{mp} is damaged ({str(e)[:100]}); the store cannot be read") from None
    return check_manifest(manifest, mp)
