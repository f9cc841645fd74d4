"""Store robustness trials (issue 13): the table in docs/store.md.

Real processes where the case is about processes: lock races between two processes (200 on an existing
store's lock, 200 creating a new store), `interp capture` SIGKILLed at 20 moments spread over a capture and
rerun, two concurrent captures and two concurrent resumes; then every damage kind of tests/store_cases.py
and every bad input below, each classified as a clear one-line error, a traceback, or silently accepted.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/store_trials.py [--races 200] [--kills 20] [--concurrent 2]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import interp.store.writer as writer_mod  # noqa: E402
from interp.capture import TruncationWarning, capture  # noqa: E402
from interp.cli import main  # noqa: E402
from interp.errors import InterpError  # noqa: E402
from interp.model import load_model  # noqa: E402
from interp.store import ActivationStore, StoreWriter  # noqa: E402
from interp.testing import tiny_gpt2  # noqa: E402
from store_cases import (  # noqa: E402
    DAMAGE, capture_args, classify, fingerprint, lock_races, make_store, run_capture_process, run_damage, write_dataset,
)

ROWS = [{"text": f"sentence number {i} is here", "label": i % 2} for i in range(12)]
SMALL = dict(hooks="resid_post", positions="all", batch_size=2, shard_mb=0.002, dtype="float32", progress=False)


def cli(args: list[str]) -> None:
    """Run the CLI; a one-line ``error:`` with exit 2 becomes an InterpError (a clear error), exit 0 nothing."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    if rc == 2 and err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1:
        raise InterpError(err.getvalue()[7:].strip())
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {err.getvalue()[-300:]}")


@contextlib.contextmanager
def disk_full_after(n_ok: int):
    real = writer_mod.write_safetensors
    calls = [0]

    def write(path, tensors, metadata):
        calls[0] += 1
        if calls[0] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    writer_mod.write_safetensors = write
    try:
        yield
    finally:
        writer_mod.write_safetensors = real


