"""The fast path (interp.fastpath): the HF model a bridge wraps, run directly with SDPA and plain torch hooks,
gives the bridge's stores, generations and scores to float rounding, on an encoder (MiniLM), GPT-2, Llama and
the bundled SmolLM2; with eager attention (the bridge's own) BERT and Llama stores are equal bit for bit."""

from __future__ import annotations

import pytest
import torch

from interp.capture import capture, run_hooks
from interp.errors import ConfigError
from interp.fastpath import attach, attn_implementation, fast_model, fast_points, prepare
from interp.generation import Act, generate, projection_watch
from interp.model import load_model, resolve_hooks, tokenize
from interp.testing import tiny_decoder

TEXTS = [
    "The capital of France is Paris, and the Seine runs through it.",
    "Hi",
    "Marie Curie studied radioactivity in Paris and won two Nobel prizes.",
    "I love this movie, it is wonderful.",
    "Question: Did you finish the report? Answer: Yes, this morning.",
]
POLICIES = ("all", "last", "mean", "tail", "mean:tail", "last:tail")


def _rows():
    out = []
    for i, t in enumerate(TEXTS):
        cut = len(t) // 2 if len(t) > 4 else 0
        out.append({"id": str(i), "text": t, "label": i % 2, "regions": {"tail": [cut, len(t)]}})
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(str(tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")), device="cpu")


def _adjacent16(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    inf = torch.full_like(x, float("inf"))
    return (x == y) | (y == torch.nextafter(x, inf)) | (y == torch.nextafter(x, -inf))


def assert_same_store(a, b, dtype: str) -> None:
    """float16: every value equal or one rounding step away (an element far below its row's scale may round
    across more float16 steps, by less than 1e-5 of the row's largest value); float32: every row within 1e-5
    of its largest value. Row bookkeeping (examples, positions, tokens) is identical."""
    assert a.n_rows == b.n_rows and a.hooks == b.hooks
    for key in ("example_ids", "token_positions", "token_ids"):
        assert torch.equal(getattr(a, key)(), getattr(b, key)()), key
    for h in a.hooks:
        x, y = a.activations(h).float(), b.activations(h).float()
        scale = x.abs().amax(1, keepdim=True).clamp_min(1.0)
        small = (x - y).abs() <= 1e-5 * scale
        if dtype == "float16":
            ok = _adjacent16(a.activations(h), b.activations(h)) | small
            assert bool(ok.all()), f"{h}: {int((~ok).sum())} values more than one float16 step apart"
        else:
            assert bool(small.all()), f"{h}: max difference {float(((x - y).abs() / scale).max()):.2e} of the row"


@pytest.mark.parametrize("which", ["minilm", "gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stores_equal_the_bridge_for_every_policy(which, dtype, request, tmp_path):
    model = request.getfixturevalue(which)
    assert attn_implementation(model) == "sdpa"
    hooks = ["resid_pre", "resid_post", "attn_out", "mlp_out"]
    for pol in POLICIES:
        kw = dict(hooks=hooks, positions=pol, dtype=dtype, batch_size=2, progress=False)
        slow = capture(model, _rows(), out=tmp_path / f"slow-{pol}", fast=False, **kw)
        fast = capture(model, _rows(), out=tmp_path / f"fast-{pol}", **kw)
        assert slow.manifest["model"]["attn_implementation"] == "eager"
        assert fast.manifest["model"]["attn_implementation"] == "sdpa"
        assert_same_store(slow, fast, dtype)


def test_smollm2_stores_equal_the_bridge(smollm2, tmp_path):
    """SmolLM2's residual stream reaches 2.5e4 in a few dimensions: SDPA's float32 rounding is ~1e-6 of a row."""
    for dtype, pol in (("float16", "all"), ("float32", "mean")):
        kw = dict(layers=[0, 14, 29], positions=pol, dtype=dtype, progress=False)
        slow = capture(smollm2, _rows()[:3], out=tmp_path / f"slow-{dtype}", fast=False, **kw)
        fast = capture(smollm2, _rows()[:3], out=tmp_path / f"fast-{dtype}", **kw)
        assert_same_store(slow, fast, dtype)


@pytest.mark.parametrize("which", ["minilm", "llama"])
def test_eager_twin_is_the_bridge_bit_for_bit(which, request):
    """With the bridge's eager attention the twin reproduces every mapped hook exactly: the mapping is right,
    and what SDPA changes is rounding only."""
    model = request.getfixturevalue(which)
    names, _ = resolve_hooks(model, ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
    toks = tokenize(model, TEXTS)
    try:
        assert prepare(model, "eager").attn_implementation == "eager"
        with torch.inference_mode():
            a = run_hooks(model, toks, names, fast=False)
            b = run_hooks(model, toks, names, fast=True)
    finally:
        prepare(model)
    for n in names:
        assert torch.equal(a[n], b[n]), n


def test_aliases_map_and_unmappable_hooks_run_the_bridge(minilm):
    fm, resolved = fast_points(minilm, ["blocks.2.hook_resid_post", "blocks.2.hook_out", "blocks.1.hook_attn_out"])
    assert resolved[0][0] is resolved[1][0] and resolved[0][1] == "out"
    assert type(resolved[0][0]).__name__ == "BertLayer" and fm.hf is fast_model(minilm).hf
    assert fast_points(minilm, ["blocks.0.attn.hook_pattern"]) is None  # no module boundary: the bridge runs it
    with attach(minilm, [("blocks.0.attn.hook_pattern", lambda a, hook: None)]) as fm:
        assert fm is None
    with pytest.raises(ConfigError, match="attn_implementation"):
        prepare(minilm, "flash")


def test_hooks_on_the_bridge_keep_the_bridge(gpt2, tmp_path):
    """A caller's own hooks on the bridge still act on a capture: the fast path steps aside."""
    seen = []
    with gpt2.hooks(fwd_hooks=[("blocks.0.hook_out", lambda a, hook: seen.append(1))]):
        assert fast_points(gpt2, ["blocks.1.hook_out"]) is None
        s = capture(gpt2, TEXTS[:2], layers=[1], out=tmp_path / "s", progress=False)
    assert seen and s.manifest["model"]["attn_implementation"] == "eager"


def test_twin_shares_the_bridge_parameters(gpt2):
    twin = {id(p) for p in fast_model(gpt2).hf.parameters()}
    assert len(twin) == len(list(fast_model(gpt2).hf.parameters())) > 0
    assert twin <= {id(p) for p in gpt2.original_model.parameters()}  # the same tensors, none copied
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    assert not any(isinstance(m, GeneralizedComponent) for m in fast_model(gpt2).hf.modules())
    assert any(isinstance(m, GeneralizedComponent) for m in gpt2.original_model.modules())  # the bridge is intact


@pytest.mark.parametrize("which", ["gpt2", "llama", "smollm2"])
def test_generation_equals_the_bridge(which, request):
    """Greedy tokens identical, watcher scores within 1e-4, steering masks identical, with and without hooks."""
    model = request.getfixturevalue(which)
    d, L = int(model.cfg.d_model), int(model.cfg.n_layers)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    v = v / v.norm() * (4.0 if which == "smollm2" else 0.5)
    prompts = ["The capital of France is", "Hi", "Once upon a time a small model learned"]
    steer = Act(f"blocks.{L // 2}.hook_resid_post", lambda x: x + v.to(x.dtype), positions="generated")
    watch = projection_watch(v, hook=f"blocks.{L - 1}.hook_out", name="p")
    n = 6 if which == "smollm2" else 10
    for kw in (dict(), dict(act=[steer], watch=[watch])):
        a = generate(model, prompts, max_new_tokens=n, fast=False, stop_at_eos=False, **kw)
        b = generate(model, prompts, max_new_tokens=n, stop_at_eos=False, **kw)
        assert (a.config["attn_implementation"], b.config["attn_implementation"]) == ("eager", "sdpa")
        assert torch.equal(a.token_ids, b.token_ids)
        assert all(torch.equal(x, y) for x, y in zip(a.steered, b.steered))
        for name in a.scores:
            torch.testing.assert_close(a.scores[name], b.scores[name], atol=1e-4, rtol=0, equal_nan=True)


def test_detector_scores_equal_the_bridge(gpt2):
    from interp.detectors import Detector
    from interp.model import model_identity

    v = torch.randn(int(gpt2.cfg.d_model), generator=torch.Generator().manual_seed(2))
    det = Detector.from_direction(v / v.norm(), model_identity(gpt2), hook="blocks.1.hook_out")
    fast = det.score(gpt2, TEXTS, progress=False)
    with gpt2.hooks(fwd_hooks=[("blocks.0.hook_out", lambda a, hook: None)]):  # forces the bridge
        slow = det.score(gpt2, TEXTS, progress=False)
    for a, b in zip(slow.scores, fast.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_a_bridge_switched_to_other_numerics_runs_itself(llama):
    """Options that change what the bridge computes, set after loading, turn the fast path off."""
    llama.cfg.use_hook_mlp_in = True
    try:
        assert fast_points(llama, ["blocks.0.hook_out"]) is None
    finally:
        llama.cfg.use_hook_mlp_in = False
    assert fast_points(llama, ["blocks.0.hook_out"]) is not None
