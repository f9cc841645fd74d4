"""Damage done to a store, and how to tell a clear error from a traceback or a silent wrong answer.

Shared by tests/test_store_damage.py (one test per kind) and bench/store_trials.py (the table in docs/store.md).
Each damage function takes a fresh store directory (``make_store``) and damages it as a user's disk, editor
or a hostile file could.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from interp.errors import InterpError
from interp.store import ActivationStore, StoreWriter

HOOK = "blocks.0.hook_out"
D = 384
N = 8


def make_store(path: Path) -> ActivationStore:
    """8 one-row examples, labels 0/1 alternating, 4 shards of 2 rows, d_model 384, float32; row i is all i."""
    acts = np.repeat(np.arange(N, dtype=np.float32)[:, None], D, axis=1)
    examples = [{"id": i, "text": f"text number {i}", "label": i % 2} for i in range(N)]
    return ActivationStore.from_tensors(path, {HOOK: acts}, examples=examples, shard_bytes=2 * D * 4)


def expected_acts() -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32)[:, None].expand(N, D)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    m = _manifest(path)
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite shard 1's JSON header (edited), keeping its data bytes."""
    f = path / "shard-000001.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _flip_examples(path: Path, old: bytes, new: bytes) -> None:
    p = path / "examples.jsonl"
    p.write_bytes(p.read_bytes().replace(old, new, 1))


def _swap(path: Path) -> None:
    a, b = path / "shard-000000.safetensors", path / "shard-000002.safetensors"
    tmp = path / "tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _shard_dir(path: Path) -> None:
    (path / "shard-000001.safetensors").unlink()
    (path / "shard-000001.safetensors").mkdir()


def _data_bytes(path: Path) -> None:
    f = path / "shard-000001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x40  # inside the activations of the last row
    f.write_bytes(bytes(raw))


def _examples_bytes_digit(m: dict) -> None:
    m["examples_bytes"] = int(str(m["examples_bytes"])[:-1] + str((m["examples_bytes"] % 10 + 3) % 10))


def _lock_dir(path: Path) -> None:
    (path / ".lock").mkdir()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "manifest not JSON": lambda p: (p / "manifest.json").write_text("{not json"),
    "manifest truncated": lambda p: (p / "manifest.json").write_bytes((p / "manifest.json").read_bytes()[:50]),
    "manifest shards is a string": lambda p: _edit_manifest(p, lambda m: m.update(shards="shard-000000.safetensors")),
    "manifest shard entry is a string": lambda p: _edit_manifest(p, lambda m: m["shards"].__setitem__(0, "x")),
    "manifest shard lacks rows": lambda p: _edit_manifest(p, lambda m: m["shards"][0].pop("rows")),
    "manifest lacks hooks": lambda p: _edit_manifest(p, lambda m: m.pop("hooks")),
    "manifest examples_bytes digit": lambda p: _edit_manifest(p, _examples_bytes_digit),
    "manifest examples_bytes huge": lambda p: _edit_manifest(p, lambda m: m.update(examples_bytes=10**15)),
    "manifest rows huge (totals consistent)": lambda p: _edit_manifest(
        p, lambda m: (m["shards"][0].update(rows=10**12), m.update(n_rows=m["n_rows"] - 2 + 10**12))),
    "manifest entry names another's file": lambda p: _edit_manifest(
        p, lambda m: m["shards"][1].update(file=m["shards"][0]["file"])),
    "examples.jsonl first byte broken": lambda p: _flip_examples(p, b"{", b"["),
    "examples.jsonl truncated": lambda p: (p / "examples.jsonl").write_bytes((p / "examples.jsonl").read_bytes()[:-30]),
    "examples.jsonl non-UTF-8 byte": lambda p: _flip_examples(p, b"text number 3", b"text n\xffmber 3"),
    "examples.jsonl label flipped": lambda p: _flip_examples(p, b'"label": 1', b'"label": 0'),
    "examples.jsonl text letter changed": lambda p: _flip_examples(p, b"text number 5", b"text numbex 5"),
    "two shards swapped": _swap,
    "shard replaced by a directory": _shard_dir,
    "shard header shape 2^32 x 2^32": lambda p: _rewrite_header(p, lambda h: h[HOOK].update(shape=[2**32, 2**32])),
    "shard header negative shape": lambda p: _rewrite_header(p, lambda h: h[HOOK].update(shape=[-2, D])),
    "shard header d=383 against 384": lambda p: _rewrite_header(
        p, lambda h: h[HOOK].update(shape=[2, D - 1], data_offsets=[h[HOOK]["data_offsets"][0],
                                                                      h[HOOK]["data_offsets"][0] + 2 * (D - 1) * 4])),
    "shard data bytes changed": _data_bytes,
    "shard truncated": lambda p: (p / "shard-000001.safetensors").write_bytes(
        (p / "shard-000001.safetensors").read_bytes()[:-64]),
    ".lock is a directory": _lock_dir,
}


