"""Chats as text: the model's chat template applied to ``messages``, and where the assistant's answer lies in it.

One place renders chats for every feature: ``capture`` (through :func:`render_dataset`), scoring, steering,
monitoring and generation (through :func:`chat_prompt`). A chat is a list of ``{"role", "content"}`` messages.

``render_chat(model, messages)`` returns ``(text, response)``: the rendered text, and when the chat ends with an
assistant message, the character span ``(start, end)`` of that message's content as the template wrote it. The
``response`` position policy selects the tokens overlapping that span: the answer's own tokens. The role header
before it (``<|im_start|>assistant\\n``) and the end-of-turn token after it (``<|im_end|>``) are not part of it: they
are the same in every chat, so they would only dilute a pooled response; ``positions="last:response"`` is the
answer's last token.

Rendered texts are tokenised like any text (``interp.model.tokenize``) and give exactly the token ids of
``tokenizer.apply_chat_template(messages, tokenize=True)``: when the tokenizer adds its BOS token by itself, the
template's leading BOS string is dropped from the text so that it is not doubled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from interp.datasets import Dataset, Example, check_messages
from interp.errors import ConfigError
from interp.model import is_encoder


def chat_tokenizer(model) -> Any:
    """The tokenizer of ``model`` (a ``TransformerBridge`` or a tokenizer) when it can render chats; else a one-line
    error naming why not."""
    tok = getattr(model, "tokenizer", model)
    if hasattr(model, "cfg") and is_encoder(model):
        raise ConfigError("chat messages need a decoder with a chat template, and this model is an encoder; give "
                          "'text' rows, or load a chat model such as load_model('smollm2')")
    if tok is None or not getattr(tok, "chat_template", None):
        raise ConfigError("this model's tokenizer has no chat template, so 'messages' cannot be rendered; give 'text'"
                          " rows, or a chat model such as load_model('smollm2')")
    return tok


def _drop_bos(tok, text: str) -> tuple[str, int]:
    """``(text, characters cut)``: the template's leading BOS string removed when the tokenizer adds BOS itself."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None or not tok.bos_token or not text.startswith(tok.bos_token):
        return text, 0
    if tok("a")["input_ids"][:1] != [bos]:
        return text, 0
    return text[len(tok.bos_token):], len(tok.bos_token)


def _template(tok, messages: list[dict[str, str]], **kwargs: Any) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja raises its own errors (a template that refuses a role order, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"the model's chat template refused these messages: {first[:200]}") from None


def render_chat(
    model, messages: Sequence[Mapping[str, str]], generation_prompt: bool | None = None
) -> tuple[str, tuple[int, int] | None]:
    """``(text, response span)``: ``messages`` rendered by the chat template of ``model`` (a model or a tokenizer).

    ``response`` is the character span ``(start, end)`` of the final assistant message's content in ``text`` (end
    exclusive; the end-of-turn token after it is not included), or ``None`` when the chat does not end with an
    assistant message. ``generation_prompt`` (default: when the chat does not end with the assistant) appends the
    header that asks the model to answer next, as for generation.
    """
    msgs = check_messages(list(messages) if not isinstance(messages, list) else messages, "chat")
    tok = chat_tokenizer(model)
    answered = msgs[-1]["role"] == "assistant"
    if generation_prompt is None:
        generation_prompt = not answered
    text = _template(tok, msgs, add_generation_prompt=generation_prompt)
    span = None
    if answered and not generation_prompt:
        span = _content_span(tok, msgs, text)
    text, cut = _drop_bos(tok, text)
    return text, None if span is None else (span[0] - cut, span[1] - cut)


def _content_span(tok, msgs: list[dict[str, str]], text: str) -> tuple[int, int]:
    """Where the final assistant message's content was written in ``text``: after the rendering of the chat before
    it (with its generation prompt) when that is a prefix of ``text``, else at its last occurrence."""
    content = msgs[-1]["content"]
    prefix = _template(tok, msgs[:-1], add_generation_prompt=True) if len(msgs) > 1 else ""
    start = len(prefix) if text.startswith(prefix) else 0
    for needle in (content, content.strip()):  # some templates trim the content
        at = text.find(needle, start) if start else text.rfind(needle)
        if needle and at >= 0:
            return at, at + len(needle)
    if not content.strip():
        end = len(prefix) if start else len(text)
        return end, end
    raise ConfigError("the model's chat template rewrites the assistant's message, so its tokens cannot be located; "
                      "give the chat as rendered 'text' with a 'regions' response span instead")


def chat_prompt(model, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """The text generation starts from: a string as it is; a chat rendered with the model's template, ending with
    the assistant's header (or, when the chat ends with an assistant message, continuing that message)."""
    if isinstance(prompt, str):
        return prompt
    msgs = check_messages(list(prompt), "chat")
    tok = chat_tokenizer(model)
    if msgs[-1]["role"] == "assistant":
        text = _template(tok, msgs, continue_final_message=True)
    else:
        text = _template(tok, msgs, add_generation_prompt=True)
    return _drop_bos(tok, text)[0]


def render_dataset(model, data: Dataset) -> Dataset:
    """``data`` with every chat example's text made by the model's chat template and its ``response`` region set (the
    final assistant message's content; a chat ending with a user message gets the assistant's header appended, as
    before generation, and no region); text examples are kept as they are. A dataset without chats is returned
    unchanged, and needs no chat template."""
    if not data.has_messages:
        return data
    chat_tokenizer(model)  # one error for the whole dataset, before any rendering
    out = []
    for ex in data:
        if ex.messages is None:
            out.append(ex)
            continue
        text, span = render_chat(model, ex.messages)
        regions = {"response": [span[0], span[1]]} if span and span[1] > span[0] else {}
        out.append(Example(text, ex.label, ex.split, ex.id, [], regions, dict(ex.meta), ex.messages))
    return Dataset(out, name=data.name, source=data.source)
