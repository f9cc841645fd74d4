"""The one KV-cached decoding loop: interventions act and watchers observe in the same forward passes.

::

    res = generate(model, ["The capital of France is"], act=[Act("blocks.3.hook_out", fn, positions="generated")],
                   watch=[Watch("blocks.5.hook_out", score_fn, name="det", stop_above=2.0)], max_new_tokens=16)
    res.texts, res.token_ids, res.scores["det"], res.touched[0], res.stop_reasons

Prompts are left-padded into batches with an attention mask and mask-derived position ids, so a row of a
batch decodes exactly as it would alone. The prefill and every step run the wrapped HF model directly (the
TransformerBridge's hook points live inside it, so TransformerLens hooks still fire), with the KV cache passed
under whichever keyword that model's ``forward`` takes; after the prefill and after every step the cache must
hold exactly the tokens fed so far (:func:`interp.model.check_cache`), else a clear error naming the installed
versions is raised, never wrong output.

Positions
---------
A position is a token's index in its own row, padding excluded: ``0`` is the first prompt token, ``L - 1`` the
last of the row's ``L`` prompt tokens (its output is the first generated token), ``L + k`` generated token
``k``. ``"all"``: every real token; ``"prompt"``: ``0 .. L-1``; ``"generated"``: ``L-1, L, ...`` (every position
whose output is a generated token); a list of ints: those positions, negative ones counting back from the end
of the prompt (``-1`` is ``L - 1``).

Hooks that act (:class:`Act`) return a new activation; it replaces the old one at the selected positions only.
Hooks that watch (:class:`Watch`) turn the activation into one score per token (or return None: a plain
callback). On the same hook, watchers run after every intervention, so they see the steered activation; a
watcher at an earlier hook sees the unsteered one. A generated token is scored by the activation at its own
position, which exists only in the forward that consumes it: its score arrives with the next step, and the
last token costs one more forward that stops at the deepest watched hook (``score_last=False`` skips it).
Stopping on a score (``stop_above``) or on ``stop_when`` keeps the token that triggered it as the row's last.
"""

from __future__ import annotations

import inspect
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.artifacts import jsonable, load_json, load_tensors, save_tensors
from interp.capture import StopForward
from interp.fastpath import attach, attn_implementation, fast_points
from interp.errors import ConfigError, close_matches
from interp.model import check_cache, is_encoder, max_length, model_device, model_identity, tokenize
from interp.store import atomic_write_json

NAMED_POSITIONS = ("all", "prompt", "generated")
FORMAT_NAME = "interp.generation"
FORMAT_VERSION = 1

Positions = Union[str, Sequence[int]]
Prompt = Union[str, Sequence[Mapping[str, str]]]


# ----------------------------------------------------------------------------------------------- positions


def check_positions(positions: Any) -> str | tuple[int, ...]:
    """``"all"``, ``"prompt"``, ``"generated"`` or a non-empty tuple of ints (a one-line error otherwise)."""
    if isinstance(positions, str):
        if positions not in NAMED_POSITIONS:
            raise ConfigError(f"unknown positions {positions!r}; {close_matches(positions, NAMED_POSITIONS)} "
                              "(or a list of token indices)")
        return positions
    if isinstance(positions, Tensor):
        positions = positions.flatten().tolist()
    try:
        idx = tuple(positions)
    except TypeError:
        raise ConfigError(
            f"positions must be 'all', 'prompt', 'generated' or a list of ints, got {positions!r}"
        ) from None
    if not idx or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ConfigError(
            f"positions must be 'all', 'prompt', 'generated' or a non-empty list of ints, got {positions!r}"
        )
    return idx


def position_mask(
    pos: Int[Tensor, "batch T"], prompt_len: Int[Tensor, " batch"], positions: str | tuple[int, ...], padded: bool
) -> Bool[Tensor, "batch T"] | None:
    """Which of a forward's tokens (``pos``: their positions, -1 for padding) ``positions`` selects; None = all."""
    if positions == "all":
        return (pos >= 0) if padded else None
    L = prompt_len[:, None]
    if positions == "prompt":
        return (pos >= 0) & (pos < L)
    if positions == "generated":
        return (pos >= 0) & (pos >= L - 1)
    idx = torch.tensor(positions, device=pos.device)
    target = torch.where(idx < 0, L + idx, idx)  # [B, K]
    return (pos[:, :, None] == target[:, None, :]).any(-1) & (pos >= 0)