@contextlib.contextmanager
def as_nobody():
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)  # nobody's group too: a root group would make group permission bits apply
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def interrupted_store(model, out: Path) -> None:
    """A capture of ROWS stopped by Ctrl-C after two committed shards."""
    real = writer_mod.StoreWriter._commit
    calls = [0]

    def commit(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt

    writer_mod.StoreWriter._commit = commit
    try:
        capture(model, ROWS, out=out, **SMALL)
    except KeyboardInterrupt:
        pass
    finally:
        writer_mod.StoreWriter._commit = real


def bad_inputs(model, model_path: Path, root: Path) -> dict[str, object]:
    """name -> a call that must fail with a one-line InterpError (or, for truncation, warn once)."""
    pickle_dir = root / "pickle-model"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    latin = root / "latin1.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    for p in model_path.parent.rglob("*"):  # the model stays readable for the capture run as nobody
        p.chmod(p.stat().st_mode | (0o005 if p.is_dir() else 0o004))
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for p in [root, *list(root.parents)[:1]]:
        p.chmod(p.stat().st_mode | 0o011)
    done = root / "done"
    capture(model, ROWS, out=done, **SMALL)
    relabelled = [dict(r, label=1 - r["label"]) if i == 7 else r for i, r in enumerate(ROWS)]
    partial = root / "partial"
    interrupted_store(model, partial)
    mid = ActivationStore(partial).n_examples // 2
    retexted = [dict(r, text="a different sentence") if i == mid else r for i, r in enumerate(ROWS)]
    store = make_store(root / "synthetic")
    (root / "a-file").write_text("precious")
    lockdir = root / "lockdir"
    make_store(lockdir)
    (lockdir / ".lock").mkdir()
    import datasets

    def truncation():
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            capture(model, [{"text": "a", "label": 0}, {"text": "a much longer text", "label": 1}], out=root / "trunc",
                    positions="last", max_length=6, progress=False)
        got = [w for w in rec if issubclass(w.category, TruncationWarning)]
        if len(got) == 1 and str(got[0].message).startswith("1 of 2 examples"):
            raise InterpError(str(got[0].message))  # one warning with the count: counted as a clear message

    def disk_full():
        with disk_full_after(1):
            capture(model, ROWS, out=root / "full", **SMALL)

    def no_permission():
        with as_nobody():
            capture(model, ROWS, out=ro / "out", **SMALL)

    return {
        "model dir with only pytorch_model.bin (pickle)": lambda: load_model(str(pickle_dir)),
        "capture --model on that dir": lambda: cli(["capture", "--model", str(pickle_dir), "--dataset", "capitals",
                                                    "--out", str(root / "o1")]),
        "non-UTF-8 dataset file": lambda: capture(model, latin, out=root / "o2", progress=False),
        "--shard-mb nan": lambda: cli(["capture", "--model", str(model_path), "--dataset", "capitals", "--out",
                                       str(root / "o3"), "--shard-mb", "nan", "--device", "cpu"]),
        "shard_mb=0": lambda: capture(model, ROWS, out=root / "o4", progress=False, shard_mb=0),
        "shard_mb=inf": lambda: capture(model, ROWS, out=root / "o4", progress=False, shard_mb=float("inf")),
        "max_length=-5": lambda: capture(model, ROWS, out=root / "o5", progress=False, max_length=-5),
        "max_length=0": lambda: capture(model, ROWS, out=root / "o5", progress=False, max_length=0),
        "max_length=2.5": lambda: capture(model, ROWS, out=root / "o5", progress=False, max_length=2.5),
        "batch_size=0": lambda: capture(model, ROWS, out=root / "o5", progress=False, batch_size=0),
        "no write permission on --out": no_permission,
        "disk full (ENOSPC on the 2nd shard)": disk_full,
        "probe --out naming an existing file": lambda: cli(["probe", str(store.path), "--out", str(root / "a-file"),
                                                            "--quiet"]),
        "capture of a DatasetDict": lambda: capture(
            model, datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}), out=root / "o6", progress=False),
        "capture of a plain dict of splits": lambda: capture(model, {"train": ROWS}, out=root / "o6", progress=False),
        "dataset with a non-JSON field": lambda: capture(model, [{"text": "a", "label": 0, "when": {1, 2}}],
                                                         out=root / "o7", progress=False),
        "finished store, a label changed": lambda: capture(model, relabelled, out=done, **SMALL),
        "resume, a committed text changed": lambda: capture(model, retexted, out=partial, **SMALL),
        "rows=[0.5]": lambda: store.activations(0, rows=[0.5]),
        "rows=bool mask": lambda: store.activations(0, rows=torch.tensor([True, False])),
        "writer on a store whose .lock is a directory": lambda: StoreWriter(
            lockdir, hooks=["blocks.0.hook_out"], d_model=384, dtype="float32", positions="mean"),
        "store verify on a file": lambda: cli(["store", "verify", str(root / "a-file")]),
        "texts longer than max_length (one warning with the count)": truncation,
    }


def kills(model_path: Path, root: Path, n: int) -> tuple[int, int, list[str]]:
    data = write_dataset(root / "d.jsonl")
    ref = run_capture_process(model_path, data, root / "ref")
    steps = int(re.search(r"steps=(\d+)", ref.stderr).group(1))
    moments = sorted({round(2 + i * (steps - 3) / (n - 1)) for i in range(n)})
    passed, notes = 0, []
    for k in moments:
        out = root / f"kill-{k}"
        proc = run_capture_process(model_path, data, out, kill_at=k)
        ok = proc.returncode == -9
        try:
            cli(capture_args(model_path, data, out))
            ok = ok and fingerprint(out) == fingerprint(root / "ref") and ActivationStore(out).verify().ok
        except Exception as e:  # noqa: BLE001
            ok = False
            notes.append(f"moment {k}: {type(e).__name__}: {e}")
        passed += ok
    return len(moments), passed, [f"{steps} filesystem steps; moments {moments}", *notes]


