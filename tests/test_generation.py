"""The one decoding loop (interp.generation): equal to HF's own generate, batch-invariant, streaming scores equal
to one-pass scores with steering on and off, steered positions exactly as asked, watchers upstream/downstream of
an intervention, stop criteria, chat prompts, the cache check, save/load; on tiny GPT-2 / Llama / GPT-NeoX and
SmolLM2."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from interp.errors import ConfigError, InterpError, ModelLoadError
from interp.generation import Act, GenerationResult, Watch, generate, pick, projection_watch
from interp.steering import Intervention, steer

PROMPTS = ["The cat sat on the", "Hello", "One two three four five six seven", "A"]


@pytest.fixture(scope="module", params=["gpt2", "llama", "neox"])
def tiny(request, tmp_path_factory):
    from interp.model import load_model
    from interp.testing import tiny_decoder

    path = tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    return load_model(str(path), device="cpu")


def _unit(d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _hf_greedy(model, rows: list[torch.Tensor], n: int) -> list[list[int]]:
    """HF's own KV-cached greedy generate, one prompt at a time, EOS never stops it."""
    hf = model.original_model
    out = []
    with torch.inference_mode():
        for r in rows:
            ids = r[None]
            g = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n, pad_token_id=model.tokenizer.pad_token_id or 0, eos_token_id=None)
            out.append(g[0, ids.shape[1] :].tolist())
    return out


def _one_pass(model, seq: torch.Tensor, hooks: list[str], steering=None) -> dict[str, torch.Tensor]:
    """Activations at ``hooks`` of one forward of the finished sequence (optionally steered)."""
    got: dict[str, torch.Tensor] = {}

    def save(a, hook):
        got[hook.name] = a[0].detach().float().clone()

    with ExitStack() as stack, torch.inference_mode():
        if steering is not None:  # entered first: on a shared hook the steering runs before the reading
            stack.enter_context(steer(model, steering))
        stack.enter_context(model.hooks(fwd_hooks=[(h, save) for h in hooks]))
        model(seq[None], return_type=None)
    return got


def test_greedy_equals_hf_generate_and_batching_changes_nothing(tiny):
    res = generate(tiny, PROMPTS, max_new_tokens=6, stop_at_eos=False, batch_size=4)
    ref = _hf_greedy(tiny, res.prompt_ids, 6)
    assert [res.generated(i).tolist() for i in range(len(PROMPTS))] == ref
    one = [generate(tiny, [p], max_new_tokens=6, stop_at_eos=False, watch=[projection_watch(_unit(64), "p",
                                                                                           "blocks.1.hook_out")])
           for p in PROMPTS]
    both = generate(tiny, PROMPTS, max_new_tokens=6, stop_at_eos=False, batch_size=3,
                    watch=[projection_watch(_unit(64), "p", "blocks.1.hook_out")])
    for i, r in enumerate(one):
        assert r.generated(0).tolist() == both.generated(i).tolist()
        n = len(r.prompt_ids[0]) + 6
        torch.testing.assert_close(both.scores["p"][i, :n], r.scores["p"][0, :n], atol=1e-4, rtol=0)
        assert not torch.isnan(both.scores["p"][i, :n]).any()


@pytest.mark.parametrize("steered", [False, True])
def test_streaming_scores_equal_a_one_pass_forward(tiny, steered):
    u = _unit(64, 1)
    iv = Intervention(u, op="add", alpha=3.0, positions="generated", hook="blocks.0.hook_out") if steered else None
    hooks = ["blocks.0.hook_out", "blocks.1.hook_out"]
    watches = [projection_watch(u, f"w{j}", h) for j, h in enumerate(hooks)]
    res = generate(tiny, PROMPTS[:3], act=[iv] if iv else [], watch=watches, max_new_tokens=5, stop_at_eos=False)
    for i, seq in enumerate(res.sequences()):
        L = len(res.prompt_ids[i])
        # a plain forward starts a sequence: name the generated positions explicitly for the reference
        ref_iv = Intervention(u, op="add", alpha=3.0, positions=list(range(L - 1, len(seq))),
                              hook="blocks.0.hook_out") if steered else None
        ref = _one_pass(tiny, seq, hooks, ref_iv)
        for j, h in enumerate(hooks):
            torch.testing.assert_close(res.scores[f"w{j}"][i, : len(seq)], ref[h] @ u, atol=1e-4, rtol=0)


