"""``interp capture`` / ``interp store verify`` output modes (--json, --quiet), ``store info``'s last
verification, and ``interp probe --verify`` on a damaged store."""

from __future__ import annotations

import json

import torch

from interp.cli import main
from store_cases import DAMAGE, make_store

ROWS = "".join(json.dumps({"text": f"Sentence {i} about dogs.", "label": i % 2}) + "\n" for i in range(6))


def test_capture_json_and_quiet(tiny_gpt2_path, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(ROWS)
    args = ["capture", "--model", str(tiny_gpt2_path), "--dataset", str(tmp_path / "d.jsonl"), "--positions", "mean",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a"), "--json"]) == 0
    out = capsys.readouterr()
    info = json.loads(out.out)  # one JSON document, nothing else on stdout
    assert info["examples"] == 6 and info["complete"] and info["last_verified"] is None
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_verify_json_quiet_and_info_shows_last_verification(tmp_path, capsys):
    s = make_store(tmp_path / "s")
    assert main(["store", "info", str(s.path)]) == 0
    assert "verified   never" in capsys.readouterr().out
    assert main(["store", "verify", str(s.path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["shards_checked"] == 4 and report["problems"] == []
    assert main(["store", "info", str(s.path)]) == 0
    assert ": OK" in capsys.readouterr().out
    DAMAGE["shard data bytes changed"](s.path)
    assert main(["store", "verify", str(s.path), "--quiet"]) == 1
    assert capsys.readouterr().out == ""
    assert main(["store", "verify", str(s.path), "--json"]) == 1
    assert "shard-000001" in json.loads(capsys.readouterr().out)["problems"][0]
    assert main(["store", "info", str(s.path)]) == 0
    assert "FAILED" in capsys.readouterr().out


def test_probe_verify_refuses_damaged_shards(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.randn(60, 8, generator=g) + 2.0 * y[:, None]
    from interp.store import ActivationStore

    s = ActivationStore.from_tensors(tmp_path / "s", {"blocks.0.hook_out": x}, y, shard_bytes=8 * 4 * 20)
    DAMAGE["shard data bytes changed"](s.path)
    args = ["probe", str(s.path), "--cv", "2", "--quiet", "--device", "cpu"]
    assert main(args) == 0  # documented: a plain read does not hash every byte
    capsys.readouterr()
    assert main([*args, "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: store ") and "failed verification: shard-000001" in err and err.count("\n") == 1


def test_info_quiet_exit_status_says_complete(tmp_path, capsys):
    s = make_store(tmp_path / "s")
    assert main(["store", "info", str(s.path), "--quiet"]) == 0
    m = json.loads((s.path / "manifest.json").read_text())
    m["complete"] = False  # what a killed capture leaves: readable up to its last shard, not finished
    (s.path / "manifest.json").write_text(json.dumps(m))
    assert main(["store", "info", str(s.path), "--quiet"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert main(["store", "info", str(s.path)]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
