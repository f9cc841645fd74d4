"""Chat rows: rendering by the model's template, the 'response' positions checked against the template's own
rendering, and one small smoke test per feature (capture, steer, detect, monitor) on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from interp.capture import capture
from interp.chat import chat_prompt, render_chat, render_dataset
from interp.datasets import load_dataset, token_mask_for_region
from interp.errors import ConfigError, DatasetError
from interp.model import load_model, tokenize

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"},
         {"role": "assistant", "content": "The capital of Japan is Tokyo."}]
CHATS = [
    JAPAN,
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "Now count to three."}, {"role": "assistant", "content": "One, two, three."}],
]
# Marks the final assistant message's content with {% generation %}, so transformers computes the mask itself.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
    "{% if m['role'] == 'assistant' and loop.last %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _template_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


# ----------------------------------------------------------------------------------------------- datasets


def test_chat_rows_parse_and_round_trip():
    ds = load_dataset([{"messages": JAPAN, "label": 1, "topic": "geo"}, {"text": "plain", "label": 0}])
    assert ds.has_messages and ds[0].messages == JAPAN and ds[0].text == "" and ds[0].meta == {"topic": "geo"}
    assert ds[1].messages is None and "messages" not in ds[1].to_record()
    assert ds[0].to_record()["messages"] == JAPAN


@pytest.mark.parametrize(
    "row, match",
    [
        ({"messages": [], "label": 1}, "non-empty list"),
        ({"messages": "hi", "label": 1}, "non-empty list"),
        ({"messages": [{"role": "user"}], "label": 1}, "string 'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}], "label": 1}, "role 'robot'"),
        ({"messages": JAPAN, "label": 1, "regions": {"response": [0, 3]}}, "chat template"),
        ({"messages": JAPAN}, "missing 'label'"),
    ],
)
def test_bad_chat_rows_are_one_line_errors(row, match):
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset([row])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- response span


@pytest.fixture(scope="module")
def templated_gpt2(tiny_gpt2_path):
    """The tiny GPT-2 with a chat template that marks the final answer with {% generation %}."""
    model = load_model(str(tiny_gpt2_path), device="cpu")
    model.tokenizer.chat_template = GENERATION_TEMPLATE
    return model


@pytest.mark.parametrize("chat", CHATS)
def test_response_tokens_equal_the_templates_generation_mask(templated_gpt2, chat):
    tok = templated_gpt2.tokenizer
    text, span = render_chat(templated_gpt2, chat)
    toks = tokenize(templated_gpt2, [text])
    ref = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert toks.input_ids[0].tolist() == list(ref["input_ids"])  # the BOS is not doubled
    assert text[span[0]:span[1]] == chat[-1]["content"]
    ours = token_mask_for_region(toks.offsets[0], span)
    assert ours == [bool(m) for m in ref["assistant_masks"]] and any(ours)


def test_response_tokens_on_smollm2_equal_the_rendered_prefix_difference(smollm2, tmp_path):
    """Capture with positions='response' stores exactly the tokens between the template's rendering of the chat
    before the answer (with its generation prompt) and the end-of-turn token."""
    tok = smollm2.tokenizer
    rows = [{"messages": c, "label": i % 2} for i, c in enumerate(CHATS)]
    store = capture(smollm2, rows, "resid_post", "response", tmp_path / "s", layers=[0, -1], progress=False)
    ex_ids, pos, tid = store.example_ids(), store.token_positions(), store.token_ids()
    for i, chat in enumerate(CHATS):
        full = _template_ids(tok, chat)
        prefix = _template_ids(tok, chat[:-1], add_generation_prompt=True)
        assert full[: len(prefix)] == prefix and [tok.decode([t]) for t in full[-2:]] == ["<|im_end|>", "\n"]
        rows_i = ex_ids == i
        assert pos[rows_i].tolist() == list(range(len(prefix), len(full) - 2))
        assert tid[rows_i].tolist() == full[len(prefix): -2]
    info = store.model_info  # the GGUF's sha256 is the weights' identity
    assert info["weights_hash"] == info["gguf_sha256"] and len(info["gguf_sha256"]) == 64
    recs = store.examples()
    assert recs[0]["messages"] == JAPAN and recs[0]["text"][slice(*recs[0]["regions"]["response"])] == JAPAN[1]["content"]
    last = capture(smollm2, rows, "resid_post", "last:response", tmp_path / "l", layers=[-1], progress=False)
    assert [tok.decode([t]) for t in last.token_ids().tolist()] == [".", "Paris", "."]
    # the stored rows are the model's activations at those tokens
    text, _ = render_chat(smollm2, CHATS[0])
    with torch.inference_mode():
        _, cache = smollm2.run_with_cache(tokenize(smollm2, [text]).input_ids, names_filter=[store.hooks[-1]])
    want = cache[store.hooks[-1]][0, pos[ex_ids == 0]]
    torch.testing.assert_close(store.activations(store.hooks[-1])[ex_ids == 0].float(), want, atol=2e-2, rtol=1e-2)


def test_chat_prompt_for_generation(smollm2):
    assert chat_prompt(smollm2, "plain text") == "plain text"
    asked = chat_prompt(smollm2, JAPAN[:1])
    assert asked.endswith("<|im_start|>assistant\n")
    assert tokenize(smollm2, [asked]).input_ids[0].tolist() == _template_ids(
        smollm2.tokenizer, JAPAN[:1], add_generation_prompt=True)
    assert chat_prompt(smollm2, JAPAN).endswith("Japan is Tokyo.")  # a final answer is continued, not closed
    text, span = render_chat(smollm2, JAPAN[:1])
    assert span is None and text == asked


def test_render_dataset_keeps_text_rows_and_needs_no_template_without_chats(minilm):
    ds = load_dataset([{"text": "hello", "label": 0}])
    assert render_dataset(minilm, ds) is ds


def test_models_that_cannot_render_chats_are_one_line_errors(minilm, gpt2, tmp_path):
    rows = [{"messages": JAPAN, "label": 1}]
    with pytest.raises(ConfigError, match="encoder") as e:
        capture(minilm, rows, "resid_post", "response", tmp_path / "m", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match="no chat template"):
        capture(gpt2, rows, "resid_post", "response", tmp_path / "g", progress=False)
    with pytest.raises(DatasetError, match="role"):
        render_chat(gpt2, [{"role": "x", "content": "y"}])


def test_chat_rows_without_an_answer_have_no_response_region(smollm2, tmp_path):
    rows = [{"messages": JAPAN[:1], "label": 0}]
    with pytest.raises(DatasetError, match="region 'response'"):
        capture(smollm2, rows, "resid_post", "response", tmp_path / "s", layers=[0], progress=False)
    store = capture(smollm2, rows, "resid_post", "last", tmp_path / "l", layers=[0], progress=False)
    assert smollm2.tokenizer.decode(store.token_ids().tolist()) == "\n"  # end of the assistant header


# ----------------------------------------------------------------------------------------------- feature smoke tests


def test_steer_smoke_smollm2(smollm2):
    from interp.steering import Intervention, generate

    prompt = chat_prompt(smollm2, JAPAN[:1])
    plain = generate(smollm2, prompt, max_new_tokens=8)
    assert "Tokyo" in plain.texts[0]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(576, generator=g)
    hook = "blocks.10.hook_resid_post"
    zero = generate(smollm2, prompt, Intervention(v, alpha=0.0, hook=hook), max_new_tokens=8)
    assert torch.equal(zero.token_ids, plain.token_ids)
    pushed = generate(smollm2, prompt, Intervention(v / v.norm(), alpha=60.0, hook=hook), max_new_tokens=8)
    assert not torch.equal(pushed.token_ids, plain.token_ids) and pushed.steered[0].any()


@pytest.fixture(scope="module")
def chat_detector():
    from interp.detectors import Detector
    from interp.directions import Direction

    g = torch.Generator().manual_seed(1)
    d = Direction(torch.randn(576, generator=g), "blocks.5.hook_out")
    return Detector.from_direction(d, {"name": "SmolLM2-135M-Instruct", "d_model": 576, "n_layers": 30},
                                   mask="response", threshold=0.0)


def test_detect_smoke_smollm2_scores_the_response(smollm2, chat_detector, tmp_path):
    rows = [{"messages": c, "label": 0} for c in CHATS]
    res = chat_detector.score(smollm2, rows)
    store = capture(smollm2, rows, ["blocks.5.hook_out"], "response", tmp_path / "s", dtype="float32",
                    progress=False)
    v = chat_detector.weight_
    for i in range(len(CHATS)):
        acts = store.activations("blocks.5.hook_out")[store.example_ids() == i]
        want = acts @ v + float(chat_detector.bias_)
        got = res.scores[i][res.masks[i]]
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
        assert float(res.aggregate[i]) == pytest.approx(float(want.mean()), abs=1e-3)


def test_monitor_smoke_smollm2_on_a_chat(smollm2, chat_detector):
    res = chat_detector.monitor(smollm2, JAPAN[:1], max_new_tokens=8)
    assert "Tokyo" in res.text and res.prompt.endswith("<|im_start|>assistant\n")
    again = chat_detector.score(smollm2, res.full_ids[None], mask="all")
    n = len(res.prompt_ids)
    torch.testing.assert_close(again.scores[0][n:n + len(res.scores)], res.scores, atol=1e-3, rtol=1e-4)