# ----------------------------------------------------------------------------------------------- hooks


@dataclass(frozen=True, eq=False)
class Act:
    """A hook that acts: ``fn(activation) -> new activation`` at ``hook``, kept at ``positions`` only."""

    hook: str
    fn: Callable[[Tensor], Tensor]
    positions: Positions = "all"
    name: str = "act"


@dataclass(frozen=True, eq=False)
class Watch:
    """A hook that watches: ``fn(activation [batch, T, d]) -> scores [batch, T]`` (or None: a callback only).

    ``stop_above``: a row stops right after the first generated token whose score is above it.
    """

    hook: str
    fn: Callable[[Tensor], Tensor | None]
    name: str = "watch"
    stop_above: float | None = None


def projection_watch(direction: Any, name: str = "projection", hook: str | None = None) -> Watch:
    """A watcher of the projection on ``direction`` (anything with ``.vector`` and ``.hook``, or a tensor with
    ``hook=``), made a unit vector."""
    vec = getattr(direction, "vector", direction)
    vec = torch.as_tensor(vec).detach().float().flatten()
    hook = hook or getattr(direction, "hook", None)
    if hook is None:
        raise ConfigError("a projection needs a hook: give a Direction or hook=")
    if vec.numel() == 0 or not bool(torch.isfinite(vec).all()) or float(vec.norm()) == 0:
        raise ConfigError("the projection direction is empty, zero or not finite")
    unit = vec / vec.norm()
    cache: dict[Any, Tensor] = {}

    def fn(act: Tensor) -> Tensor:
        u = cache.get(act.device)
        if u is None:
            u = cache[act.device] = unit.to(act.device)
        return act.float() @ u

    return Watch(str(hook), fn, name=name)


def _acts(model, act: Any) -> list[Act]:
    out: list[Act] = []
    for a in [act] if not isinstance(act, (list, tuple)) else act:
        if isinstance(a, Act):
            out.append(a)
        elif callable(getattr(a, "acts", None)):  # an interp.steering.Intervention
            out.extend(a.acts(model))
        else:
            raise ConfigError(f"act= takes Act objects or steering Interventions, got {type(a).__name__}")
    return out


def _watches(model, watch: Any) -> list[Watch]:
    out: list[Watch] = []
    for w in [watch] if not isinstance(watch, (list, tuple)) else watch:
        if isinstance(w, Watch):
            out.append(w)
        elif callable(getattr(w, "watcher", None)):  # an interp Detector
            out.append(w.watcher(model))
        elif getattr(w, "vector", None) is not None and getattr(w, "hook", None) is not None:  # a Direction
            out.append(projection_watch(w, name=f"projection:{w.hook}"))
        else:
            raise ConfigError(f"watch= takes Watch objects, Detectors or Directions, got {type(w).__name__}")
    names = [w.name for w in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"watchers need distinct names, got {names}")
    return out


