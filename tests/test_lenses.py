"""Lenses: the logit lens reproduces the model's logits, the tuned lens recovers planted linear layers and beats the
logit lens held out, the shortcut is numpy's least squares, the future lens finds a planted look-ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.errors import AnalysisError, ConfigError
from interp.lenses import (Head, TunedLens, future_lens, kl_to_final, lens_kl, lens_rows, linear_shortcut,
                           train_tuned_lens, trajectory)
from interp.store import ActivationStore

TEXTS = [
    "The capital of France is Paris and the capital of Japan is Tokyo.",
    "Once upon a time a small model learned to count one two three four five.",
    "I love this movie, it is wonderful and happy.",
    "Marie Curie studied radioactivity in Paris and won two Nobel prizes.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Steering vectors push a model's residual stream along a direction.",
] * 8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from interp.model import load_model
    from interp.testing import tiny_decoder

    return load_model(str(tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")), device="cpu")


@pytest.fixture(scope="module")
def gpt2_store(gpt2, tmp_path_factory):
    from interp.capture import capture

    data = [{"text": t + f" Example {i}.", "label": i % 2} for i, t in enumerate(TEXTS)]
    return capture(gpt2, data, hooks="resid_post", positions="all", dtype="float32",
                   out=tmp_path_factory.mktemp("lens") / "store", progress=False)


def _last_layer_matches(model):
    toks = model.to_tokens("The capital of France is Paris.")
    n = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks, names_filter=lambda name: name == f"blocks.{n - 1}.hook_out")
        lens = Head.from_model(model)(cache[f"blocks.{n - 1}.hook_out"])
    torch.testing.assert_close(lens, logits.float(), atol=1e-4, rtol=0)
    tr = trajectory(model, "The capital of France is Paris.", k=3)
    assert tr.kl[-1].abs().max() < 1e-5 and tr.kl[0].mean() > 1e-4  # the first layer does differ
    assert tr.top_ids[-1, :, 0].tolist() == logits[0].argmax(-1).tolist()


def test_logit_lens_last_layer_is_the_models_logits_gpt2_llama(gpt2, llama):
    _last_layer_matches(gpt2)
    _last_layer_matches(llama)


def test_logit_lens_last_layer_is_the_models_logits_smollm2(smollm2):
    _last_layer_matches(smollm2)


def test_store_rows_decode_like_the_live_model(gpt2, gpt2_store):
    rows = torch.nonzero(gpt2_store.example_ids() == 0).flatten()
    out = lens_rows(gpt2_store, gpt2, gpt2.cfg.n_layers - 1, rows, target=gpt2_store.token_ids()[rows].long())
    with torch.no_grad():
        logits = gpt2(gpt2.to_tokens(TEXTS[0] + " Example 0."))[0]
    torch.testing.assert_close(out["logits"], logits, atol=1e-4, rtol=0)
    assert out["kl"].abs().max() < 1e-5
    ranks = (logits > logits.gather(1, gpt2_store.token_ids()[rows].long()[:, None])).sum(1)
    assert out["target_rank"].tolist() == ranks.tolist()


def _planted(tmp_path, n=1500, d=8, v=40, n_layers=3, seed=0):
    """A 'model' whose last residual is a known affine map of every earlier one: h_last = h_l M_l + c_l."""
    g = torch.Generator().manual_seed(seed)
    W_U = torch.randn(d, v, generator=g) * 1.5
    h_last = torch.randn(n, d, generator=g)
    maps, acts = [], {}
    for layer in range(n_layers - 1):
        M = torch.eye(d) + 0.4 * torch.randn(d, d, generator=g) / d**0.5
        c = 0.3 * torch.randn(d, generator=g)
        acts[f"blocks.{layer}.hook_out"] = (h_last - c) @ torch.linalg.inv(M)
        maps.append((M, c))
    acts[f"blocks.{n_layers - 1}.hook_out"] = h_last
    store = ActivationStore.from_tensors(tmp_path / "planted", acts, positions="last",
                                         model={"name": "planted", "d_model": d, "n_layers": n_layers})
    return store, Head.from_matrix(W_U), maps


def test_tuned_lens_recovers_planted_linear_layers(tmp_path):
    store, head, maps = _planted(tmp_path)
    lens = train_tuned_lens(store, head, steps=1500, batch_size=512, optimizer="adam", lr=3e-2, precision="float32",
                            progress=False)
    assert lens.layers == [0, 1]
    for i, (M, c) in enumerate(maps):  # translate(h) = h @ weight.T + bias must be h @ M + c
        assert torch.allclose(lens.weight[i].T, M, atol=0.05), (lens.weight[i].T - M).abs().max()
        assert torch.allclose(lens.bias[i], c, atol=0.05)
    kl = lens_kl(store, head, lens)
    assert (kl.kl_tuned[:2] < 0.01 * kl.kl_logit[:2]).all()


def test_tuned_lens_beats_logit_lens_held_out_and_round_trips(gpt2, gpt2_store, tmp_path):
    lens = train_tuned_lens(gpt2_store, gpt2, steps=150, optimizer="adam", lr=1e-2, progress=False)
    assert all(p.grad is None and p.requires_grad for p in gpt2.unembed.parameters())  # the model stays frozen
    kl = lens_kl(gpt2_store, gpt2, lens)
    assert (kl.kl_tuned <= kl.kl_logit + 1e-7).all() and kl.kl_tuned[0] < 0.5 * kl.kl_logit[0]
    logit_t, tuned_t = trajectory(gpt2, "The capital of France", k=2), trajectory(gpt2, "The capital of France", lens)
    fig = logit_t.plot(tuned_t, color="kl")
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and fig.data[1].text[0][0] == tuned_t.top_tokens[0][0][0]
    assert (tuned_t.kl[:-1].mean(1) < logit_t.kl[:-1].mean(1)).all()
    from interp.plots import lens_kl_figure

    assert len(lens_kl_figure(kl).data) == 2
    lens.save(tmp_path / "lens")
    back = TunedLens.load(tmp_path / "lens")
    assert back.layers == lens.layers and torch.equal(back.weight, lens.weight)
    assert back.model["weights_hash"] == lens.model["weights_hash"]
    h = gpt2_store.activations(0, torch.arange(5))
    torch.testing.assert_close(back.logits(gpt2, h, 0), lens.logits(gpt2, h, 0))
    (tmp_path / "lens" / "tuned_lens.safetensors").write_bytes(b"garbage")
    with pytest.raises(AnalysisError, match="damaged"):
        TunedLens.load(tmp_path / "lens")


def test_shortcut_is_numpy_least_squares(gpt2, gpt2_store):
    sc = linear_shortcut(gpt2_store, gpt2, max_rows=None, progress=False)
    train, test = gpt2_store.train_test_split(test_size=0.2, seed=0)
    X = gpt2_store.activations(0, train).double().numpy()
    Y = gpt2_store.activations(gpt2.cfg.n_layers - 1, train).double().numpy()
    sol = np.linalg.lstsq(np.c_[X, np.ones(len(X))], Y, rcond=None)[0]
    np.testing.assert_allclose(X @ sc.weight[0].double().numpy() + sc.bias[0].double().numpy(),
                               np.c_[X, np.ones(len(X))] @ sol, atol=2e-4)
    last = sc.frame.iloc[-1]
    assert last.precision_at_1 == 1.0 and last.n == test.numel()
    assert (sc.frame.precision_at_1 >= sc.frame.logit_lens_precision_at_1 - 0.02).all()


def test_future_lens_finds_a_planted_look_ahead(tmp_path):
    """Layer 0 at position t holds the token at t+2; the last layer at t holds the token at t+1 (a perfect model);
    layer 1 is noise. The future lens at offset 2 reads t+2 from layer 0 and not from layer 1."""
    g = torch.Generator().manual_seed(0)
    v, n_ex, T = 12, 120, 10
    seqs = torch.randint(v, (n_ex, T + 3), generator=g)
    onehot = torch.eye(v) * 4
    rows = {"blocks.0.hook_out": [], "blocks.1.hook_out": [], "blocks.2.hook_out": []}
    for s in seqs:
        rows["blocks.0.hook_out"].append(onehot[s[2 : T + 2]] + 0.1 * torch.randn(T, v, generator=g))
        rows["blocks.1.hook_out"].append(torch.randn(T, v, generator=g))
        rows["blocks.2.hook_out"].append(onehot[s[1 : T + 1]])
    acts = {k: torch.cat(x) for k, x in rows.items()}
    store = ActivationStore.from_tensors(
        tmp_path / "future", acts, examples=[{"id": i} for i in range(n_ex)],
        example_id=torch.arange(n_ex).repeat_interleave(T), position=torch.arange(T).repeat(n_ex),
        token_id=seqs[:, :T].reshape(-1), positions="all", model={"name": "planted", "d_model": v, "n_layers": 3})
    fl = future_lens(store, Head.from_matrix(torch.eye(v)), offsets=(2,), progress=False).frame.set_index("layer")
    assert fl.accuracy[0] > 0.95 and fl.accuracy[1] < 0.25 and fl.agreement_with_model[2] < 0.25


def test_lens_errors_are_one_line(gpt2, minilm, gpt2_store, tmp_path):
    with pytest.raises(ConfigError, match="no unembedding"):
        Head.from_model(minilm)
    part = ActivationStore.from_tensors(tmp_path / "part", {"blocks.0.hook_out": torch.randn(4, 64)}, positions="all",
                                        model={"name": "x", "d_model": 64, "n_layers": 2})
    with pytest.raises(ConfigError, match=r"lacks the last layer's residual \(blocks.1.hook_out\)"):
        train_tuned_lens(part, gpt2, progress=False)
    mean = ActivationStore.from_tensors(tmp_path / "mean", {f"blocks.{i}.hook_out": torch.randn(4, 64) for i in (0, 1)},
                                        positions="mean", model={"name": "x", "d_model": 64, "n_layers": 2})
    with pytest.raises(ConfigError, match="positions='mean'"):
        lens_kl(mean, gpt2)
    with pytest.raises(ConfigError, match="d_model"):
        lens_kl(gpt2_store, Head.from_matrix(torch.randn(8, 10)))


def test_kl_to_final_matches_its_definition():
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    p, q = a.softmax(-1).numpy(), b.softmax(-1).numpy()
    np.testing.assert_allclose(kl_to_final(a, b).numpy(), (p * np.log(p / q)).sum(-1), atol=1e-6)


def test_shortcut_init_starts_at_the_least_squares_map(gpt2, gpt2_store):
    """init='shortcut' starts from the ridge least-squares map to the last layer: with a tiny step count and
    learning rate the translator stays there, and it reads the final distribution better than the identity."""
    lens = train_tuned_lens(gpt2_store, gpt2, [0], steps=1, lr=1e-12, init="shortcut", progress=False)
    train, _ = gpt2_store.train_test_split(test_size=0.2, seed=0)
    X, Y = gpt2_store.activations(0, train), gpt2_store.activations(1, train)
    fit = X @ lens.weight[0].T + lens.bias[0]
    assert ((fit - Y) ** 2).sum() < 0.1 * ((X - Y) ** 2).sum()
    kl = lens_kl(gpt2_store, gpt2, lens, [0])
    assert kl.kl_tuned[0] < kl.kl_logit[0]
    with pytest.raises(ConfigError, match="optimizer"):
        train_tuned_lens(gpt2_store, gpt2, optimizer="lbfgs")


def test_bfloat16_head_is_the_same_map(gpt2):
    head = Head.from_model(gpt2)
    h = torch.randn(6, 64)
    fast = head.cast(torch.bfloat16)
    assert fast is not head and head.cast(torch.float32) is head
    torch.testing.assert_close(fast(h), head(h), atol=0.05, rtol=0.02)
