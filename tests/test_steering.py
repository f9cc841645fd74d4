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
    assert fig.data and fig.layout.xaxis.title.text == "alpha"
    zero = table[table.alpha == 0]
    base = generate(gpt2, PROMPTS[:2], max_new_tokens=4)
    assert list(zero.text) == base.texts  # alpha 0 generates exactly what the unsteered model does


def test_cli_steer_and_sweep(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from interp.cli import main
    from interp.directions import Direction

    Direction(vector=unit(64), hook="blocks.1.hook_resid_post").save(tmp_path / "dir")
    common = ["--model", tiny_gpt2_path, "--direction", tmp_path / "dir", "--prompt", "The capital"]
    common = [str(c) for c in common] + ["--max-new-tokens", "3"]
    assert main(["steer", *common, "--alpha", "4", "--op", "add", "--positions", "generated"]) == 0
    out = capsys.readouterr().out
    assert "add 4 at blocks.1.hook_out" in out and "unsteered" in out and "steered" in out
    assert main(["steer", *common, "--sweep", "-4,-2,0,2,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["alpha"] for r in rows] == [-4, -2, 0, 2, 4]
    assert main(["steer", *common, "--alpha", "nan"]) == 2
    assert main(["steer", *common, "--alpha", "1", "--hook", "blocks.8.hook_out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "alpha is nan" in err and "no hook" in err


def test_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "03_steering.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