# ----------------------------------------------------------------------------------------------- results


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    ``texts[i]``: the continuation of ``prompts[i]`` (without a final EOS). ``token_ids``: ``[batch, steps]``
    generated ids, padded with the pad id after each row's end; ``lengths[i]`` real generated tokens (a final
    EOS included). ``prompt_ids[i]``: the prompt's tokens as the model saw them. ``steered[j]`` (also
    ``touched``): ``[batch, position]`` bool, True where intervention ``j`` acted, over the positions whose
    output was kept (``< prompt_len + length - 1``). ``scores[name]``: ``[batch, position]`` each watcher's
    score of every prompt and generated token at its own position (NaN past a row's end). ``projections``:
    ``[batch, steps]`` (from ``steering.generate(project=...)``) the projection at the position that produced
    each generated token. ``logits``: ``[batch, steps, vocab]`` the logits each token was drawn from.
    ``stop_reasons[i]``: ``max_new_tokens``, ``eos``, ``stop_above:NAME`` or ``stop_when``.
    """

    prompts: list[str]
    texts: list[str]
    token_ids: Int[Tensor, "batch steps"]
    lengths: Int[Tensor, " batch"]
    prompt_ids: list[Int[Tensor, " pos"]]
    steered: list[Bool[Tensor, "batch position"]]
    projections: Float[Tensor, "batch steps"] | None = None
    logits: Float[Tensor, "batch steps vocab"] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Float[Tensor, "batch position"]] = field(default_factory=dict)
    stop_reasons: list[str] = field(default_factory=list)

    @property
    def touched(self) -> list[Bool[Tensor, "batch position"]]:
        return self.steered

    @property
    def prompt_lengths(self) -> Int[Tensor, " batch"]:
        return torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long)

    @property
    def full_texts(self) -> list[str]:
        return [p + t for p, t in zip(self.prompts, self.texts)]

    def generated(self, i: int) -> Int[Tensor, " n"]:
        """Row ``i``'s generated ids, real tokens only (a final EOS included)."""
        return self.token_ids[i, : int(self.lengths[i])]

    def sequences(self) -> list[Int[Tensor, " n"]]:
        """Prompt + generated ids per row, exactly what the model read."""
        return [torch.cat([p, self.generated(i)]) for i, p in enumerate(self.prompt_ids)]

    def generated_scores(self, name: str, i: int) -> Float[Tensor, " n"]:
        """Watcher ``name``'s scores of row ``i``'s generated tokens."""
        L, n = len(self.prompt_ids[i]), int(self.lengths[i])
        return self.scores[name][i, L : L + n]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"prompt": self.prompts, "text": self.texts, "n_tokens": self.lengths.tolist(),
                             "stop_reason": self.stop_reasons or [None] * len(self.prompts)})

    def save(self, path: str | os.PathLike) -> Path:
        """``generation.json`` (texts, reasons, config) + ``generation.safetensors`` (ids, masks, scores)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"token_ids": self.token_ids, "lengths": self.lengths}
        for i, p in enumerate(self.prompt_ids):
            tensors[f"prompt_ids.{i}"] = p
        for j, s in enumerate(self.steered):
            tensors[f"steered.{j}"] = s.to(torch.uint8)
        for k, name in enumerate(self.scores):
            tensors[f"scores.{k}"] = self.scores[name].float()
        if self.projections is not None:
            tensors["projections"] = self.projections.float()
        if self.logits is not None:
            tensors["logits"] = self.logits.float()
        save_tensors(path / "generation.safetensors", tensors)
        atomic_write_json(path / "generation.json", jsonable({
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "prompts": self.prompts, "texts": self.texts,
            "n_steered": len(self.steered), "watchers": list(self.scores), "stop_reasons": self.stop_reasons,
            "config": self.config,
        }))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GenerationResult:
        path = Path(path)
        meta = load_json(path / "generation.json", FORMAT_NAME, FORMAT_VERSION, "generation", ConfigError)
        t = load_tensors(path / "generation.safetensors", "generation", ConfigError)
        return cls(
            prompts=meta["prompts"], texts=meta["texts"], token_ids=t["token_ids"], lengths=t["lengths"],
            prompt_ids=[t[f"prompt_ids.{i}"] for i in range(len(meta["prompts"]))],
            steered=[t[f"steered.{j}"].bool() for j in range(meta["n_steered"])],
            projections=t.get("projections"), logits=t.get("logits"), config=meta["config"],
            scores={n: t[f"scores.{k}"] for k, n in enumerate(meta.get("watchers", []))},
            stop_reasons=list(meta.get("stop_reasons", [])),
        )


# ----------------------------------------------------------------------------------------------- prompts


def render_prompts(model, prompts: Any) -> tuple[list[str], list[Tensor], bool]:
    """Prompt texts and token ids. A prompt may be a string or a chat (a list of ``{"role", "content"}``
    messages: the tokenizer's chat template is applied with ``add_generation_prompt=True``)."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], Mapping)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("generate needs at least one prompt")
    tok = model.tokenizer
    texts: list[str] = []
    chat = [not isinstance(p, str) for p in prompts]
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise ConfigError("a prompt is an empty string; give some text to continue")
            texts.append(p)
            continue
        msgs = list(p)
        if not msgs or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in msgs):
            raise ConfigError("a chat prompt is a list of {'role': ..., 'content': ...} messages")
        if not getattr(tok, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template; give plain-text prompts")
        texts.append(tok.apply_chat_template([dict(m) for m in msgs], add_generation_prompt=True, tokenize=False))
    rows: list[Tensor | None] = [None] * len(texts)
    plain = [i for i, c in enumerate(chat) if not c]
    if plain:
        toks = tokenize(model, [texts[i] for i in plain])
        for j, i in enumerate(plain):
            rows[i] = toks.input_ids[j, : toks.lengths[j]].clone()
    for i, c in enumerate(chat):
        if c:  # the template wrote the special tokens already
            rows[i] = torch.tensor(tok(texts[i], add_special_tokens=False)["input_ids"], dtype=torch.long)
    return texts, [r for r in rows if r is not None], any(chat)


def left_pad(rows: Sequence[Tensor], pad: int) -> tuple[Int[Tensor, "batch T"], Int[Tensor, "batch T"]]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------- sampling


def pick(logits: Float[Tensor, "batch vocab"], temperature: float, top_k: int | None, top_p: float | None,
         gen: torch.Generator | None) -> Int[Tensor, " batch"]:
    """Greedy at ``temperature == 0``; else a draw from ``softmax(logits / temperature)`` truncated to the
    ``top_k`` largest and to the smallest set whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sz, si = z.sort(-1, descending=True)
        cum = sz.softmax(-1).cumsum(-1)
        drop = cum - sz.softmax(-1) >= top_p  # tokens entirely beyond the nucleus (the first is always kept)
        z = z.scatter(-1, si, sz.masked_fill(drop, float("-inf")))
    return torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(-1)


# ----------------------------------------------------------------------------------------------- the loop


_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_keywords(hf) -> tuple[str, bool, bool]:
    """The cache keyword ``hf.forward`` takes (``cache`` in transformers >= 5.24, else ``past_key_values``),
    and whether it takes ``position_ids`` and ``logits_to_keep``; inspected once per model."""
    found = _signatures.get(hf)
    if found is None:
        params = inspect.signature(hf.forward).parameters
        kw = "cache" if "cache" in params else "past_key_values"
        found = _signatures[hf] = (kw, "position_ids" in params, "logits_to_keep" in params)
    return found


class _Batch:
    """The state of one batch's decoding: what the hooks need to know about the forward running now."""

    def __init__(self, B: int, T: int, total: int, prompt_len: Tensor, device, n_acts: int, watches: list[Watch]):
        self.T, self.total = T, total
        self.prompt_len = prompt_len
        self.pos: Tensor = torch.empty(0)
        self.col = 0  # the first column (padded layout) of this forward's tokens
        self.padded = False
        self.masks: dict[Any, Tensor | None] = {}
        self.touched = [torch.zeros(B, total, dtype=torch.bool, device=device) for _ in range(n_acts)]
        self.scores = {w.name: torch.full((B, total), float("nan"), device=device) for w in watches}
        self.final = False
        self.fired = 0
        self.n_watch_hooks = len({w.hook for w in watches})
        self.seen: set[str] = set()

    def begin(self, pos: Tensor, col: int, padded: bool, final: bool = False) -> None:
        self.pos, self.col, self.padded, self.final, self.seen = pos, col, padded, final, set()
        # a decoding step feeds one generated token per row: "all" and "generated" select all of it
        self.masks = {"all": None, "generated": None} if col >= self.T else {}

    def mask(self, positions) -> Tensor | None:
        if positions not in self.masks:
            self.masks[positions] = position_mask(self.pos, self.prompt_len, positions, self.padded)
        return self.masks[positions]


def _act_hook(a: Act, j: int, st: _Batch) -> Callable:
    positions = check_positions(a.positions)

    def hook_fn(act: Tensor, hook) -> Tensor:
        if act.ndim < 3 or tuple(act.shape[:2]) != tuple(st.pos.shape):
            raise ConfigError(f"{hook.name} is not a [batch, position, ...] activation; act on the residual stream "
                              "or another per-token hook")
        m = st.mask(positions)
        new = a.fn(act)
        T = act.shape[1]
        if m is None:
            st.touched[j][:, st.col : st.col + T] = True
            return new
        st.touched[j][:, st.col : st.col + T] |= m
        mm = m.view(*m.shape, *([1] * (act.ndim - 2))).to(act.device)  # a block on another device (device_map)
        return torch.where(mm, new, act)

    return hook_fn


def _watch_hook(w: Watch, st: _Batch) -> Callable:
    def hook_fn(act: Tensor, hook) -> None:
        s = w.fn(act)
        if s is not None:
            st.scores[w.name][:, st.col : st.col + s.shape[1]] = s.float()
        if st.final:
            st.seen.add(hook.name)
            if len(st.seen) == st.n_watch_hooks:
                raise StopForward  # the last token's scores are all that is left to compute

    return hook_fn


def generate(
    model,
    prompts: Prompt | Sequence[Prompt],
    *,
    act: Any = (),
    watch: Any = (),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    stop_when: Callable[[int, Tensor, dict[str, Tensor]], Any] | None = None,
    score_last: bool = True,
    return_logits: bool = False,
    batch_size: int = 16,
    progress: bool = False,
    fast: bool = True,
) -> GenerationResult:
    """Generate continuations of ``prompts`` (strings or chats), batched, left-padded, seeded and KV-cached.

    ``act``: :class:`Act` hooks or steering Interventions; ``watch``: :class:`Watch` hooks, Detectors (their
    token scores, ``stop_above`` from ``detector.watcher(model, stop_above=...)``) or Directions (projections).
    ``temperature=0`` is greedy; otherwise sampling with ``top_k`` / ``top_p`` from a generator seeded with
    ``seed`` (the same prompts, batch size and seed give the same tokens). ``stop_when(k, tokens [batch],
    scores {name: [batch]}) -> bool [batch]`` is called once generated token ``k`` of every row is known and
    scored; rows it returns True for stop after that token. ``score_last=False`` skips the forward that scores
    the last token (watchers then miss it). ``fast``: run the HF model the bridge wraps with its fastest
    attention and plain torch hooks (:mod:`interp.fastpath`) where every hook maps onto it; ``False``: the bridge.
    """
    if is_encoder(model):
        raise ConfigError("this model is an encoder (no next-token head); generate with a decoder such as GPT-2")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer (or None for no truncation), got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    texts, rows, chat = render_prompts(model, prompts)
    acts, watches = _acts(model, act), _watches(model, watch)
    for a in acts:
        check_positions(a.positions)
    _check_reach(acts, [len(r) for r in rows], max_new_tokens)
    device = model_device(model)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    opts = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=top_p,
                stop_at_eos=stop_at_eos, stop_when=stop_when, score_last=score_last, return_logits=return_logits,
                fast=fast and fast_points(model, [h.hook for h in [*acts, *watches]]) is not None)
    parts = []
    for b0 in tqdm(range(0, len(rows), batch_size), desc="generate", disable=not progress):
        parts.append(_run_batch(model, rows[b0 : b0 + batch_size], acts, watches, gen, device, **opts))
    config = {
        "model": model_identity(model), "max_new_tokens": max_new_tokens, "temperature": float(temperature),
        "top_k": top_k, "top_p": top_p, "seed": int(seed), "attn_implementation": attn_implementation(
            model, bridge=not opts["fast"]), "batch_size": batch_size, "stop_at_eos": stop_at_eos,
        "chat": chat, "acts": [{"name": a.name, "hook": a.hook, "positions": a.positions if isinstance(
            a.positions, str) else list(a.positions)} for a in acts],
        "watchers": [{"name": w.name, "hook": w.hook, "stop_above": w.stop_above} for w in watches],
    }  # fmt: skip
    return _merge(model, texts, parts, len(acts), [w.name for w in watches], return_logits, config)


