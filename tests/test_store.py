"""ActivationStore: the on-disk format, reads, splits, batches, damage detection and the writer's lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from interp.errors import ConfigError, HookError, StoreCorruptError, StoreError, StoreLockedError
from interp.store import SHARD_RE, ActivationStore, StoreWriter


@pytest.fixture
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 8, generator=g)
    examples = [{"id": f"e{i}", "text": f"t{i}", "label": i % 2, "split": "test" if i % 4 == 0 else "train"} for i in range(100)]
    example_id = torch.arange(100).repeat_interleave(5)
    return ActivationStore.from_tensors(
        tmp_path / "s",
        {"blocks.0.hook_out": X, "blocks.1.hook_out": -X},
        examples=examples,
        example_id=example_id,
        position=torch.arange(5).repeat(100),
        shard_bytes=4000,
    ), X


def test_layout_and_manifest(store):
    s, X = store
    files = sorted(os.listdir(s.path))
    assert "manifest.json" in files and "examples.jsonl" in files and ".lock" not in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and all(SHARD_RE.fullmatch(f) for f in shards)
    m = json.loads((s.path / "manifest.json").read_text())
    assert m["format"] == "interp.activation_store" and m["version"] == 1 and m["complete"]
    assert sum(sh["rows"] for sh in m["shards"]) == 500
    # shards hold whole examples, in order
    ranges = [tuple(sh["examples"]) for sh in m["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 100 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    from safetensors import safe_open

    with safe_open(s.path / shards[0], "pt") as f:
        assert set(f.keys()) == {"blocks.0.hook_out", "blocks.1.hook_out", "example_id", "position", "token_id"}
        assert f.get_tensor("example_id").dtype == torch.int64 and f.get_tensor("position").dtype == torch.int32


def test_reads(store):
    s, X = store
    assert len(s) == 500 and s.n_examples == 100 and s.d_model == 8
    assert torch.equal(s.activations("blocks.0.hook_out"), X)
    assert torch.equal(s.activations("blocks.1.hook_resid_post"), -X)  # classic alias
    assert torch.equal(s.activations(1), -X)  # layer index
    rows = torch.tensor([499, 3, 250, 251, 0, 3])
    assert torch.equal(s.activations(0, rows), X[rows])
    assert torch.equal(s.labels(), (torch.arange(100) % 2).repeat_interleave(5))
    assert torch.equal(s.token_positions(), torch.arange(5).repeat(100).int())
    assert s.examples()[7]["id"] == "e7" and s.examples()[7]["example_id"] == 7


def test_split_by_dataset_column_and_seeded(store):
    s, _ = store
    train, test = s.train_test_split()
    eid = s.example_ids()
    assert torch.all(eid[test] % 4 == 0) and torch.all(eid[train] % 4 != 0)
    a = s.train_test_split(use_dataset_split=False, seed=1)
    b = s.train_test_split(use_dataset_split=False, seed=1)
    c = s.train_test_split(use_dataset_split=False, seed=2)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    # an example's rows never straddle the split
    assert not set(eid[a[0]].tolist()) & set(eid[a[1]].tolist())


def test_iter_batches_shuffled_covers_every_row_once(store):
    s, X = store
    seen = []
    for b in s.iter_batches(["blocks.0.hook_out", "blocks.1.hook_out"], batch_size=64, shuffle=True, seed=3):
        assert torch.equal(b.acts["blocks.0.hook_out"], X[b.rows])
        assert torch.equal(b.acts["blocks.1.hook_out"], -X[b.rows])
        assert torch.equal(b.example_id, b.rows // 5)
        seen.append(b.rows)
    rows = torch.cat(seen)
    assert sorted(rows.tolist()) == list(range(500))
    assert not torch.equal(rows, torch.arange(500))  # actually shuffled
    again = torch.cat([b.rows for b in s.iter_batches(0, 64, shuffle=True, seed=3)])
    assert torch.equal(rows, again)


def test_half_precision_roundtrip(tmp_path):
    X = torch.randn(64, 16)
    for dt in ("float16", "bfloat16"):
        s = ActivationStore.from_tensors(tmp_path / dt, {"blocks.0.hook_out": X}, labels=[0, 1] * 32, dtype=dt)
        a = s.activations(0)
        assert a.dtype == getattr(torch, dt) and torch.equal(a, X.to(a.dtype))


def test_unknown_hook_lists_close_names(store):
    s, _ = store
    with pytest.raises(HookError, match="blocks.0.hook_out"):
        s.activations("blocks.0.hook_outt")
    with pytest.raises(HookError, match="layer 7"):
        s.activations(7)


def test_verify_reports_flipped_byte_and_truncation_by_name(store):
    s, _ = store
    assert s.verify().ok
    shards = sorted(p for p in s.path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(shards[1].read_bytes())
    data[-3] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    with open(shards[2], "r+b") as f:
        f.truncate(shards[2].stat().st_size - 10)
    report = ActivationStore(s.path).verify()
    assert not report.ok
    text = str(report)
    assert shards[1].name in text and "sha256" in text
    assert shards[2].name in text
    assert shards[0].name not in text


def test_truncated_and_damaged_header_raise_naming_the_shard(store):
    s, _ = store
    shards = sorted(p for p in s.path.iterdir() if p.suffix == ".safetensors")
    with open(shards[0], "r+b") as f:
        f.truncate(shards[0].stat().st_size // 2)
    with pytest.raises(StoreCorruptError, match=shards[0].name):
        ActivationStore(s.path).activations(0)
    data = bytearray(shards[1].read_bytes())
    data[10:20] = b"\x00" * 10  # inside the JSON header
    shards[1].write_bytes(bytes(data))
    fresh = ActivationStore(s.path)
    last = len(fresh) - 1
    assert fresh.activations(0, [last]).shape == (1, 8)  # intact shards still read
    first_of_1 = int(fresh.manifest["shards"][0]["rows"])
    with pytest.raises(StoreCorruptError, match=shards[1].name):
        fresh.activations(0, [first_of_1])


def test_manifest_pointing_outside_is_refused(store, tmp_path):
    s, _ = store
    m = json.loads((s.path / "manifest.json").read_text())
    m["shards"][0]["file"] = "../../etc/passwd"
    (s.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match="outside the store"):
        ActivationStore(s.path)


def test_second_writer_is_refused_naming_the_lock(tmp_path):
    w = StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=4, dtype="float32")
    try:
        with pytest.raises(StoreLockedError, match=r"\.lock"):
            StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=4, dtype="float32")
    finally:
        w.close()
    # released: a new writer can open it again
    StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=4, dtype="float32").close()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    code = (
        "import os; from interp.store import StoreWriter;"
        f"w = StoreWriter({str(tmp_path / 's')!r}, hooks=['blocks.0.hook_out'], d_model=4, dtype='float32');"
        "os._exit(0)"  # dies holding the lock
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "s" / ".lock").exists()
    StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=4, dtype="float32").close()


def test_writer_refuses_other_settings_and_non_store_dirs(tmp_path):
    StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=4, dtype="float32").close()
    with pytest.raises(StoreError, match="other settings"):
        StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=4, dtype="float16")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not an activation store"):
        StoreWriter(tmp_path / "junk", hooks=["h"], d_model=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter(tmp_path / "file", hooks=["h"], d_model=4)
    with pytest.raises(ConfigError, match="unsupported dtype"):
        StoreWriter(tmp_path / "new", hooks=["h"], d_model=4, dtype="int8")
    assert not (tmp_path / "new").exists()


def test_uncommitted_tail_is_invisible_and_resumed(tmp_path):
    w = StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=2, dtype="float32", shard_bytes=1)
    for i in range(3):
        w.add_example({"id": i, "label": i % 2}, {"blocks.0.hook_out": torch.full((1, 2), float(i))}, torch.zeros(1), torch.zeros(1))
    w._buf_examples.append(b'{"half": ')  # as if the process died mid-way: garbage past the committed bytes
    with open(tmp_path / "s" / "examples.jsonl", "ab") as f:
        f.write(b'{"example_id": 3, "partial"')
    w.abort()
    s = ActivationStore(tmp_path / "s")
    assert s.n_examples == 3 and len(s.examples()) == 3 and not s.complete
    w2 = StoreWriter(tmp_path / "s", hooks=["blocks.0.hook_out"], d_model=2, dtype="float32")
    assert w2.next_example == 3
    w2.add_example({"id": 3, "label": 1}, {"blocks.0.hook_out": torch.full((1, 2), 3.0)}, torch.zeros(1), torch.zeros(1))
    w2.close()
    s = ActivationStore(tmp_path / "s")
    assert s.complete and [e["id"] for e in s.examples()] == [0, 1, 2, 3]
    assert torch.equal(s.activations(0)[:, 0], torch.arange(4.0)) and s.verify().ok
