"""steering: add / ablate / clamp are exact, positions are honoured in forwards and generation (left padding,
KV cache, no cache), hooks never outlive their context, steering vectors equal diff-in-means over a store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interp.errors import ConfigError, HookError, InterpError, SteeringError
from interp.steering import (
    GenerationResult,
    Intervention,
    _trackers,
    generate,
    logit_diff,
    probe_score,
    projection,
    steer,
    steering_vector,
    sweep,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Hi", "Once upon a time a small model learned"]
POS = ["I love this movie, it is wonderful", "What a happy day", "This is great and happy", "I love it so much"]
NEG = ["I hate this film, it is terrible", "What a sad day", "This is awful and sad", "I hate it so much"]


def unit(d: int, seed: int = 1) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def no_hooks_left(model) -> bool:
    """Only the bridge's own permanent hooks remain (BERT wires some), and nothing on the HF model."""
    left = [
        n for n, hp in model.hook_dict.items()
        if any(not h.is_permanent for h in hp.fwd_hooks) or len(hp._forward_hooks) != len(hp.fwd_hooks)
    ]
    hf = model.original_model
    return not left and not hf._forward_pre_hooks and not hf._forward_hooks and model not in _trackers


def capture_at(model, hook, *args, **kwargs):
    """Run the model and return (logits, activation at hook after any steering)."""
    got = {}

    def save(a, hook):
        got["x"] = a.detach().clone()

    with model.hooks(fwd_hooks=[(hook, save)]):
        logits = model(*args, **kwargs)
    return logits, got["x"]


# ----------------------------------------------------------------------------------------------- the operations


def test_add_unembedding_direction_raises_logit_monotonically(gpt2):
    hook, tok = "blocks.1.hook_out", 123
    v = gpt2.W_U[:, tok].detach()
    ids = gpt2.to_tokens(PROMPTS[0])
    clean = gpt2(ids)
    logit = []
    for a in [-8.0, -4.0, -1.0, 0.0, 1.0, 4.0, 8.0]:
        with steer(gpt2, v, alpha=a, hook=hook):
            out = gpt2(ids)
        if a == 0.0:
            assert torch.equal(out, clean)  # alpha 0 is exactly the unsteered model
        logit.append(out[0, :, tok])
    L = torch.stack(logit)  # [alpha, pos]
    assert bool((L[1:] > L[:-1]).all()), L
    assert no_hooks_left(gpt2)


@pytest.mark.parametrize("model_name", ["gpt2", "minilm"])
def test_ablate_and_clamp_are_exact(request, model_name):
    model = request.getfixturevalue(model_name)
    hook = "blocks.1.hook_resid_post"
    u = unit(int(model.cfg.d_model))
    toks = model.to_tokens(PROMPTS[0])
    _, clean = capture_at(model, hook, toks)
    with steer(model, u, op="ablate", hook=hook):
        _, x = model.run_with_cache(toks, names_filter="blocks.1.hook_out")
        x = x["blocks.1.hook_out"]
    assert (x @ u).abs().max() < 1e-5
    torch.testing.assert_close(x, clean - (clean @ u)[..., None] * u, atol=1e-5, rtol=0)
    for value in (2.5, -7.0):
        with steer(model, u * 3.0, op="clamp", value=value, hook=hook):
            _, x = capture_at(model, hook, toks)
        torch.testing.assert_close(x @ u, torch.full_like(x @ u, value), atol=1e-5, rtol=0)
        torch.testing.assert_close(x - (x @ u)[..., None] * u, clean - (clean @ u)[..., None] * u, atol=1e-5, rtol=0)
    with steer(model, u, op="add", alpha=1.5, hook=hook):
        _, x = capture_at(model, hook, toks)
    torch.testing.assert_close(x, clean + 1.5 * u, atol=1e-6, rtol=0)
    assert no_hooks_left(model)


