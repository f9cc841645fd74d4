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
    assert r.stdout == ""  # --quiet: no progress bar, no summary
    text = interp("store", "info", store)
    assert "examples   12" in text.stdout and "blocks.5.hook_out" in text.stdout
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


def test_version_names_the_deciding_dependencies(capsys):
    import re

    from interp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert re.match(r"interp \d+\.\d+\.\d+ \(transformers \S+, transformer-lens \S+, torch \S+\)", out), out


def test_json_on_probe_inlp_and_sae_train(tmp_path):
    """Every analysis command prints exactly one JSON document on stdout with --json."""
    import torch

    from interp import ActivationStore

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 16, generator=g) + 2.0 * y[:, None] * torch.eye(16)[0]
    ActivationStore.from_tensors(tmp_path / "s", {"blocks.0.hook_out": x}, labels=y.tolist())
    runs = {
        "probe": ["probe", str(tmp_path / "s"), "--cv", "2", "--quiet", "--json"],
        "inlp": ["inlp", str(tmp_path / "s"), "--hook", "0", "--max-iter", "2", "--quiet", "--json"],
        "sae": ["sae", "train", str(tmp_path / "s"), "--hook", "0", "--d-sae", "32", "--k", "4", "--steps", "5",
                "--batch-size", "64", "--out", str(tmp_path / "sae"), "--quiet", "--json"],
    }
    for name, argv in runs.items():
        r = subprocess.run([sys.executable, "-m", "interp", *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        doc = json.loads(r.stdout)
        assert isinstance(doc, dict) and doc, name
    assert json.loads(subprocess.run([sys.executable, "-m", "interp", *runs["probe"]], capture_output=True,
                                     text=True).stdout)["best_hook"] == "blocks.0.hook_out"
