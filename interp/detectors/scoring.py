"""Scoring texts through a model with a detector: one forward per batch stopped after its hook, token masks,
and monitoring a generation token by token (through :mod:`interp.generation`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import StopForward, forward_to_stop
from interp.chat import render_dataset
from interp.datasets import Dataset, Example, load_dataset, token_mask_for_region
from interp.detectors.calibration import aggregate_scores
from interp.detectors.results import DetectorScores, MonitorResult, _token_strings
from interp.errors import ConfigError, DetectorError, HookError, InterpError
from interp.fastpath import attach
from interp.fastpath import forward_to_stop as fast_forward_to_stop
from interp.generation import Watch
from interp.model import model_device


def _run_to_hook(model, fm, input_ids: Tensor, out: dict[str, Tensor], attention_mask: Tensor) -> None:
    """One forward that ends at the detector's hook (which stores its scores in ``out`` and raises
    :class:`~interp.capture.StopForward`: ``stop_at_layer`` does not stop every architecture): the bridge's
    twin ``fm`` (:mod:`interp.fastpath`), or the bridge when ``fm`` is None."""
    if fm is None:
        forward_to_stop(model, input_ids, attention_mask=attention_mask)
    else:
        fast_forward_to_stop(fm, input_ids, attention_mask)
    if "scores" not in out:
        raise DetectorError("the detector's hook did not fire during the forward pass; the model does not run it")


_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(model) -> dict[str, Any]:
    """``model_identity`` cached per model object (it hashes the weight files' ends, which costs milliseconds)."""
    ident = _identities.get(model)
    if ident is None:
        from interp.model import model_identity

        ident = _identities[model] = model_identity(model)
    return ident


_encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_encoder(model) -> bool:
    """``interp.model.is_encoder``, cached per model object."""
    if model not in _encoders:
        from interp.model import is_encoder

        _encoders[model] = is_encoder(model)
    return _encoders[model]


class _Scoring:
    """Detector methods that read a live model: model checks, scoring texts, monitoring generation."""

    # ------------------------------------------------------------------------------------------- model checks

    def check_model(self, model) -> str:
        """Refuse a model this detector was not made for (other width, other weights, missing hook).

        Returns the canonical name of the detector's hook in ``model``.
        """
        self._check_fitted()
        from interp.model import canonical_hook

        ident = _identity(model)
        if int(ident["d_model"]) != self.d_model:
            raise DetectorError(
                f"model {ident.get('name')!r} has d_model={ident['d_model']} but this detector reads width "
                f"{self.d_model} (made for {self.model_.get('name')!r}); use a detector made for this model"
            )
        mine_hash, their_hash = self.model_.get("weights_hash"), ident.get("weights_hash")
        mine_name = str(self.model_.get("name") or "")
        if mine_hash and their_hash and mine_hash != their_hash:
            raise DetectorError(
                f"this detector was made for model {mine_name!r} (weights {mine_hash}) but the model given is "
                f"{ident.get('name')!r} (weights {their_hash}); load the model it was made for"
            )
        if not (mine_hash and their_hash) and mine_name not in ("", "synthetic", "unknown"):
            if Path(mine_name).name != Path(str(ident.get("name"))).name:
                raise DetectorError(
                    f"this detector was made for model {mine_name!r} but the model given is {ident.get('name')!r};"
                    " load the model it was made for"
                )
        try:
            return canonical_hook(model, self.hook_)
        except HookError:
            raise HookError(
                f"model {ident.get('name')!r} has no hook {self.hook_!r} (it has {ident['n_layers']} layers); "
                "use a detector made for this model"
            ) from None

    # ------------------------------------------------------------------------------------------- scoring text

    def score(
        self,
        model,
        texts: str | Sequence[str] | Dataset | Sequence[Mapping[str, Any]] | Tensor | Sequence[Sequence[int]],
        *,
        mask: str | Sequence[Any] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = False,
    ) -> DetectorScores:
        """Score every token of ``texts`` with one forward per batch (stopped after the hook's layer) and
        aggregate the tokens ``mask`` selects.

        ``texts``: a string, a list of strings, a Dataset or list of row dicts (their ``regions`` and
        ``spans`` serve region and span masks), or token ids (a ``[batch, pos]`` tensor or lists of ids,
        e.g. ``monitor(...).full_ids``). ``mask``: the detector's default, ``"all"``, ``"text"``, ``"spans"``, a
        region name, or one character range ``[start, end]`` (or a list of them) per text.
        """
        hook = self.check_model(model)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        from interp.model import tokenize

        examples, id_rows = _as_inputs(texts)
        if examples is not None:  # chat rows: the model's template, with their 'response' region
            examples = list(render_dataset(model, Dataset(examples)))
        n = len(examples) if examples is not None else len(id_rows)  # type: ignore[arg-type]
        mask = self.mask_ if mask is None else mask
        if not isinstance(mask, str) and (isinstance(mask, (list, tuple)) and len(mask) != n):
            raise DetectorError(f"mask has {len(mask)} entries for {n} texts; give one character range per text")
        device = model_device(model)
        w = self.weight_.to(device)
        b = float(self.bias_)
        if examples is not None:
            lengths_guess = [len(e.text) for e in examples]
        else:
            lengths_guess = [len(r) for r in id_rows]  # type: ignore[union-attr]
        order = sorted(range(n), key=lambda i: lengths_guess[i])  # similar lengths share a batch: less padding
        per_scores: list[Tensor | None] = [None] * n
        per_ids: list[Tensor | None] = [None] * n
        per_offsets: list[list[tuple[int, int]] | None] = [None] * n
        out: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> None:
            out["scores"] = act.float() @ w + b
            raise StopForward  # nothing after the hook is needed

        tok = model.tokenizer
        with torch.inference_mode(), attach(model, [(hook, grab)]) as fm:
            for b0 in tqdm(range(0, n, batch_size), desc="detector score", disable=not progress):
                idx = order[b0 : b0 + batch_size]
                if examples is not None:
                    toks = tokenize(model, [examples[i].text for i in idx], max_length)
                else:
                    toks = _pad_ids([id_rows[i] for i in idx], tok)  # type: ignore[index]
                toks = toks.to(device)
                _run_to_hook(model, fm, toks.input_ids, out, toks.attention_mask)
                s = out.pop("scores").cpu()
                ids = toks.input_ids.cpu()
                for j, i in enumerate(idx):
                    L = toks.lengths[j]
                    per_scores[i] = s[j, :L].clone()
                    per_ids[i] = ids[j, :L].clone()
                    per_offsets[i] = toks.offsets[j] if toks.offsets is not None else None
        scores = [t for t in per_scores if t is not None]
        token_ids = [t for t in per_ids if t is not None]
        special = set(getattr(tok, "all_special_ids", []) or [])
        masks = []
        for i in range(n):
            masks.append(self._mask_for(i, mask, examples, token_ids[i], per_offsets[i], special))
        agg = torch.tensor(
            [aggregate_scores(scores[i][masks[i]], self.aggregation_, self.k) for i in range(n)], dtype=torch.float64
        )
        return DetectorScores(
            token_ids=token_ids,
            scores=scores,
            masks=masks,
            aggregate=agg,
            threshold=self.threshold_,
            aggregation=self.aggregation_,
            texts=None if examples is None else [e.text for e in examples],
            offsets=None if examples is None else per_offsets,  # type: ignore[arg-type]
            tokenizer=tok,
        )

    def _mask_for(
        self,
        i: int,
        mask: Any,
        examples: list[Example] | None,
        ids: Tensor,
        offsets: list[tuple[int, int]] | None,
        special: set[int],
    ) -> Tensor:
        n_tok = int(ids.numel())
        if isinstance(mask, str) and mask == "all":
            return torch.ones(n_tok, dtype=torch.bool)
        if isinstance(mask, str) and mask == "text":
            if offsets is not None:
                return torch.tensor([b > a for a, b in offsets], dtype=torch.bool)
            return torch.tensor([int(t) not in special for t in ids.tolist()], dtype=torch.bool)
        if examples is None or offsets is None:
            raise DetectorError(
                f"mask {mask!r} needs character offsets; score texts (not token ids) or use mask='all' or 'text'"
            )
        ex = examples[i]
        if isinstance(mask, str) and mask == "spans":
            if not ex.spans:
                raise DetectorError(f"text {i} has no spans for mask='spans'; give rows with 'spans' or another mask")
            ranges = [(s["start"], s["end"]) for s in ex.spans]
        elif isinstance(mask, str):
            if mask not in ex.regions:
                raise DetectorError(
                    f"text {i} has no region {mask!r} for the detector's mask; give rows with "
                    f"'regions': {{\"{mask}\": [start, end]}}, a character range per text, or mask='text'"
                )
            ranges = [tuple(ex.regions[mask])]
        else:
            ranges = _ranges_of(mask[i])
        keep = torch.zeros(n_tok, dtype=torch.bool)
        for start, end in ranges:
            if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= len(ex.text):
                raise DetectorError(
                    f"span [{start}, {end}) lies outside text {i} (length {len(ex.text)}); character offsets "
                    "must satisfy 0 <= start < end <= len(text)"
                )
            keep |= torch.tensor(token_mask_for_region(offsets, [start, end]), dtype=torch.bool)
        return keep
    # ------------------------------------------------------------------------------------------- streaming

    def watcher(self, model, stop_above: float | bool | None = None, name: str = "detector") -> Watch:
        """This detector as a hook that watches in :func:`interp.generation.generate`: per-token scores at its
        hook (``stop_above``: a score, or True for the calibrated threshold, to stop a row after the first
        token above it)."""
        hook = self.check_model(model)
        stop = self._stop_value(stop_above)
        w = self.weight_.to(model_device(model))
        b = float(self.bias_)

        def fn(act: Tensor) -> Tensor:
            return act.float() @ w + b

        return Watch(hook, fn, name=name, stop_above=stop)

    def _stop_value(self, stop_above: float | bool | None) -> float | None:
        if stop_above is True:
            if self.threshold_ is None:
                raise DetectorError(
                    "stop_above=True needs a calibrated threshold; calibrate the detector or give a number"
                )
            return float(self.threshold_)
        if stop_above is False or stop_above is None:
            return None
        return float(stop_above)

    def monitor(
        self,
        model,
        prompt: str | Sequence[Mapping[str, str]],
        max_new_tokens: int = 64,
        *,
        on_token: Callable[[int, int, str, float], Any] | None = None,
        stop_above: float | bool | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_at_eos: bool = True,
        steering: Any = (),
    ) -> MonitorResult:
        """Generate from ``prompt`` and score each generated token as it is produced, in the same forward pass.

        A thin user of :func:`interp.generation.generate`: a hook at the detector's hook reads the activation
        of the token fed in at each step (the same forward produces the next token's logits), so a token's
        score equals its score when the finished text is scored in one pass. ``on_token(index, token_id,
        token_str, score)`` is called for each generated token (return True from it to stop there).
        ``stop_above``: a score (or True for the detector's threshold); generation stops right after the first
        token scoring above it. Greedy by default; ``do_sample`` samples with ``temperature``, ``top_k`` and
        ``top_p`` from a generator seeded with ``seed``. ``steering``: Interventions applied while generating
        (the detector sees the steered activations when its hook is downstream of theirs). ``prompt`` may be
        a chat (a list of messages).
        """
        hook = self.check_model(model)
        from interp.generation import generate
        from interp.model import max_length, tokenize

        if _is_encoder(model):
            raise DetectorError(
                f"model {_identity(model).get('name')!r} is an encoder (BERT-like) and cannot generate; "
                "monitor needs a decoder-only model such as GPT-2 (use detector.score for encoders)"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop = self._stop_value(stop_above)
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError("prompt must be a non-empty string")
            n_prompt = tokenize(model, [prompt]).lengths[0]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
            n_prompt = 0  # a chat: its length is known once the template is applied
        else:
            raise ConfigError("prompt must be a non-empty string or a chat (a list of {'role', 'content'} messages)")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive (use do_sample=False for greedy), got {temperature}")
        limit = max_length(model)
        if n_prompt + max_new_tokens > limit:
            raise ConfigError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{limit} tokens; lower max_new_tokens"
            )
        tok = model.tokenizer
        stop_when = None
        if on_token is not None:

            def stop_when(k: int, tokens: Tensor, scores: dict[str, Tensor]) -> bool:
                tid = int(tokens[0])
                return on_token(k, tid, _token_strings(tok, [tid])[0], float(scores["detector"][0])) is True

        watch = Watch(hook, self.watcher(model).fn, name="detector", stop_above=stop)
        res = generate(model, [prompt], act=steering, watch=[watch], max_new_tokens=max_new_tokens,
                       temperature=float(temperature) if do_sample else 0.0, top_k=top_k, top_p=top_p, seed=seed,
                       stop_at_eos=stop_at_eos, stop_when=stop_when)
        L, n = len(res.prompt_ids[0]), int(res.lengths[0])
        row = res.scores["detector"][0]
        token_ids = res.generated(0).clone()
        scores_t = row[L : L + n].clone()
        why = res.stop_reasons[0]
        reason = "stop_above" if why.startswith("stop_above") else "callback" if why == "stop_when" else why
        stopped = reason in ("stop_above", "callback")
        return MonitorResult(
            prompt=res.prompts[0],
            text=tok.decode(token_ids.tolist()),
            token_ids=token_ids,
            tokens=_token_strings(tok, token_ids),
            scores=scores_t,
            prompt_ids=res.prompt_ids[0],
            prompt_scores=row[:L].clone(),
            stopped=stopped,
            stop_index=n - 1 if stopped else None,
            threshold=stop,
            aggregate=aggregate_scores(scores_t, self.aggregation_, self.k),
            aggregation=self.aggregation_,
            reason=reason,
        )


def _as_inputs(texts: Any) -> tuple[list[Example] | None, list[list[int]] | None]:
    """Texts (with their regions and spans) or token-id rows."""
    if isinstance(texts, Tensor):
        if texts.dtype.is_floating_point:
            raise ConfigError("token ids must be an integer tensor [batch, pos]")
        t = texts.unsqueeze(0) if texts.ndim == 1 else texts
        if t.ndim != 2 or t.shape[1] == 0:
            raise ConfigError(f"token ids must be [batch, pos], got shape {list(texts.shape)}")
        return None, [row.tolist() for row in t]
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Dataset):
        return list(texts), None
    seq = list(texts)
    if not seq:
        raise ConfigError("no texts to score; give a string or a list of strings")
    if all(isinstance(r, (list, tuple)) and r and all(isinstance(v, int) for v in r) for r in seq):
        return None, [list(r) for r in seq]
    if all(isinstance(r, str) for r in seq):
        if any(not r for r in seq):
            raise ConfigError("cannot score an empty string; every text needs at least one character")
        return [Example(text=r, id=i) for i, r in enumerate(seq)], None
    if all(isinstance(r, Mapping) for r in seq):
        try:
            ds = load_dataset(seq, require_label=False)
        except InterpError as e:
            raise DetectorError(f"bad row to score: {e}") from None
        return list(ds), None
    raise ConfigError("texts must be a string, a list of strings, a Dataset, a list of row dicts, or token ids")


def _ranges_of(entry: Any) -> list[tuple[Any, Any]]:
    """One ``[start, end]`` or a list of them."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry):
        return [(entry[0], entry[1])]
    if isinstance(entry, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in entry):
        return [(r[0], r[1]) for r in entry]
    raise DetectorError(f"mask entry {entry!r} is not a character range [start, end] or a list of them")


@dataclass
class _IdTokens:
    input_ids: Tensor
    attention_mask: Tensor
    lengths: list[int]
    offsets: None = field(default=None)

    def to(self, device) -> _IdTokens:
        return _IdTokens(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)


def _pad_ids(rows: list[list[int]], tokenizer) -> _IdTokens:
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), int(pad), dtype=torch.int64)
    mask = torch.zeros((len(rows), L), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    return _IdTokens(ids, mask, [len(r) for r in rows])
