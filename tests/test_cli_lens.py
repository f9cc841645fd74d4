"""``interp lens train``, ``interp lens show`` and ``interp layers`` through the command's entry point (in process:
a subprocess per call would cost seconds of imports each; tests/test_cli.py covers the subprocess wiring)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from interp.cli import main


@pytest.fixture
def interp(capsys):
    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, out=out.out, err=out.err)

    return run


@pytest.fixture(scope="module")
def store(gpt2, tmp_path_factory):
    from interp.capture import capture

    texts = ["The capital of France is Paris.", "I love this movie, it is wonderful.", "One two three four five six.",
             "The cat sleeps in the sun all day long."]
    data = [{"text": f"{t} Number {i}.", "label": i % 2, "kind": "ab"[i % 3 == 0]} for i, t in enumerate(texts * 6)]
    return capture(gpt2, data, hooks="resid_post", positions="all", dtype="float32",
                   out=tmp_path_factory.mktemp("cli-lens") / "store", progress=False)


def test_lens_train_then_show(interp, store, tiny_gpt2_path, tmp_path):
    r = interp("lens", "train", store.path, "--out", tmp_path / "lens", "--steps", "30", "--optimizer", "adam", "--lr", "0.01", "--quiet",
               "--json")
    assert r.returncode == 0, r.err
    layers = json.loads(r.out)["layers"]
    assert [row["layer"] for row in layers] == [0, 1] and layers[0]["kl_tuned"] < layers[0]["kl_logit"]
    assert (tmp_path / "lens" / "tuned_lens.json").is_file() and (tmp_path / "lens" / "lens_kl.html").is_file()
    show = interp("lens", "show", "--model", tiny_gpt2_path, "--prompt", "The capital of France is",
                  "--lens", tmp_path / "lens", "--target", " Paris", "--out", tmp_path / "t.html")
    assert show.returncode == 0, show.err
    assert "logit lens: top tokens" in show.out and "tuned lens: top tokens" in show.out
    assert "rank of ' Paris'" in show.out and (tmp_path / "t.html").is_file()


def test_layers_metrics_and_depth(interp, store, tmp_path):
    r = interp("layers", store.path, "--label", "label,kind", "--cv", "3", "--quiet", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.err
    assert "representation metrics per layer" in r.out and "concept depth" in r.out
    saved = json.loads((tmp_path / "rep" / "layers.json").read_text())
    assert len(saved["metrics"]) == 2 and [c["concept"] for c in saved["concept_depth"]] == ["label", "kind"]


def test_lens_errors_are_one_line(interp, tmp_path):
    r = interp("lens", "show", "--model", "minilm", "--prompt", "hi")
    assert r.returncode == 2 and "no unembedding" in r.err and r.err.count("\n") == 1
    r = interp("lens", "train", tmp_path / "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and "no store at" in r.err