def test_steered_positions_are_exactly_those_asked(tiny):
    u, alpha = _unit(64, 2), 2.5
    for positions in ([1, -1], "generated", "prompt", [0, 7]):
        iv = Intervention(u, op="add", alpha=alpha, positions=positions, hook="blocks.0.hook_out")
        res = generate(tiny, PROMPTS[:3], act=[iv], watch=[projection_watch(u, "same", "blocks.0.hook_out")],
                       max_new_tokens=4, stop_at_eos=False)
        for i, seq in enumerate(res.sequences()):
            L, n = len(res.prompt_ids[i]), len(seq)
            want = torch.zeros(n, dtype=torch.bool)
            if positions == "generated":
                want[L - 1 :] = True
            elif positions == "prompt":
                want[:L] = True
            else:
                for p in positions:
                    q = L + p if p < 0 else p
                    if 0 <= q < n:
                        want[q] = True
            plain = _one_pass(tiny, seq, ["blocks.0.hook_out"])["blocks.0.hook_out"] @ u
            moved = res.scores["same"][i, :n] - plain  # the watcher sits after the intervention on the same hook
            torch.testing.assert_close(moved, want.float() * alpha, atol=1e-4, rtol=0)
            kept = want.clone()
            kept[n - 1] = False  # the last token's position produced nothing that was kept
            assert torch.equal(res.steered[0][i, : n - 1], kept[: n - 1])