def one_line(e: BaseException) -> bool:
    return isinstance(e, InterpError) and "\n" not in str(e) and len(str(e)) < 600


def check_damaged(path: Path) -> tuple[str, str]:
    """Run every entry point on a damaged store. Returns (outcome, detail) with outcome ``clear`` (every entry
    point either answers correctly or raises a one-line InterpError, and the damage is reported by ``verify``
    or at open, and refused by a checked open), ``traceback`` (some other exception) or ``silent``."""
    errors: list[str] = []
    wrong: list[str] = []

    def attempt(name: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except InterpError as e:
            if not one_line(e):
                raise AssertionError(f"{name}: multi-line error {e!r}") from None
            errors.append(f"{name}: {e}")
            return e
        # anything else propagates: a traceback

    try:
        store = attempt("open", lambda: ActivationStore(path))
        detected = isinstance(store, InterpError)
        if not detected:
            assert isinstance(store, ActivationStore)
            attempt("info", store.info)
            x = attempt("activations", lambda: store.activations(HOOK))
            if isinstance(x, torch.Tensor) and not torch.equal(x, expected_acts()):
                wrong.append("activations")
            attempt("rows", lambda: store.activations(HOOK, rows=[1, 6]))
            attempt("batches", lambda: next(store.iter_batches(batch_size=4, shuffle=True)))
            ex = attempt("examples", store.examples)
            if isinstance(ex, list) and [(e.get("text"), e.get("label")) for e in ex] != [
                    (f"text number {i}", i % 2) for i in range(N)]:
                wrong.append("examples")
            attempt("labels", store.labels)
            report = attempt("verify", store.verify)
            detected = isinstance(report, InterpError) or not report.ok
        checked = attempt("checked open", lambda: ActivationStore(path, verify=True))
        refused = isinstance(checked, InterpError)
        writer = attempt("resume", lambda: StoreWriter(path, hooks=[HOOK], d_model=D, dtype="float32",
                                                       positions="mean"))
        if isinstance(writer, StoreWriter):
            writer.abort()
    except AssertionError as e:
        return "traceback", str(e)
    except Exception as e:  # noqa: BLE001 - classifying, not handling
        return "traceback", f"{type(e).__name__}: {e}"
    lock_case = (path / ".lock").is_dir()
    if lock_case:  # readers need no lock; a writer must refuse it in one line
        ok = any(m.startswith("resume:") and ".lock" in m for m in errors)
        return ("clear" if ok else "silent"), "; ".join(errors)
    if not detected or not refused:
        return "silent", f"verify/open did not report it; wrong reads: {wrong}"
    return "clear", errors[0] if errors else ""


def run_damage(kind: str, root: Path) -> tuple[str, str]:
    path = root / kind.replace(" ", "_").replace("/", "_").replace("^", "")
    if path.exists():
        shutil.rmtree(path)
    make_store(path)
    DAMAGE[kind](path)
    return check_damaged(path)


def classify(fn: Callable[[], object], expect: type[BaseException] = InterpError) -> tuple[str, str]:
    """``clear`` when ``fn`` raises a one-line ``expect``; ``traceback`` for any other exception; ``silent``."""
    try:
        fn()
    except expect as e:
        return ("clear" if one_line(e) else "traceback"), str(e)
    except Exception as e:  # noqa: BLE001
        return "traceback", f"{type(e).__name__}: {e}"
    return "silent", "accepted without a word"


__all__ = ["DAMAGE", "HOOK", "D", "N", "make_store", "check_damaged", "run_damage", "classify", "one_line", "os"]


# ----------------------------------------------------------------------------------------------- processes


def lock_races(root: Path, n: int, new_store: bool) -> list[int]:
    """``n`` races of two real processes for one store's writer; returns how many won each race.

    Both processes meet at a barrier, then both try at once: a bare ``WriterLock`` on an existing directory,
    or (``new_store``) a ``StoreWriter`` creating a new store. Winners hold until both have tried; a winning
    writer then commits one example so the store can be checked afterwards.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    wins = ctx.Array("i", n)
    root.mkdir(parents=True, exist_ok=True)
    if not new_store:
        for i in range(n):
            (root / f"race-{i}").mkdir(exist_ok=True)
    procs = [ctx.Process(target=_racer, args=(root, n, new_store, barrier, wins, k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        if p.exitcode != 0:
            raise RuntimeError(f"a racing process failed (exit {p.exitcode})")
    return list(wins)


def _racer(root: Path, n: int, new_store: bool, barrier, wins, k: int) -> None:
    from interp.errors import StoreLockedError
    from interp.store import WriterLock

    for i in range(n):
        d = root / f"race-{i}"
        barrier.wait()
        held = None
        try:
            if new_store:
                held = StoreWriter(d, hooks=[HOOK], d_model=4, dtype="float32", positions="mean")
            else:
                held = WriterLock(d)
                held.acquire()
        except StoreLockedError:
            held = None
        if held is not None:
            with wins.get_lock():
                wins[i] += 1
        barrier.wait()  # both have tried while any winner still holds
        if isinstance(held, StoreWriter):
            held.add_example({"id": k, "text": f"writer {k}", "label": k}, {HOOK: torch.full((1, 4), float(k))},
                             torch.zeros(1), torch.zeros(1))
            held.close()
        elif held is not None:
            held.release()
        barrier.wait()


def fingerprint(path: Path) -> dict[str, object]:
    """What must be equal between two captures of the same data: every shard's and examples.jsonl's sha256,
    the manifest without its timestamps, and the list of files (the verify sidecar aside)."""
    import hashlib

    out: dict[str, object] = {}
    for f in sorted(path.iterdir()):
        if f.name == "verified.json":
            continue
        if f.name == "manifest.json":
            m = json.loads(f.read_text())
            for k in ("created", "completed"):
                m.pop(k, None)
            out[f.name] = m
        else:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return out


KILL_RUNNER = r"""
import os, signal, sys, time
import interp.capture, interp.model  # the heavy imports, before the start line
kill_at = int(sys.argv[1]); steps = [0]; delay = float(os.environ.get("STEP_DELAY", "0"))
if "--model" in sys.argv:  # load the model before the start line, so two runners start capturing together
    model = interp.model.load_model(sys.argv[sys.argv.index("--model") + 1], device="cpu")
    interp.model.load_model = lambda *a, **k: model
def counted(fn):
    def wrapper(*a, **k):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(delay)
        return fn(*a, **k)
    return wrapper
for name in ("mkdir", "ftruncate", "fsync", "replace"):
    setattr(os, name, counted(getattr(os, name)))
go = os.environ.get("GO_FILE")
while go and not os.path.exists(go):
    time.sleep(0.01)
from interp.cli import main
rc = main(sys.argv[2:])
sys.stderr.write(f"steps={steps[0]}\n")
sys.exit(rc)
"""


def capture_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["capture", "--model", str(model), "--dataset", str(data), "--out", str(out), "--positions", "all",
            "--batch-size", "4", "--shard-mb", "0.01", "--dtype", "float32", "--device", "cpu", "--quiet"]


def run_capture_process(model: Path, data: Path, out: Path, kill_at: int = 0, wait: bool = True,
                        go_file: Path | None = None, step_delay: float = 0.0):
    """``interp capture`` in a child process that SIGKILLs itself before its ``kill_at``-th filesystem step
    (mkdir, ftruncate, fsync or replace; 0: never). With ``go_file`` it starts capturing only once that file
    exists (so two processes start together); ``step_delay`` slows every step (so two runs overlap).
    Returns the finished process or, without ``wait``, the Popen."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
           "GO_FILE": str(go_file or ""), "STEP_DELAY": str(step_delay)}
    cmd = [sys.executable, "-c", KILL_RUNNER, str(kill_at), *capture_args(model, data, out)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def write_dataset(path: Path, n: int = 24) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Example {i}: the sky over town {i} is {'blue' if i % 2 else 'grey'}.",
                                "label": i % 2}) + "\n")
    return path