def _merge(model, texts, parts, n_acts, names, return_logits, config) -> GenerationResult:
    pad = model.tokenizer.pad_token_id or 0

    def cat(ts: list[Tensor], fill: float) -> Tensor:
        w = max(t.shape[1] for t in ts)
        return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, w - t.shape[1]), value=fill)
                          for t in ts])

    return GenerationResult(
        prompts=texts,
        texts=[t for p in parts for t in p["texts"]],
        token_ids=cat([p["token_ids"] for p in parts], pad),
        lengths=torch.cat([p["lengths"] for p in parts]),
        prompt_ids=[r for p in parts for r in p["prompt_ids"]],
        steered=[cat([p["touched"][j] for p in parts], False) for j in range(n_acts)],
        logits=cat([p["logits"] for p in parts], float("nan")) if return_logits else None,
        scores={n: cat([p["scores"][n] for p in parts], float("nan")) for n in names},
        stop_reasons=[r for p in parts for r in p["reasons"]],
        config=config,
    )


def _check_reach(acts: list[Act], lengths: list[int], max_new_tokens: int) -> None:
    """An explicit position that no row will ever feed would change nothing: an error, not a silent no-op."""
    for a in acts:
        if isinstance(a.positions, str):
            continue
        for p in a.positions:
            if not any(-L <= p < L + max_new_tokens - 1 for L in lengths):
                lo, hi = max(lengths), max(lengths) + max_new_tokens - 2
                raise ConfigError(
                    f"position {p} is past every prompt (at most {max(lengths)} tokens) and the {max_new_tokens} new"
                    f" tokens: no row reaches it (steerable: -{lo}..{hi}); pick a position inside the text"
                )