def test_watchers_upstream_see_unsteered_and_downstream_steered(tiny):
    u = _unit(64, 3)
    iv = Intervention(u, op="add", alpha=4.0, positions="all", hook="blocks.0.hook_out")
    hooks = {"up": "blocks.0.hook_in", "same": "blocks.0.hook_out", "down": "blocks.1.hook_out"}
    # watchers listed before the intervention: the engine still runs interventions first on a shared hook
    watches = [projection_watch(u, k, h) for k, h in hooks.items()]
    res = generate(tiny, PROMPTS[:2], act=[iv], watch=watches, max_new_tokens=4, stop_at_eos=False)
    for i, seq in enumerate(res.sequences()):
        n = len(seq)
        plain = _one_pass(tiny, seq, list(hooks.values()))
        steered = _one_pass(tiny, seq, list(hooks.values()), iv)
        torch.testing.assert_close(res.scores["up"][i, :n], plain[hooks["up"]] @ u, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.scores["same"][i, :n], steered[hooks["same"]] @ u, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.scores["same"][i, :n] - plain[hooks["same"]] @ u, torch.full((n,), 4.0),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(res.scores["down"][i, :n], steered[hooks["down"]] @ u, atol=1e-4, rtol=0)


def test_steer_and_monitor_in_one_generation(gpt2, tmp_path):
    from interp.detectors import Detector

    u = _unit(64, 4)
    det = Detector.from_direction(u, {"name": "synthetic", "d_model": 64}, hook="blocks.1.hook_out", threshold=0.0)
    iv = Intervention(u, op="add", alpha=5.0, positions="generated", hook="blocks.0.hook_out")
    plain = det.monitor(gpt2, "The cat sat", max_new_tokens=5, stop_at_eos=False)
    pushed = det.monitor(gpt2, "The cat sat", max_new_tokens=5, stop_at_eos=False, steering=[iv])
    L = len(pushed.prompt_ids)
    ref_iv = Intervention(u, op="add", alpha=5.0, positions=list(range(L - 1, len(pushed.full_ids))),
                          hook="blocks.0.hook_out")
    ref = _one_pass(gpt2, pushed.full_ids, ["blocks.1.hook_out"], ref_iv)["blocks.1.hook_out"]
    torch.testing.assert_close(pushed.scores, det.token_scores(ref)[L:], atol=1e-4, rtol=0)
    torch.testing.assert_close(pushed.prompt_scores[:-1], plain.prompt_scores[:-1], atol=1e-5, rtol=0)
    assert float((pushed.scores - plain.scores).abs().max()) > 0.1  # the steering reached the monitor


def test_stop_criteria_per_row(tiny):
    u = _unit(64, 5)
    free = generate(tiny, PROMPTS[:3], watch=[projection_watch(u, "p", "blocks.1.hook_out")], max_new_tokens=6,
                    stop_at_eos=False)
    gen_scores = torch.stack([free.generated_scores("p", i) for i in range(3)])
    thr = float(gen_scores[0, 2]) - 1e-3  # row 0 crosses it at token 2 at the latest
    first = [int(torch.nonzero(gen_scores[i] > thr)[0]) if (gen_scores[i] > thr).any() else None for i in range(3)]
    w = Watch("blocks.1.hook_out", projection_watch(u, "p", "blocks.1.hook_out").fn, name="p", stop_above=thr)
    res = generate(tiny, PROMPTS[:3], watch=[w], max_new_tokens=6, stop_at_eos=False)
    for i in range(3):
        k = first[i]
        assert res.stop_reasons[i] == ("max_new_tokens" if k is None else "stop_above:p")
        assert int(res.lengths[i]) == (6 if k is None else k + 1)
        assert res.generated(i).tolist() == free.generated(i)[: int(res.lengths[i])].tolist()
    # a user predicate: stop row 1 after its second token
    res = generate(tiny, PROMPTS[:3], max_new_tokens=6, stop_at_eos=False,
                   stop_when=lambda k, toks, scores: torch.tensor([False, k == 1, False]))
    assert res.lengths.tolist() == [6, 2, 6] and res.stop_reasons[1] == "stop_when"
    # EOS per row: make the EOS id the token row 0 produces first
    eos_free = free.generated(0)[0].item()
    tok = tiny.tokenizer
    old = tok.eos_token_id
    try:
        tok.eos_token_id = eos_free
        res = generate(tiny, PROMPTS[:3], max_new_tokens=6)
    finally:
        tok.eos_token_id = old
    assert res.lengths[0] == 1 and res.stop_reasons[0] == "eos" and res.texts[0] == ""


def test_sampling_is_seeded_and_top_p_truncates():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    a = pick(logits, 1.0, None, None, torch.Generator().manual_seed(7))
    b = pick(logits, 1.0, None, None, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(pick(logits, 1.0, None, 1e-6, torch.Generator().manual_seed(1)), logits.argmax(-1))
    assert torch.equal(pick(logits, 1.0, 1, None, torch.Generator().manual_seed(1)), logits.argmax(-1))
    # top_p keeps the smallest set of most likely tokens whose mass reaches p
    probs = logits.softmax(-1)
    p = 0.3
    draws = torch.stack([pick(logits, 1.0, None, p, torch.Generator().manual_seed(s)) for s in range(40)], 1)
    for r in range(3):
        order = probs[r].argsort(descending=True).tolist()
        allowed, mass = set(), 0.0
        for t in order:
            allowed.add(t)
            mass += float(probs[r, t])
            if mass >= p:
                break
        assert set(draws[r].tolist()) <= allowed and len(allowed) < 50


@pytest.mark.parametrize("fast", [False, True])
def test_cache_that_drops_tokens_is_a_clear_error(gpt2, monkeypatch, fast):
    from interp.fastpath import fast_model

    hf = fast_model(gpt2).hf if fast else gpt2.original_model  # the twin the fast path runs, or the bridge's
    orig = hf.forward

    def forgetful(**kw):
        kw.pop("cache", None)
        kw.pop("past_key_values", None)
        return orig(**kw)

    monkeypatch.setattr(hf, "forward", forgetful)
    with pytest.raises(ModelLoadError, match="transformers .*transformer-lens"):
        generate(gpt2, ["Hello there"], max_new_tokens=3, fast=fast)


def test_bad_inputs_are_one_line_errors(gpt2):
    with pytest.raises(ConfigError, match="top_k"):
        generate(gpt2, ["Hi"], top_k=0)
    with pytest.raises(ConfigError, match="position 500"):
        generate(gpt2, ["Hi"], act=[Act("blocks.0.hook_out", lambda a: a, positions=[500])], max_new_tokens=2)
    with pytest.raises(ConfigError, match="chat template"):
        generate(gpt2, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ConfigError):
        generate(gpt2, [""])
    with pytest.raises(InterpError):
        generate(gpt2, ["Hi"], max_new_tokens=0)


def test_result_round_trips(gpt2, tmp_path):
    u = _unit(64, 6)
    iv = Intervention(u, op="add", alpha=1.0, positions=[0], hook="blocks.0.hook_out")
    res = generate(gpt2, PROMPTS[:2], act=[iv], watch=[projection_watch(u, "p", "blocks.1.hook_out")],
                   max_new_tokens=3, return_logits=True)
    back = GenerationResult.load(res.save(tmp_path / "g"))
    assert back.texts == res.texts and back.stop_reasons == res.stop_reasons
    assert torch.equal(back.token_ids, res.token_ids) and torch.equal(back.steered[0], res.steered[0])
    torch.testing.assert_close(back.scores["p"], res.scores["p"], equal_nan=True)
    assert (tmp_path / "g" / "generation.json").is_file()


# ------------------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_greedy_batch_chat_and_steered_streaming(smollm2):
    model = smollm2
    prompts = ["The capital of France is", "Water boils at"]
    res = generate(model, prompts, max_new_tokens=6, stop_at_eos=False)
    assert [res.generated(i).tolist() for i in range(2)] == _hf_greedy(model, res.prompt_ids, 6)
    u = _unit(576, 7)
    iv = Intervention(u, op="add", alpha=8.0, positions="generated", hook="blocks.10.hook_out")
    watch = [projection_watch(u, "down", "blocks.20.hook_out"), projection_watch(u, "up", "blocks.5.hook_out")]
    both = generate(model, prompts, act=[iv], watch=watch, max_new_tokens=5, stop_at_eos=False)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], act=[iv], watch=watch, max_new_tokens=5, stop_at_eos=False)
        assert alone.generated(0).tolist() == both.generated(i).tolist()
        seq = both.sequences()[i]
        ref_iv = Intervention(u, op="add", alpha=8.0, positions=list(range(len(both.prompt_ids[i]) - 1, len(seq))),
                              hook="blocks.10.hook_out")
        steered = _one_pass(model, seq, ["blocks.20.hook_out"], ref_iv)["blocks.20.hook_out"] @ u
        plain = _one_pass(model, seq, ["blocks.5.hook_out"])["blocks.5.hook_out"] @ u
        torch.testing.assert_close(both.scores["down"][i, : len(seq)], steered, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(both.scores["up"][i, : len(seq)], plain, atol=1e-3, rtol=1e-4)
    chat = [{"role": "user", "content": "Name a colour."}]
    res = generate(model, [chat], max_new_tokens=4, stop_at_eos=False)
    text = model.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert res.prompts[0] == text
    assert res.prompt_ids[0].tolist() == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    # the detector's monitor takes the same chat, and a plain callback watcher sees every forward
    from interp.detectors import Detector
    from interp.model import model_identity

    det = Detector.from_direction(u, model_identity(model), hook="blocks.20.hook_out", threshold=1e9)
    mon = det.monitor(model, chat, max_new_tokens=4, stop_at_eos=False)
    assert mon.prompt == text and mon.token_ids.tolist() == res.generated(0).tolist()
    seen: list[int] = []
    generate(model, [chat], watch=[Watch("blocks.3.hook_out", lambda a: seen.append(a.shape[1]))], max_new_tokens=4,
             stop_at_eos=False)
    assert seen == [len(res.prompt_ids[0]), 1, 1, 1, 1]  # prefill, 3 steps, and the last token's scoring forward
