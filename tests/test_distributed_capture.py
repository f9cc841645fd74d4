"""Data-parallel capture under torchrun (gloo backend, CPU): 2 and 3 ranks write the store a single process writes,
and a rank killed mid-capture resumes from its last committed shard when the job is rerun."""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp import capture, distributed, load_model
from interp.datasets import load_dataset
from interp.errors import ConfigError, StoreError, StoreLockedError
from interp.store import PARTS, ActivationStore, StoreWriter, prune_parts
from store_cases import fingerprint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
N = 48  # examples of the bundled capitals dataset: 6 batches of 8
ARGS = ["--model", "minilm", "--layers", "2", "--positions", "all", "--batch-size", "8", "--quiet"]
ONE_BATCH_SHARDS = ["--shard-mb", "0.01"]  # every batch fills a shard: the shards match a 1-process run's


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTERP_TEST_", "RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=180)


def torchrun(n: int, args: list[str], cwd: Path, worker: bool = False, **env: str) -> subprocess.CompletedProcess:
    entry = [str(ROOT / "tests" / "distributed_worker.py")] if worker else ["-m", "interp"]
    return _run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(n), *entry, "capture", *args], cwd, **env)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    path = root / "capitals.jsonl"
    with open(path, "w") as f:
        for e in load_dataset("capitals").examples[:N]:
            f.write(json.dumps(e.to_record()) + "\n")
    return path


@functools.lru_cache(maxsize=1)
def _minilm():
    return load_model("minilm", device="cpu")


def _capture_one(data: Path, out: Path, positions: str, batch_size: int, shard_mb: float) -> Path:
    """The same capture by one plain process (on one thread, as each torchrun rank runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capture(_minilm(), str(data), layers=[2], positions=positions, batch_size=batch_size,
                shard_mb=shard_mb, out=out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    return _capture_one(data, data.parent / "one", "all", 8, 0.01)


def _rows(path: Path) -> dict[str, torch.Tensor]:
    s = ActivationStore(path)
    return {"acts": s.activations(s.hooks[0]), "example_id": s.example_ids(), "position": s.token_positions(),
            "token_id": s.token_ids(), "token_label": s.token_labels()}


def test_two_ranks_write_the_rows_one_process_writes(data, reference, tmp_path):
    out = tmp_path / "two"
    r = torchrun(2, ["--dataset", str(data), "--out", str(out), *ARGS, "--shard-mb", "0.15", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["examples"] == N  # rank 0 alone prints the summary: one JSON document
    got, want = _rows(out), _rows(reference)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # bitwise: each rank ran the batches a single process runs
    assert (out / "examples.jsonl").read_bytes() == (reference / "examples.jsonl").read_bytes()
    a, b = fingerprint(out)["manifest.json"], fingerprint(reference)["manifest.json"]
    assert [s["examples"] for s in a.pop("shards")] == [[0, 24], [24, 48]]  # a rank's 3 batches make one shard
    b.pop("shards")
    assert a == b
    assert not (out / PARTS).exists() and ActivationStore(out).verify().ok


def test_three_ranks_write_the_store_one_process_writes(data, tmp_path):
    args = ["--positions", "mean", "--batch-size", "2", "--shard-mb", "0.002"]  # 2 batches a shard, 4 shards a rank
    out = tmp_path / "three"
    r = torchrun(3, ["--dataset", str(data), "--out", str(out), *ARGS, *args], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = _capture_one(data, tmp_path / "one", "mean", 2, 0.002)
    assert len(ActivationStore(one).manifest["shards"]) == 12
    assert fingerprint(out) == fingerprint(one)  # every shard's sha256, examples.jsonl, manifest but its times
    assert ActivationStore(out).verify().ok


def test_early_commit_only_where_the_dataset_ends(data, tmp_path, monkeypatch):
    """The buffer committed during the last forward (capture.EARLY_FLUSH_BYTES) is the dataset's last batch but one,
    on the last rank only: the ranks' slices of whole shards still give the single process's shards."""
    args = ["--positions", "mean", "--batch-size", "2", "--shard-mb", "0.002"]
    out = tmp_path / "three"
    r = torchrun(3, ["--dataset", str(data), "--out", str(out), *ARGS, *args], tmp_path, worker=True,
                 INTERP_TEST_EARLY_FLUSH="1")
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.setattr(importlib.import_module("interp.capture"), "EARLY_FLUSH_BYTES", 1)
    one = _capture_one(data, tmp_path / "one", "mean", 2, 0.002)
    shards = ActivationStore(one).manifest["shards"]
    assert [s["examples"] for s in shards[-2:]] == [[N - 4, N - 2], [N - 2, N]]  # the early commit split the last
    assert fingerprint(out) == fingerprint(one)


def test_killed_rank_resumes_from_its_last_shard(data, reference, tmp_path):
    out, log = tmp_path / "killed", tmp_path / "commits.log"
    args = ["--dataset", str(data), "--out", str(out), *ARGS, *ONE_BATCH_SHARDS]
    r = torchrun(2, args, tmp_path, worker=True, INTERP_TEST_KILL="1:2", INTERP_TEST_LOG=str(log))
    assert r.returncode != 0
    manifest = out / "manifest.json"  # nothing is committed to the store itself before every rank is done
    assert not manifest.exists() or json.loads(manifest.read_text())["n_examples"] == 0
    parts = sorted(p.name for p in (out / PARTS).iterdir())
    assert [p.split("-", 1)[1] for p in parts] == [f"{0:012d}-{24:012d}", f"{24:012d}-{48:012d}"]
    first = log.read_text().split("\n")
    assert "1 24" in first and "1 32" in first and "1 40" not in first  # rank 1 died after its 2nd shard

    log.unlink()
    r = torchrun(2, args, tmp_path, worker=True, INTERP_TEST_LOG=str(log))
    assert r.returncode == 0, r.stderr[-3000:]
    again = [line.split() for line in log.read_text().splitlines()]
    assert [int(e) for rank, e in again if rank == "1"] == [40]  # resumed after its 2 shards, nothing redone
    assert fingerprint(out) == fingerprint(reference)  # every example once, in order, same bytes
    s = ActivationStore(out)
    assert torch.equal(torch.unique_consecutive(s.example_ids()), torch.arange(N)) and s.verify().ok


AGREE = """
from interp import distributed
from interp.errors import InterpError, StoreError