def concurrent(model_path: Path, root: Path, n: int, resume: bool) -> tuple[int, int, list[str]]:
    data = write_dataset(root / "d.jsonl")
    ref = root / "ref"
    steps = int(re.search(r"steps=(\d+)", run_capture_process(model_path, data, ref).stderr).group(1))
    passed, notes = 0, []
    for t in range(n):
        out = root / f"{'resume' if resume else 'capture'}-{t}"
        if resume:
            run_capture_process(model_path, data, out, kill_at=steps // 2)
        go = root / f"go-{out.name}"
        procs = [run_capture_process(model_path, data, out, wait=False, go_file=go, step_delay=0.15) for _ in range(2)]
        go.write_text("")
        errs = [p.communicate(timeout=600)[1] for p in procs]
        codes = sorted(p.returncode for p in procs)
        loser_ok = any(re.search(r"^error: store is locked by .*\.lock \((pid|holder still starting up)", e, re.M)
                       for e in errs)  # the holder may not have written its pid yet
        same = out.is_dir() and fingerprint(out) == fingerprint(ref) and ActivationStore(out).verify().ok
        if codes == [0, 2] and loser_ok and same:
            passed += 1
        else:
            notes.append(f"trial {t}: exit codes {codes}, lock error {loser_ok}, equal store {same}: "
                         + " | ".join(next((ln for ln in e.splitlines() if ln.startswith("error:")), "no error line")[:300]
                                    for e in errs))
    return n, passed, notes


def main_() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--races", type=int, default=200)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--only", default="races,kills,concurrent,damage,bad", help="comma-separated sections to run")
    args = ap.parse_args()
    rows: list[tuple[str, int, int, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path = tiny_gpt2(root / "model")
        model = load_model(str(model_path), device="cpu")
        only = set(args.only.split(","))
        for new_store in (False, True) if "races" in only else ():
            wins = lock_races(root / f"races-{new_store}", args.races, new_store)
            rows.append((f"two-process races for {'a new store' if new_store else 'the lock'}", len(wins),
                         sum(w == 1 for w in wins), f"winners per race: {sorted(set(wins))}"))
        if "kills" in only:
            (root / "kills").mkdir()
            n, ok, notes = kills(model_path, root / "kills", args.kills)
            rows.append(("SIGKILL at a moment of `interp capture`, then rerun", n, ok, "; ".join(notes)))
        for resume in (False, True) if "concurrent" in only else ():
            (root / f"conc-{resume}").mkdir()
            n, ok, notes = concurrent(model_path, root / f"conc-{resume}", args.concurrent, resume)
            rows.append((f"two concurrent {'resumes' if resume else 'captures'}", n, ok,
                         "; ".join(notes) or "one exits 0, the other gets the lock error; store equals a single capture"))
        (root / "damage").mkdir()
        damage = {k: run_damage(k, root / "damage") for k in DAMAGE} if "damage" in only else {}
        rows.append(("damage kinds", len(damage), sum(o == "clear" for o, _ in damage.values()),
                     "; ".join(f"{k}: {o} ({d[:60]})" for k, (o, d) in damage.items() if o != "clear") or "all clear"))
        (root / "bad").mkdir()
        bad = {k: classify(fn) for k, fn in bad_inputs(model, model_path, root / "bad").items()} if "bad" in only else {}
    print("| trial | run | passed |\n|---|---|---|")
    for name, n, ok, _ in rows:
        print(f"| {name} | {n} | {ok} |")
    counts = {o: sum(v[0] == o for v in bad.values()) for o in ("clear", "traceback", "silent")}
    print(f"\nbad inputs tried: {len(bad)}; clear errors: {counts['clear']}; tracebacks: {counts['traceback']};"
          f" silent: {counts['silent']}\n")
    for name, n, ok, note in rows:
        print(f"- {name}: {note}")
    for k, (o, d) in bad.items():
        print(f"- bad input {k}: {o}: {d[:140]}")


if __name__ == "__main__":
    main_()