def _run_batch(model, rows, acts, watches, gen, device, *, max_new_tokens, temperature, top_k, top_p,
               stop_at_eos, stop_when, score_last, return_logits, fast) -> dict[str, Any]:
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id if stop_at_eos else None
    ids, mask = left_pad(rows, int(pad))
    B, T = ids.shape
    limit = max_length(model)
    if T + max_new_tokens - 1 > limit:
        raise ConfigError(f"the longest prompt has {T} tokens; with max_new_tokens={max_new_tokens} that passes "
                          f"the model's context of {limit}; shorten the prompt or generate fewer tokens")
    total = T + max_new_tokens
    ids, mask = ids.to(device), mask.to(device)
    full_mask = torch.ones(B, total, dtype=torch.long, device=device)
    full_mask[:, :T] = mask
    prompt_len = mask.sum(1)
    st = _Batch(B, T, total, prompt_len, device, len(acts), watches)
    fwd = [(a.hook, _act_hook(a, j, st)) for j, a in enumerate(acts)] + [(w.hook, _watch_hook(w, st)) for w in watches]
    stoppers = [(k, w) for k, w in enumerate(watches) if w.stop_above is not None]
    watching = bool(watches)
    events = bool(stoppers) or stop_when is not None
    may_finish = eos is not None or events

    # why each row stopped: 0 running, 1 max_new_tokens, 2 eos, 3 + j watcher j's stop_above, 3 + len(watches) stop_when
    reason = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n_gen = torch.zeros(B, dtype=torch.long, device=device)
    out_tokens: list[Tensor] = []
    out_logits: list[Tensor] = []
    next_pos = prompt_len[:, None]  # the position (= position id) of the next token fed

    def forward(inp: Tensor, width: int, past: Any, pos: Tensor, padded: bool, final: bool = False):
        st.begin(pos, width - inp.shape[1], padded, final)
        kw: dict[str, Any] = {"input_ids": inp, "attention_mask": full_mask[:, :width], "use_cache": True}
        if takes_pos:
            kw["position_ids"] = pos.masked_fill(pos < 0, 1) if padded else pos
        if takes_keep:
            kw["logits_to_keep"] = 1
        if past is not None:
            kw[cache_kw] = past
        out = hf(**kw)
        cache = getattr(out, "cache", None)
        return out.logits, cache if cache is not None else getattr(out, "past_key_values", None)

    def on_scored(k: int) -> None:
        """Generated token ``k`` of every row is known and scored: apply the stop criteria to it."""
        has = n_gen > k  # rows that produced a token k
        stop = torch.zeros(B, dtype=torch.bool, device=device)
        for j, w in stoppers:
            hit = has & (st.scores[w.name][:, T + k] > float(w.stop_above)) & (reason < 3)
            reason.masked_fill_(hit, 3 + j)
            stop |= hit
        if stop_when is not None:
            scores = {w.name: st.scores[w.name][:, T + k] for w in watches}
            asked = stop_when(k, out_tokens[k], scores)
            if asked is not None:
                asked = torch.as_tensor(asked, device=device).bool().expand(B) & has & (reason < 3)
                reason.masked_fill_(asked & ~stop, 3 + len(watches))
                stop |= asked
        finished.logical_or_(stop)

    with torch.inference_mode(), attach(model, fwd, fast) as fm:
        hf = model.original_model if fm is None else fm.hf  # the twin, or the HF model with the bridge inside
        cache_kw, takes_pos, takes_keep = _forward_keywords(hf)
        pos0 = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
        padded = bool((mask == 0).any())
        logits, past = forward(ids, T, None, pos0, padded)
        check_cache(past, T, "after the prefill")
        fed = 0
        for s in range(max_new_tokens):
            if events and watching and s >= 1:
                on_scored(s - 1)
                if bool(finished.all()):
                    break
            last = logits[:, -1]
            t = pick(last, temperature, top_k, top_p, gen)
            t = torch.where(finished, torch.full_like(t, pad), t)
            out_tokens.append(t)
            if return_logits:
                out_logits.append(last.float().masked_fill(finished[:, None], float("nan")))
            alive = ~finished
            n_gen += alive.long()
            if eos is not None:
                ended = alive & (t == eos)
                reason.masked_fill_(ended, 2)
                finished.logical_or_(ended)
            if events and not watching:
                on_scored(s)
            if s == max_new_tokens - 1 or (may_finish and bool(finished.all())):
                break
            logits, past = forward(t[:, None], T + s + 1, past, next_pos, False)
            next_pos = next_pos + 1
            fed = s + 1
            check_cache(past, T + s + 1, f"after decoding step {s + 1}")
        if watching and score_last and fed < len(out_tokens):
            k = len(out_tokens) - 1
            try:
                forward(out_tokens[k][:, None], T + k + 1, past, next_pos, False, final=True)
            except StopForward:
                pass
            if events:
                on_scored(k)
    return _finish(tok, rows, st, out_tokens, out_logits, n_gen, reason, stop_at_eos, eos, watches, return_logits)


