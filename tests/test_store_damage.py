"""Every kind of damage to a store is a one-line error or a verify failure, never a traceback or a silent read."""

from __future__ import annotations

import json

import pytest
import torch

from interp.errors import ConfigError, StoreCorruptError
from interp.store import ActivationStore, StoreWriter
from store_cases import DAMAGE, HOOK, N, expected_acts, make_store, run_damage


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_a_clear_error(kind, tmp_path):
    outcome, detail = run_damage(kind, tmp_path)
    assert outcome == "clear", f"{kind}: {outcome} ({detail})"


def test_flipped_label_fails_reads_and_verify(tmp_path):
    s = make_store(tmp_path / "s")
    p = tmp_path / "s" / "examples.jsonl"
    p.write_bytes(p.read_bytes().replace(b'"label": 1', b'"label": 0', 1))
    s = ActivationStore(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match="sha256"):
        s.labels()
    report = s.verify()
    assert not report.ok and "examples.jsonl" in report.problems[0]


def test_data_bytes_changed_plain_read_differs_checked_read_refuses(tmp_path):
    make_store(tmp_path / "s")
    DAMAGE["shard data bytes changed"](tmp_path / "s")
    x = ActivationStore(tmp_path / "s").activations(HOOK)  # documented: plain reads do not hash
    assert not torch.equal(x, expected_acts())
    with pytest.raises(StoreCorruptError, match="failed verification: shard-000001"):
        ActivationStore(tmp_path / "s", verify=True)


def test_old_store_without_examples_hash_reads_and_verify_notes_it(tmp_path):
    make_store(tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del m["examples_sha256"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    s = ActivationStore(tmp_path / "s")
    assert s.labels().tolist() == [i % 2 for i in range(N)]
    report = s.verify()
    assert report.ok and "unhashed" in report.notes[0] and "unhashed" in str(report)
    w = StoreWriter(tmp_path / "s", hooks=[HOOK], d_model=384, dtype="float32", positions="mean")
    w.add_example({"id": N, "text": "more", "label": 0}, {HOOK: torch.zeros(1, 384)}, torch.zeros(1), torch.zeros(1))
    w.close()
    s = ActivationStore(tmp_path / "s")
    assert s.n_examples == N + 1 and s.manifest["examples_sha256"] and s.verify().ok  # hashed from now on


def test_verify_records_sidecar_not_manifest(tmp_path):
    s = make_store(tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    assert s.info()["last_verified"] is None
    assert s.verify().ok
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    v = ActivationStore(tmp_path / "s").info()["last_verified"]
    assert v["ok"] and v["current"]
    DAMAGE["shard data bytes changed"](tmp_path / "s")
    assert not s.verify().ok
    assert ActivationStore(tmp_path / "s").info()["last_verified"]["ok"] is False


def test_float_and_bool_row_indices_refused(tmp_path):
    s = make_store(tmp_path / "s")
    for rows in ([0.5], torch.tensor([0.5]), torch.tensor([True, False])):
        with pytest.raises(ConfigError, match="integers"):
            s.activations(HOOK, rows=rows)
    assert s.activations(HOOK, rows=[3, 1])[:, 0].tolist() == [3.0, 1.0]


def test_from_tensors_takes_numpy(tmp_path):
    import numpy as np

    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    s = ActivationStore.from_tensors(tmp_path / "s", {HOOK: x}, np.array([0, 1, 0, 1]))
    assert torch.equal(s.activations(HOOK), torch.from_numpy(x)) and s.labels().tolist() == [0, 1, 0, 1]
