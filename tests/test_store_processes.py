"""The writer lock and the commit protocol under real processes: races, SIGKILL, concurrent captures."""

from __future__ import annotations

import os
import re

import pytest
import torch

from interp.cli import main
from interp.errors import StoreError, StoreLockedError
from interp.store import ActivationStore, StoreWriter
from store_cases import capture_args, fingerprint, lock_races, run_capture_process, write_dataset


def test_lock_races_exactly_one_writer(tmp_path):
    assert lock_races(tmp_path / "lock", 20, new_store=False) == [1] * 20


def test_new_store_races_exactly_one_writer_and_a_clean_store(tmp_path):
    assert lock_races(tmp_path / "new", 20, new_store=True) == [1] * 20
    for i in range(20):
        s = ActivationStore(tmp_path / "new" / f"race-{i}")
        assert s.n_examples == 1 and s.complete and s.verify().ok
        ex = s.examples()[0]
        assert s.activations(0)[0, 0].item() == float(ex["label"])  # the rows belong to the example's writer
        assert sorted(p.name for p in s.path.iterdir()) == [
            "examples.jsonl", "manifest.json", "shard-000000.safetensors", "verified.json"]


def test_second_writer_error_names_the_holder(tmp_path):
    w = StoreWriter(tmp_path / "s", hooks=["h"], d_model=2, dtype="float32")
    with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} on \S+ since ") as e:
        StoreWriter(tmp_path / "s", hooks=["h"], d_model=2, dtype="float32")
    assert "\n" not in str(e.value)
    w.close()
    assert not (tmp_path / "s" / ".lock").exists()


def test_store_in_creation_is_restarted(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / ".lock").write_text("")  # a writer died right after taking the lock
    (d / ".manifest.json.tmp-123").write_text("{")  # ... or while writing its first manifest
    (d / "examples.jsonl").write_text('{"example_id": 0}\n')  # ... or with uncommitted examples
    (d / "shard-000000.safetensors").write_bytes(b"partial")
    w = StoreWriter(d, hooks=["h"], d_model=2, dtype="float32")
    w.add_example({"id": 0}, {"h": torch.ones(1, 2)}, torch.zeros(1), torch.zeros(1))
    w.close()
    s = ActivationStore(d)
    assert s.n_examples == 1 and s.verify().ok
    (d / "notes.txt").write_text("mine")
    (d / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not an activation store.*notes.txt"):
        StoreWriter(d, hooks=["h"], d_model=2, dtype="float32")
    assert (d / "notes.txt").read_text() == "mine"


def test_lock_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "s" / ".lock").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"\.lock is a directory"):
        StoreWriter(tmp_path / "s", hooks=["h"], d_model=2, dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_gpt2_path, tmp_path_factory):
    """An uninterrupted capture in a child process: (model, dataset, store, filesystem steps it took)."""
    root = tmp_path_factory.mktemp("ref")
    data = write_dataset(root / "d.jsonl")
    proc = run_capture_process(tiny_gpt2_path, data, root / "ref")
    assert proc.returncode == 0, proc.stderr
    steps = int(re.search(r"steps=(\d+)", proc.stderr).group(1))
    return tiny_gpt2_path, data, root / "ref", steps


@pytest.mark.slow
def test_sigkill_at_moments_then_rerun_equals_uninterrupted(reference, tmp_path):
    model, data, ref, steps = reference
    assert steps > 20
    # right after mkdir, after the lock, inside the first manifest write, then spread over the capture
    moments = sorted({2, 3, 5, steps // 2, steps - 1})
    for k in moments:
        out = tmp_path / f"kill-{k}"
        proc = run_capture_process(model, data, out, kill_at=k)
        assert proc.returncode == -9, f"moment {k}: {proc.stderr[-500:]}"
        assert main(capture_args(model, data, out)) == 0, f"moment {k}: rerun failed"
        assert fingerprint(out) == fingerprint(ref), f"moment {k}: resumed store differs"
        assert ActivationStore(out).verify().ok


def _race(procs):
    results = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], [err for _, err in results]


@pytest.mark.slow
def test_two_concurrent_captures_and_two_concurrent_resumes(reference, tmp_path):
    model, data, ref, steps = reference
    for phase in ("capture", "resume"):
        out = tmp_path / phase
        if phase == "resume":  # a capture killed half-way, resumed by two processes at once
            assert run_capture_process(model, data, out, kill_at=steps // 2).returncode == -9
        go = tmp_path / f"go-{phase}"
        procs = [run_capture_process(model, data, out, wait=False, go_file=go, step_delay=0.15) for _ in range(2)]
        go.write_text("")
        codes, errs = _race(procs)
        assert sorted(codes) == [0, 2], f"{phase}: exit codes {codes}: {errs}"
        loser = errs[codes.index(2)]
        assert re.search(r"^error: store is locked by .*\.lock \((pid \d+ on |holder still starting up)", loser, re.M), loser
        assert "Traceback" not in loser
        assert fingerprint(out) == fingerprint(ref), phase
        assert ActivationStore(out).verify().ok
