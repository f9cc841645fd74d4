"""The ``interp`` command end to end, in real subprocesses (exit codes, one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def interp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "interp", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Sentence {i} about cats.", "label": i % 2}) + "\n" for i in range(12)))
    r = interp("capture", "--model", "minilm", "--dataset", data, "--hooks", "resid_post", "--positions", "mean",
               "--out", d / "store", "--quiet", "--shard-mb", "0.01")
    assert r.returncode == 0, r.stderr
    return d / "store", r


def test_capture_and_info(captured):
    store, r = captured
    assert "examples   12" in r.stdout and "blocks.5.hook_out" in r.stdout
    info = interp("store", "info", store, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["rows"] == 12


def test_verify_names_the_damaged_shard(captured, tmp_path):
    store, _ = captured
    ok = interp("store", "verify", store)
    assert ok.returncode == 0 and "OK" in ok.stdout
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shard = sorted(copy.glob("shard-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = interp("store", "verify", copy)
    assert bad.returncode == 1 and shard.name in bad.stdout


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["store", "info", "/nonexistent/store"], "no store at"),
        (["capture", "--model", "/nonexistent/model", "--dataset", "capitals", "--out", "X"], "does not exist"),
        (["capture", "--dataset", "capitals", "--hooks", "blocks.0.hook_resid_psot", "--out", "X"], "did you mean"),
        (["capture", "--dataset", "capitals", "--layers", "9", "--out", "X"], "out of range"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, pattern):
    r = interp(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and pattern in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "X").exists()


def test_public_api_names_resolve():
    import interp

    for name in interp.__all__:
        assert getattr(interp, name) is not None, name