def test_padding_is_never_steered_and_real_tokens_are(minilm):
    hook = "blocks.2.hook_out"
    u = unit(384)
    from interp.model import tokenize

    toks = tokenize(minilm, ["short", "a much longer sentence with many more tokens in it"])
    _, clean = capture_at(minilm, hook, toks.input_ids, attention_mask=toks.attention_mask)
    with steer(minilm, u, alpha=2.0, hook=hook) as h:
        _, x = capture_at(minilm, hook, toks.input_ids, attention_mask=toks.attention_mask)
    real = toks.attention_mask.bool()
    torch.testing.assert_close(x[real], clean[real] + 2.0 * u, atol=1e-5, rtol=0)
    assert torch.equal(x[~real], clean[~real])
    assert torch.equal(h.steered()[:, : real.shape[1]], real)


# ----------------------------------------------------------------------------------------------- positions


def test_positions_in_a_plain_forward(gpt2):
    hook = "blocks.0.hook_out"
    u = unit(64)
    ids = gpt2.to_tokens(PROMPTS[2])
    L = ids.shape[1]
    clean_logits, clean = capture_at(gpt2, hook, ids)
    for positions, expect in [
        ("generated", [L - 1]),
        ("prompt", list(range(L))),
        ("all", list(range(L))),
        ([1, -1], [1, L - 1]),
        ([0, 3], [0, 3]),
    ]:
        with steer(gpt2, u, alpha=3.0, hook=hook, positions=positions) as h:
            logits, x = capture_at(gpt2, hook, ids)
        moved = ((x - clean).norm(dim=-1) > 1e-4)[0].nonzero().flatten().tolist()
        assert moved == expect, (positions, moved)
        assert h.steered()[0].nonzero().flatten().tolist() == expect
        first = min(expect)
        assert torch.equal(logits[0, :first], clean_logits[0, :first])  # causal: nothing before is touched
        assert (logits[0, first] - clean_logits[0, first]).abs().max() > 1e-4


def test_generated_leaves_prompt_untouched_and_reaches_first_token(gpt2):
    """The prefill's activations at prompt positions 0..L-2 are bit-identical; the last prompt position (whose
    output is the first generated token) is steered, so the first token's distribution changes."""
    hook = "blocks.0.hook_out"
    u = unit(64)
    iv = Intervention(u, alpha=4.0, positions="generated", hook=hook)

    def first_call(box):
        def save(a, hook):
            box.setdefault("prefill", a.detach().clone())  # the first forward of generate: the whole prompt

        return save

    base = generate(gpt2, PROMPTS, max_new_tokens=4, return_logits=True, stop_at_eos=False)
    steered_box, clean_box = {}, {}
    with steer(gpt2, iv):
        with gpt2.hooks(fwd_hooks=[(hook, first_call(steered_box))]):
            gpt2.generate(PROMPTS, max_new_tokens=2, do_sample=False, verbose=False)
    with gpt2.hooks(fwd_hooks=[(hook, first_call(clean_box))]):
        gpt2.generate(PROMPTS, max_new_tokens=2, do_sample=False, verbose=False)
    steered_prefill, clean_prefill = steered_box["prefill"], clean_box["prefill"]
    # model.generate left-pads: row i's prompt occupies the last L_i columns
    T = clean_prefill.shape[1]
    for i, p in enumerate(base.prompt_ids):
        L = len(p)
        assert torch.equal(steered_prefill[i, T - L : T - 1], clean_prefill[i, T - L : T - 1])
        assert (steered_prefill[i, T - 1] - clean_prefill[i, T - 1]).norm() > 1.0
    g = generate(gpt2, PROMPTS, steering=[iv], max_new_tokens=4, return_logits=True, stop_at_eos=False)
    assert ((g.logits[:, 0] - base.logits[:, 0]).abs().amax(-1) > 1e-3).all()
    for i, p in enumerate(g.prompt_ids):
        L = len(p)
        assert g.steered[0][i].nonzero().flatten().tolist() == list(range(L - 1, L + 3))
    assert no_hooks_left(gpt2)