def _finish(tok, rows, st, out_tokens, out_logits, n_gen, reason, stop_at_eos, eos, watches, return_logits):
    T = st.T
    token_ids = torch.stack(out_tokens, 1).cpu()
    lengths = n_gen.cpu()
    B = token_ids.shape[0]
    steps = token_ids.shape[1]
    # padded columns -> each row's own positions; keep what produced or was a kept token
    width = max(len(r) for r in rows) + steps
    touched = [torch.zeros(B, width, dtype=torch.bool) for _ in st.touched]
    scores = {n: torch.full((B, width), float("nan")) for n in st.scores}
    tt = [t.cpu() for t in st.touched]
    ss = {n: s.cpu() for n, s in st.scores.items()}
    for i, r in enumerate(rows):
        L, n, off = len(r), int(lengths[i]), T - len(r)
        for j, t in enumerate(tt):
            touched[j][i, : L + n - 1] = t[i, off : off + L + n - 1]
        for name, s in ss.items():
            scores[name][i, : L + n] = s[i, off : off + L + n]
    names = {0: "max_new_tokens", 1: "max_new_tokens", 2: "eos", 3 + len(watches): "stop_when"}
    names.update({3 + j: f"stop_above:{w.name}" for j, w in enumerate(watches)})
    reasons = [names[int(c)] for c in reason.cpu()]
    texts = []
    for i in range(B):
        g = token_ids[i, : int(lengths[i])].tolist()
        if stop_at_eos and g and eos is not None and g[-1] == eos:
            g = g[:-1]
        texts.append(tok.decode(g))
    return {
        "texts": texts, "token_ids": token_ids, "lengths": lengths, "prompt_ids": list(rows), "touched": touched,
        "scores": scores, "reasons": reasons,
        "logits": torch.stack(out_logits, 1).cpu() if return_logits else None,
    }


__all__ = ["Act", "GenerationResult", "Watch", "check_positions", "generate", "pick", "position_mask",
           "projection_watch", "render_prompts"]
