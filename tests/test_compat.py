"""The installed transformers / TransformerLens pair must decode from a KV cache exactly; when it cannot, every
cached loop says so loudly instead of returning wrong numbers."""

from __future__ import annotations

import pytest
import torch

from interp.errors import ModelLoadError
from interp.model import cache_length, check_cache, load_model, patch_cache_keyword
from interp.testing import ARCHITECTURES, tiny_decoder


@pytest.fixture(scope="module", params=ARCHITECTURES)
def decoder(request, tmp_path_factory):
    return load_model(str(tiny_decoder(tmp_path_factory.mktemp(request.param), request.param)), device="cpu")


def test_cached_decoding_equals_full_forward(decoder):
    ids = decoder.tokenizer(["The capital of France is Paris and"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        full = decoder(ids, return_type="logits")
        logits, past = decoder(ids[:, :-3], return_type="logits_and_cache", use_cache=True)
        assert cache_length(past) == ids.shape[1] - 3
        steps = []
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            step, past = decoder(ids[:, t : t + 1], return_type="logits_and_cache", past_key_values=past)
            steps.append(step[:, -1])
            assert cache_length(past) == t + 1
    torch.testing.assert_close(torch.stack(steps, 1), full[:, -3:], atol=1e-4, rtol=1e-4)


def test_patch_is_idempotent(decoder):
    n = patch_cache_keyword(decoder)
    assert n == int(decoder.cfg.n_layers)
    assert patch_cache_keyword(decoder) == n
    pre_hooks = [len(m._forward_pre_hooks) for m in decoder.modules() if getattr(m, "_interp_cache_patch", False)]
    assert pre_hooks and max(pre_hooks) == 1


def test_cache_check_names_the_versions():
    from transformers import DynamicCache

    with pytest.raises(ModelLoadError, match=r"holds 0 tokens after the prefill but 7 were fed.*transformers \d"):
        check_cache(DynamicCache(), 7, "after the prefill")
    check_cache(None, 0, "before anything")


def test_an_unpatched_bridge_is_caught(tmp_path):
    """Remove the compatibility hook: on a transformers that passes ``cache=`` the loop must raise, never decode.
    (The bridge path, ``fast=False``: the fast path runs transformers' own attention, which needs no patch.)"""
    import transformers

    model = load_model(str(tiny_decoder(tmp_path / "g", "gpt2")), device="cpu")
    for m in model.modules():
        if getattr(m, "_interp_cache_patch", False):
            m._forward_pre_hooks.clear()
            m._interp_cache_patch = False
    from interp.generation import generate

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 24):
        pytest.skip("this transformers still passes past_key_values: nothing to catch")
    with pytest.raises(ModelLoadError, match="cached decoding is broken"):
        generate(model, ["The capital of"], max_new_tokens=3, fast=False)
