"""load_model(device_map=...): a model split by accelerate (here across the CPU and disk offload, the split a CPU
machine can make) captures and steers exactly as the same model on one device; bad maps are one-line errors."""

from __future__ import annotations

import pytest
import torch

from interp import capture, load_model
from interp.errors import ConfigError, ModelLoadError
from interp.model import model_device
from interp.steering import Intervention, generate
from interp.testing import tiny_decoder

SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_decoder(tmp_path_factory.mktemp("dm") / "tiny", "llama")
    return load_model(str(path), device="cpu"), load_model(str(path), device_map=SPLIT)


def test_split_model_is_dispatched(models):
    _, split = models
    assert split.original_model.hf_device_map == SPLIT
    assert model_device(split) == torch.device("cpu")  # inputs go to the embedding's device


def test_capture_across_the_split_equals_one_device(models, tmp_path):
    texts = ["the cat sat on the mat", "a dog", "one two three four five six"]
    # the bridge on both sides: a split model always runs it (interp.fastpath leaves accelerate's modules alone),
    # and the one-device model's fast path would differ by SDPA's rounding, not by the split
    stores = [capture(m, texts, layers=[0, 1], positions="all", dtype="float32", out=tmp_path / str(i),
                      progress=False, fast=False) for i, m in enumerate(models)]
    assert stores[1].manifest["model"]["attn_implementation"] == stores[0].manifest["model"]["attn_implementation"]
    for h in stores[0].hooks:
        assert torch.equal(stores[0].activations(h), stores[1].activations(h)), h
    assert stores[1].n_rows == stores[0].n_rows > 0


def test_steering_across_the_split_equals_one_device(models):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    outs = []
    for m in models:
        plain = generate(m, "the cat", max_new_tokens=6)
        steered = generate(m, "the cat", steering=Intervention(v, hook="blocks.1.hook_out", alpha=8.0), max_new_tokens=6)
        outs.append((plain.token_ids, steered.token_ids))
    (p0, s0), (p1, s1) = outs
    assert torch.equal(p0, p1) and torch.equal(s0, s1)
    assert not torch.equal(p0, s0)  # the intervention on the offloaded block changed the text


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="cpu", device_map="auto"), "not both"),
    (dict(device_map="fastest"), "device_map='fastest': use one of auto"),
    (dict(device_map={"": "cuda:7"}), "cuda:7"),
    (dict(device_map=["cpu"]), "device_map must be a string"),
    (dict(device_map={3: "cpu"}), "keys are module names"),
])
def test_bad_device_maps_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_model("minilm", **kwargs)
    assert "\n" not in str(e.value)


def test_a_map_the_model_cannot_take_is_a_load_error(models, tmp_path):
    path = tiny_decoder(tmp_path / "tiny", "llama")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path), device_map={"model.embed_tokens": "meta", "lm_head": "cpu", "model.layers": "cpu",
                                          "model.norm": "cpu", "model.rotary_emb": "cpu"})
    assert "\n" not in str(e.value)


def test_cli_device_map_json_error_is_one_line(tmp_path, capsys):
    from interp.cli import main

    assert main(["capture", "--dataset", "capitals", "--device-map", "{bad", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device-map '{bad' is not a JSON object") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