rank, world = distributed.init_from_env()
with open(f"rank-{rank}.txt", "w") as out:  # one file per rank: the ranks' stdout interleaves
    print(rank, world, distributed.broadcast([rank, "plan"]), distributed.gather(rank * 10), file=out)
    distributed.agree(None, "a step that works")
    try:
        distributed.agree(StoreError("disk full") if rank == 1 else None, "writing parts")
    except InterpError as e:
        print(rank, type(e).__name__, e, file=out)
"""


def test_a_rank_that_fails_fails_every_rank(tmp_path):
    (tmp_path / "agree.py").write_text(AGREE)
    r = _run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "agree.py"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    said = {k: (tmp_path / f"rank-{k}.txt").read_text().splitlines() for k in range(2)}
    for k in range(2):
        assert said[k][0] == f"{k} 2 [0, 'plan'] [0, 10]"  # rank 0's plan and every rank's value, on each
    assert said[1][1] == "1 StoreError disk full"  # the rank that failed raises its own error
    assert said[0][1] == "0 RankFailedError writing parts failed on rank 1: disk full"  # the other learns why


def test_half_a_torchrun_environment_is_an_error(monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without MASTER_ADDR/MASTER_PORT: launch with torchrun"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one rank needs no rendezvous
    assert distributed.init_from_env() == (0, 1)


def test_split_range_covers_whole_batches_in_order():
    for start, stop, unit, world in [(0, 96, 8, 2), (0, 96, 8, 5), (16, 97, 8, 3), (0, 5, 8, 4), (7, 7, 4, 2)]:
        slices = distributed.split_range(start, stop, unit, world)
        assert len(slices) == world and slices[0][0] == start and slices[-1][1] == stop
        assert all(a <= b for a, b in slices) and all(slices[i][1] == slices[i + 1][0] for i in range(world - 1))
        assert all((a - start) % unit == 0 for a, _ in slices)
        sizes = [-(-(b - a) // unit) for a, b in slices]
        assert max(sizes) - min(sizes) <= 1


def test_single_process_is_rank_0_of_1():
    assert distributed.rank_world() == (0, 1) and distributed.init_from_env() == (0, 1)
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.gather(3) == [3]
    distributed.agree(None, "nothing")
    with pytest.raises(ValueError, match="boom"):
        distributed.agree(ValueError("boom"), "a step")


def test_prune_parts_leaves_a_part_a_writer_holds(tmp_path):
    held = StoreWriter(tmp_path / "s" / PARTS / "k-held", hooks=["h"], d_model=2, dtype="float32")
    StoreWriter(tmp_path / "s" / PARTS / "k-kept", hooks=["h"], d_model=2, dtype="float32").close()
    StoreWriter(tmp_path / "s" / PARTS / "k-old", hooks=["h"], d_model=2, dtype="float32").close()
    with pytest.raises(StoreLockedError):
        prune_parts(tmp_path / "s", keep=["k-kept"])
    assert (tmp_path / "s" / PARTS / "k-held" / "manifest.json").exists()
    held.close()
    prune_parts(tmp_path / "s", keep=["k-kept"])
    assert sorted(p.name for p in (tmp_path / "s" / PARTS).iterdir()) == ["k-kept"]


def _part(path: Path, offset: int, n: int) -> Path:
    with StoreWriter(path, hooks=["h"], d_model=2, dtype="float32", shard_bytes=16, example_offset=offset) as w:
        for i in range(offset, offset + n):
            w.add_example({"text": f"ex {i}"}, {"h": torch.full((2, 2), float(i))}, torch.arange(2), torch.zeros(2))
    return path


@pytest.mark.parametrize("links", [True, False])
def test_commit_parts_appends_them_as_final_shards(tmp_path, monkeypatch, links):
    if not links:  # a filesystem without hard links: the shards are copied
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(1, "no links")))
    parts = [_part(tmp_path / "s" / PARTS / f"k-{a}-{a + n}", a, n) for a, n in ((0, 3), (3, 0), (3, 2))]
    with StoreWriter(tmp_path / "s", hooks=["h"], d_model=2, dtype="float32") as w:
        w.commit_parts(parts)
    s = ActivationStore(tmp_path / "s")
    assert s.n_examples == 5 and [sh["examples"] for sh in s.manifest["shards"]] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    assert torch.equal(s.example_ids(), torch.arange(5).repeat_interleave(2))
    assert torch.equal(s.activations("h")[:, 0], torch.arange(5.0).repeat_interleave(2))
    assert [e["text"] for e in s.examples()] == [f"ex {i}" for i in range(5)] and s.verify().ok
    assert (s.path / "shard-000004.safetensors").stat().st_nlink == (2 if links else 1)


def test_commit_parts_refuses_a_part_that_does_not_continue_the_store(tmp_path):
    part = _part(tmp_path / "s" / PARTS / "k-2", 2, 2)  # starts at example 2, the store has none
    w = StoreWriter(tmp_path / "s", hooks=["h"], d_model=2, dtype="float32")
    with pytest.raises(StoreError, match="does not continue") as e:
        w.commit_parts([part])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s" / "shard-000000.safetensors").exists()  # nothing half-committed