def test_cached_generation_equals_full_forward_with_same_positions(gpt2):
    hook = "blocks.1.hook_out"
    u = unit(64, seed=5)
    prompt = PROMPTS[2]
    iv = Intervention(u, alpha=2.0, positions="generated", hook=hook)
    g = generate(gpt2, prompt, steering=[iv], max_new_tokens=6, return_logits=True, project=True, stop_at_eos=False)
    L = len(g.prompt_ids[0])
    seq = g.sequences()[0][None]
    idx = list(range(L - 1, L + 6))
    with steer(gpt2, u, alpha=2.0, hook=hook, positions=idx):
        logits, x = capture_at(gpt2, hook, seq)
    torch.testing.assert_close(logits[0, L - 1 : L + 5], g.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x[0, L - 1 : L + 5] @ u, g.projections[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(logits[0, L - 1 : L + 5].argmax(-1), g.token_ids[0])


def test_batched_left_padded_equals_one_at_a_time_and_model_generate(gpt2):
    iv = Intervention(unit(64, 7), alpha=3.0, positions="generated", hook="blocks.0.hook_out")
    batch = generate(gpt2, PROMPTS, steering=[iv], max_new_tokens=5, return_logits=True, stop_at_eos=False)
    for i, p in enumerate(PROMPTS):
        one = generate(gpt2, p, steering=[iv], max_new_tokens=5, return_logits=True, stop_at_eos=False)
        assert torch.equal(one.token_ids[0], batch.token_ids[i])
        torch.testing.assert_close(one.logits[0], batch.logits[i], atol=1e-4, rtol=1e-4)
    # the same steering through TransformerBridge.generate, with and without its KV cache
    for cached in (True, False):
        with steer(gpt2, iv):
            out = gpt2.generate(PROMPTS[2], max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False,
                                use_past_kv_cache=cached, return_type="tokens", output_logits=True)
        assert torch.equal(out.sequences[0, -5:], batch.token_ids[2]), cached
        torch.testing.assert_close(torch.stack(out.logits, 1)[0], batch.logits[2], atol=1e-4, rtol=1e-4)
    assert no_hooks_left(gpt2)


def test_generate_is_seeded_and_reports_its_config(gpt2):
    iv = Intervention(unit(64), alpha=1.0, hook="blocks.1.hook_out")
    a = generate(gpt2, PROMPTS, steering=[iv], temperature=1.0, seed=11, max_new_tokens=8, stop_at_eos=False)
    b = generate(gpt2, PROMPTS, steering=[iv], temperature=1.0, seed=11, max_new_tokens=8, stop_at_eos=False)
    c = generate(gpt2, PROMPTS, steering=[iv], temperature=1.0, seed=12, max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(a.token_ids, b.token_ids) and a.texts == b.texts
    assert not torch.equal(a.token_ids, c.token_ids)
    assert a.texts[1] == gpt2.tokenizer.decode(a.token_ids[1].tolist())
    assert a.config["seed"] == 11 and a.config["steering"][0]["op"] == "add"


def test_rows_that_hit_eos_stop_and_are_padded(gpt2):
    eos, pad = gpt2.tokenizer.eos_token_id, gpt2.tokenizer.pad_token_id
    L0 = gpt2.to_tokens(PROMPTS[0]).shape[1]
    push_eos = Intervention(gpt2.W_U[:, eos].detach(), alpha=500.0, positions=[L0 - 1], hook="blocks.1.hook_out")
    g = generate(gpt2, PROMPTS, steering=[push_eos], max_new_tokens=4, project=True)
    assert len(g.prompt_ids[0]) == L0 and all(len(p) != L0 for p in g.prompt_ids[1:])
    assert int(g.lengths[0]) == 1 and g.token_ids[0, 0] == eos and g.texts[0] == ""
    assert (g.token_ids[0, 1:] == pad).all() and torch.isnan(g.projections[0, 1:]).all()
    assert (g.lengths[1:] == 4).all() and g.token_ids.shape == (3, 4)
    # an index list means the same positions in every row: a prompt token of the long prompt, a generated
    # token of "Hi" that is never fed back (the 4th of 4), so only rows 0 and 2 were touched
    assert len(g.prompt_ids[2]) > L0 and len(g.prompt_ids[1]) + 3 == L0 - 1
    assert [r.nonzero().flatten().tolist() for r in g.steered[0]] == [[L0 - 1], [], [L0 - 1]]


def test_generation_result_round_trip(gpt2, tmp_path):
    iv = Intervention(unit(64), alpha=1.0, hook="blocks.1.hook_out", positions="generated")
    g = generate(gpt2, PROMPTS[:2], steering=[iv], max_new_tokens=3, project=True)
    back = GenerationResult.load(g.save(tmp_path / "gen"))
    assert back.texts == g.texts and torch.equal(back.token_ids, g.token_ids)
    assert torch.equal(back.steered[0], g.steered[0]) and torch.equal(back.projections, g.projections)
    assert json.loads((tmp_path / "gen" / "generation.json").read_text())["config"]["steering"][0]["alpha"] == 1.0


# ----------------------------------------------------------------------------------------------- hooks and nesting


def test_hooks_removed_on_exit_and_on_exception(gpt2):
    u = unit(64)
    with steer(gpt2, u, alpha=1.0, hook="blocks.0.hook_out"):
        gpt2(gpt2.to_tokens("x"))
    assert no_hooks_left(gpt2)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(gpt2, u, alpha=1.0, hook="blocks.0.hook_out", positions="generated"):
            with steer(gpt2, u, op="ablate", hook="blocks.1.hook_out"):
                raise RuntimeError("boom")
    assert no_hooks_left(gpt2)
    # an error raised inside the forward (a position rule outside a full forward) also cleans up
    with pytest.raises(SteeringError):
        with steer(gpt2, u, alpha=1.0, hook="blocks.0.hook_out", positions="prompt"):
            gpt2.blocks[0](torch.zeros(1, 2, 64))
    assert no_hooks_left(gpt2)


def test_nested_contexts_compose_in_order(gpt2):
    hook = "blocks.1.hook_out"
    u = unit(64)
    ids = gpt2.to_tokens(PROMPTS[0])
    _, clean = capture_at(gpt2, hook, ids)
    with steer(gpt2, u, alpha=3.0, hook=hook):
        with steer(gpt2, u, op="ablate", hook=hook):
            _, x = capture_at(gpt2, hook, ids)
    assert (x @ u).abs().max() < 1e-5  # add then ablate: nothing left along u
    with steer(gpt2, u, op="ablate", hook=hook):
        with steer(gpt2, u, alpha=3.0, hook=hook):
            _, x = capture_at(gpt2, hook, ids)
    torch.testing.assert_close(x @ u, torch.full_like(x @ u, 3.0), atol=1e-5, rtol=0)  # ablate then add
    w = unit(64, seed=9)
    with steer(gpt2, [Intervention(u, alpha=2.0, hook=hook), Intervention(w, alpha=-1.0, hook=hook)]):
        with steer(gpt2, u, alpha=0.5, hook="blocks.1.hook_resid_post"):
            _, x = capture_at(gpt2, hook, ids)
    torch.testing.assert_close(x, clean + 2.5 * u - w, atol=1e-5, rtol=0)
    assert no_hooks_left(gpt2)


# ----------------------------------------------------------------------------------------------- steering vectors


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_steering_vector_equals_diff_in_means_of_a_store(minilm, tmp_path, positions):
    from interp.capture import capture
    from interp.directions import diff_in_means

    hook = "blocks.3.hook_resid_post"
    d = steering_vector(minilm, POS, NEG, hook, positions=positions, batch_size=3, progress=False)
    rows = [{"text": t, "label": 1} for t in POS] + [{"text": t, "label": 0} for t in NEG]
    store = capture(minilm, rows, [hook], positions, tmp_path / "s", batch_size=5, dtype="float32", progress=False)
    ref = diff_in_means(store, hook)
    assert d.hook == ref.hook == "blocks.3.hook_out"
    torch.testing.assert_close(d.vector, ref.vector, atol=1e-5, rtol=0)
    assert d.norm == pytest.approx(ref.norm, rel=1e-4)
    assert d.provenance["n_positive"] == 4 and d.provenance["model"]["d_model"] == 384
    assert d.stats["mean_pos"] > d.stats["mean_neg"]


def test_pca_steering_vector_is_the_top_axis_of_pair_differences(gpt2):
    from interp.capture import run_hooks
    from interp.model import tokenize

    hook = "blocks.1.hook_out"
    d = steering_vector(gpt2, POS, NEG, hook, method="pca", progress=False)
    acts = {}
    for name, prompts in (("p", POS), ("n", NEG)):
        toks = tokenize(gpt2, prompts)
        a = run_hooks(gpt2, toks, [hook])[hook]
        acts[name] = torch.stack([a[i, n - 1] for i, n in enumerate(toks.lengths)])
    D = acts["p"] - acts["n"]
    top = torch.linalg.svd(D, full_matrices=False).Vh[0]
    assert abs(float(d.vector @ top)) > 1 - 1e-4
    assert float((D @ d.vector).mean()) > 0


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(direction=torch.ones(32), alpha=1.0, hook="blocks.0.hook_out"), SteeringError, "32 dimensions"),
        (dict(direction=torch.ones(64), alpha=1.0, hook="blocks.9.hook_out"), HookError, "no hook"),
        (dict(direction=torch.ones(64), alpha=float("nan"), hook="blocks.0.hook_out"), SteeringError, "alpha is nan"),
        (dict(direction=torch.ones(64), alpha=float("inf"), hook="blocks.0.hook_out"), SteeringError, "finite"),
        (dict(direction=torch.ones(64), alpha=1.0), SteeringError, "needs hook"),
        (dict(direction=torch.ones(64), alpha=1.0, op="scale", hook="blocks.0.hook_out"), ConfigError, "unknown"),
        (dict(direction=torch.ones(64), op="add", hook="blocks.0.hook_out"), ConfigError, "needs alpha"),
        (dict(direction=torch.zeros(64), op="ablate", hook="blocks.0.hook_out"), SteeringError, "non-zero"),
        (dict(direction=torch.full((64,), float("nan")), alpha=1.0, hook="blocks.0.hook_out"), SteeringError, "NaN"),
        (dict(direction=torch.ones(64), alpha=1.0, hook="blocks.0.hook_out", positions="mid"), ConfigError, "posit"),
    ],
)
def test_bad_input_is_a_clear_one_line_error(gpt2, kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as e:
        with steer(gpt2, **kwargs):
            gpt2(gpt2.to_tokens("never runs"))
    assert isinstance(e.value, InterpError) and "\n" not in str(e.value)
    assert no_hooks_left(gpt2)


def test_direction_from_another_model_and_encoder_generation(gpt2, minilm):
    from interp.directions import Direction

    d384 = Direction(vector=unit(384), hook="blocks.0.hook_out")
    with pytest.raises(SteeringError, match="384 dimensions.*width 64"):
        with steer(gpt2, d384, alpha=1.0):
            pass
    with pytest.raises(SteeringError, match="encoder"):
        generate(minilm, "hello", max_new_tokens=2)
    with pytest.raises(ConfigError, match="context"):
        generate(gpt2, "hello", max_new_tokens=500)
    assert no_hooks_left(gpt2) and no_hooks_left(minilm)


# ----------------------------------------------------------------------------------------------- sweeps and the CLI


def test_sweep_table_figure_and_metrics(gpt2):
    from interp.directions import Direction

    tok, other = 123, 45
    d = Direction(vector=gpt2.W_U[:, tok] - gpt2.W_U[:, other], hook="blocks.1.hook_out")
    res = sweep(
        gpt2, PROMPTS[:2], d, [-4, 0, 4],
        metric={"proj": projection(d), "ld": logit_diff([tok], [other], at="first"), "probe": probe_score(d),
                "chars": lambda model, texts, ids: [len(t) for t in texts]},
        max_new_tokens=4, progress=False,
    )
    table, fig = res
    assert list(table.columns) == ["alpha", "prompt", "text", "proj", "ld", "probe", "chars"] and len(table) == 6
    means = res.summary()
    assert means[("ld", "mean")].is_monotonic_increasing and means[("proj", "mean")].is_monotonic_increasing
    assert fig.data and fig.layout.xaxis.title.text.startswith("alpha")
    titles = [fig.layout[k].title.text for k in fig.layout if k.startswith("yaxis")]
    assert "ld = logit_diff(123 - 45, first token) (logits)" in titles
    zero = table[table.alpha == 0]
    base = generate(gpt2, PROMPTS[:2], max_new_tokens=4)
    assert list(zero.text) == base.texts  # alpha 0 generates exactly what the unsteered model does


def test_cli_steer_and_sweep(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from interp.cli import main
    from interp.directions import Direction

    Direction(vector=unit(64), hook="blocks.1.hook_resid_post").save(tmp_path / "dir")
    common = ["--model", tiny_gpt2_path, "--direction", tmp_path / "dir", "--prompt", "The capital"]
    common = [str(c) for c in common] + ["--max-new-tokens", "3"]
    assert main(["steer", *common, "--alpha", "4", "--op", "add", "--steer-positions", "generated"]) == 0
    out = capsys.readouterr().out
    assert "add 4 at blocks.1.hook_out" in out and "unsteered" in out and "steered" in out
    assert main(["steer", *common, "--sweep", "-4,-2,0,2,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["alpha"] for r in rows] == [-4, -2, 0, 2, 4]
    assert main(["steer", *common, "--alpha", "nan"]) == 2
    assert main(["steer", *common, "--alpha", "1", "--hook", "blocks.8.hook_out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "alpha is nan" in err and "no hook" in err


# ----------------------------------------------------------------------------------------------- SAE row vs diff-in-means


def planted_sae_store(model, path, d: int = 64):
    """A labelled store at blocks.1.hook_out whose classes differ along a known unit ``v``, and an SAE whose
    latent 3 reads and writes ``-v`` (it fires on the negative class); other latents are random."""
    from interp.model import model_identity
    from interp.sae import SAE
    from interp.store import ActivationStore

    hook = "blocks.1.hook_out"
    g = torch.Generator().manual_seed(0)
    v = unit(d, seed=7)
    y = torch.arange(400) % 2
    X = torch.randn(400, d, generator=g) + 3 * v * (2 * y[:, None] - 1)
    ident = model_identity(model)
    store = ActivationStore.from_tensors(path, {hook: X}, labels=y.tolist(), model={"name": ident["name"], "d_model": d})
    sae = SAE(d, 8, "topk", k=2, hook_name=hook, seed=0)
    with torch.no_grad():
        sae.W_enc[:, 3] = -5 * v
        sae.W_dec[3] = -v
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return store, sae, v, hook


def test_compare_sae_steering_moves_the_residual_by_alpha_times_the_cosine(gpt2, tmp_path):
    from interp.directions import Direction, diff_in_means_tensor
    from interp.comparisons import labelled_split
    from interp.comparisons import compare_sae_steering

    store, sae, v, hook = planted_sae_store(gpt2, tmp_path / "store")
    res = compare_sae_steering(gpt2, PROMPTS[:2], store, "label", sae, alphas=[0, 1, 2], max_new_tokens=1,
                               metric={"proj": projection(Direction(v, hook))}, progress=False)  # fmt: skip
    cfg = res.config
    assert cfg["latent"] == 3 and cfg["decoder_sign"] == -1.0 and cfg["latent_gap"] < 0
    train, _, y_all, _ = labelled_split(store, "label")
    X_tr = store.activations(hook, train).float()
    assert cfg["scale"] == pytest.approx(float(X_tr.norm(dim=1).mean()), rel=1e-5)
    dim = diff_in_means_tensor(X_tr, y_all[train]).float()
    cos = float(dim @ v / dim.norm())
    assert list(cfg["cosines"].values()) == [pytest.approx(cos, abs=1e-5)]
    # one new token: the projection is read at the last prompt position, whose unsteered value does not depend on
    # alpha, so it moves by exactly alpha * scale * (u . v): 1 for the flipped decoder row, cos for diff-in-means
    t = res.table
    means = t.groupby(["method", "alpha"])["proj"].mean()
    sae_name = "SAE latent 3 (decoder row)"
    assert set(t["method"]) == {sae_name, "diff-in-means"} and len(t) == 2 * 3 * 2
    assert means[(sae_name, 0.0)] == pytest.approx(means[("diff-in-means", 0.0)], abs=1e-6)
    for a in (1.0, 2.0):
        assert means[(sae_name, a)] - means[(sae_name, 0.0)] == pytest.approx(a * cfg["scale"], rel=1e-4)
        assert means[("diff-in-means", a)] - means[("diff-in-means", 0.0)] == pytest.approx(a * cfg["scale"] * cos,
                                                                                              rel=1e-4)
    assert (t["alpha_raw"] == t["alpha"] * cfg["scale"]).all()
    curves = [d for d in res.figure.data if d.type == "scatter"]
    table = next(d for d in res.figure.data if d.type == "table")
    assert len(curves) == 2 and "SAE latent 3" in str(res)
    assert list(table.cells.values[-1]) == [t for t in res.table[res.table.prompt == PROMPTS[0]]["text"]]


def test_compare_sae_steering_default_probe_metric_comparison_latent_and_save(gpt2, tmp_path):
    from interp.comparisons import compare
    from interp.comparisons import SteeringComparison, compare_sae_steering

    store, sae, _, _ = planted_sae_store(gpt2, tmp_path / "store")
    comparison = compare(store, None, "label", sae, ks=(1, 2), progress=False)
    res = compare_sae_steering(gpt2, PROMPTS[:2], store, "label", sae, comparison=comparison, alphas=[-1, 0, 1],
                               max_new_tokens=3, progress=False)  # fmt: skip
    assert isinstance(res, SteeringComparison) and res.config["latent"] == comparison.best_latent == 3
    assert res.metrics == ["probe_score"] and res.table["probe_score"].notna().all()
    assert res.summary().shape == (6, 2)
    out = res.save(tmp_path / "steer")
    body = json.loads((out / "steering_comparison.json").read_text())
    assert body["config"]["latent"] == 3 and len(body["rows"]) == 2 * 3 * 2
    page = (out / "steering_comparison.html").read_text()
    assert 'src="plotly.min.js"' in page and (out / "plotly.min.js").stat().st_size > 1_000_000
    explicit = compare_sae_steering(gpt2, PROMPTS[:1], store, "label", sae, latent=5, alphas=[0], max_new_tokens=1,
                                    progress=False)  # fmt: skip
    assert explicit.config["latent"] == 5
    ranked = compare_sae_steering(gpt2, PROMPTS[:1], store, "label", sae, latent=comparison.ranking[1], alphas=[0],
                                  max_new_tokens=1, progress=False)  # fmt: skip
    assert ranked.config["latent"] == int(comparison.ranking[1])


def test_compare_sae_steering_bad_input(gpt2, tmp_path):
    from interp.comparisons import compare
    from interp.sae import SAE
    from interp.comparisons import compare_sae_steering
    from interp.store import ActivationStore

    store, sae, _, hook = planted_sae_store(gpt2, tmp_path / "store")
    with pytest.raises(ConfigError, match="latent must be an integer in 0..7"):
        compare_sae_steering(gpt2, PROMPTS[:1], store, "label", sae, latent=8, progress=False)
    narrow = ActivationStore.from_tensors(tmp_path / "narrow", {hook: torch.randn(40, 32)}, labels=[0, 1] * 20)
    with pytest.raises(SteeringError, match="d_model is 64 but store .* holds width 32"):
        compare_sae_steering(gpt2, PROMPTS[:1], narrow, "label", SAE(32, 8, "topk", k=2, hook_name=hook),
                             progress=False)  # fmt: skip
    other = ActivationStore.from_tensors(tmp_path / "other", {hook: torch.randn(40, 64)},
                                         labels=[0, 1] * 20, examples=None)  # fmt: skip
    comparison = compare(other, None, "label", sae, ks=(1,), progress=False)
    comparison.provenance["label"] = "sentiment"
    with pytest.raises(ConfigError, match="comparison was made on 'sentiment'"):
        compare_sae_steering(gpt2, PROMPTS[:1], store, "label", sae, comparison=comparison, progress=False)
    comparison.provenance["label"] = "label"
    with pytest.raises(ConfigError, match="pass the same test_size and seed"):
        compare_sae_steering(gpt2, PROMPTS[:1], store, "label", sae, comparison=comparison, seed=3, progress=False)
    with pytest.raises(ConfigError, match="latent must be an integer"):
        compare_sae_steering(gpt2, PROMPTS[:1], store, "label", sae, latent=2.5, progress=False)


def test_cli_sae_compare_with_steering(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from interp.cli import main

    store, sae, _, _ = planted_sae_store(gpt2, tmp_path / "store")
    sae.save(tmp_path / "sae")
    base = ["sae", "compare", str(tmp_path / "sae"), str(store.path), "--label", "label", "--ks", "1", "--quiet"]
    steer_args = ["--steer-model", str(tiny_gpt2_path), "--prompt", "The capital", "--alphas", "0,1",
                  "--max-new-tokens", "2"]  # fmt: skip
    assert main([*base, *steer_args, "--out", str(tmp_path / "out"), "--json"]) == 0
    captured = capsys.readouterr()
    body = json.loads(captured.out)  # stdout is one JSON document; status lines go to stderr
    assert body["steering"]["config"]["latent"] == 3 and len(body["steering"]["rows"]) == 2 * 2
    assert {r["method"] for r in body["comparison"]} >= {"dense probe", "best SAE latent"}
    assert (tmp_path / "out" / "steering" / "steering_comparison.json").exists() and "saved to" in captured.err
    assert main([*base, "--prompt", "The capital"]) == 2
    assert "--steer-model" in capsys.readouterr().err
    assert main([*base, *steer_args[:-4], "--alphas", "a,b"]) == 2
    assert "--alphas 'a,b'" in capsys.readouterr().err


def test_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "03_steering.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]


def test_cli_steer_bad_inputs_and_new_names(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from interp.cli import main
    from interp.directions import Direction

    Direction(vector=unit(64), hook="blocks.1.hook_out").save(tmp_path / "dir")
    common = [str(c) for c in ["--model", tiny_gpt2_path, "--direction", tmp_path / "dir", "--prompt", "The capital"]]
    common += ["--max-new-tokens", "3"]
    capsys.readouterr()
    assert main(["steer", *common, "--alpha", "4", "--top-k", "0"]) == 2
    assert main(["steer", *common, "--alpha", "4", "--positions", "500"]) == 2
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    assert main(["steer", *common, "--alpha", "4", "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "--top-k 0" in err and "position 500" in err and "existing file" in err
    assert existing.read_text() == "keep me"
    # --alphas is the sweep's name (as in `sae compare`); --sweep still works; --quiet is accepted
    assert main(["steer", *common, "--alphas", "0,2", "--json", "--quiet"]) == 0
    new = json.loads(capsys.readouterr().out)["rows"]
    assert main(["steer", *common, "--sweep", "0,2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == new
