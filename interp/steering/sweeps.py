"""Steered generation through the one decoding loop, sweeps over alphas, and the metrics that score them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import run_hooks
from interp.errors import ConfigError, SteeringError
from interp.generation import GenerationResult, Positions, projection_watch
from interp.generation import generate as engine_generate
from interp.model import Tokens, canonical_hook, is_encoder, model_device, model_identity
from interp.store import atomic_write_json

OPS = ("add", "ablate", "clamp")
METHODS = ("diff_in_means", "pca")
_MLP_HIDDEN = re.compile(r"(^|\.)mlp\.(hook_pre|hook_post|in\.hook_out|out\.hook_in)$")



from interp.steering.interventions import Intervention, _as_vector

# ----------------------------------------------------------------------------------------------- generation


def _projection_target(project: Any, steering: Sequence[Intervention], model) -> tuple[str, Tensor] | None:
    if project is None or project is False:
        return None
    if project is True:
        if not steering:
            raise ConfigError("project=True projects on the first steering direction, but no steering was given")
        iv = steering[0]
        hook = iv.hooks_for(model)[0]
        vec = iv.vector
    else:
        vec = _as_vector(project)
        hook = getattr(project, "hook", None)
        if hook is None:
            raise SteeringError("project= needs a Direction (with its hook); a raw tensor has no hook")
        hook = canonical_hook(model, hook)
        if vec.numel() != int(model.cfg.d_model):
            raise SteeringError(
                f"the projection direction has {vec.numel()} dimensions, the model's d_model is {model.cfg.d_model}"
            )
    return hook, vec / vec.norm()


def generate(
    model,
    prompts: str | Sequence[str],
    steering: Sequence[Intervention] | Intervention = (),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    project: Any = None,
    return_logits: bool = False,
    batch_size: int = 16,
    progress: bool = False,
    *,
    top_p: float | None = None,
    watch: Any = (),
    stop_when: Any = None,
) -> GenerationResult:
    """Generate continuations of ``prompts`` with ``steering`` applied, batched and KV-cached.

    A thin user of :func:`interp.generation.generate` (see there for prompts, chats, sampling and stopping).
    Prompts are left-padded with an attention mask (each row sees exactly its own tokens). ``temperature=0``
    is greedy; otherwise tokens are sampled from ``softmax(logits / temperature)`` (``top_k`` / ``top_p`` to
    truncate) with a ``torch.Generator`` seeded by ``seed``: the same prompts, batch size and seed give the
    same tokens. ``project``: a Direction (or ``True`` for the first steering direction) whose projection at
    its hook, after steering, is recorded at every position that produced a generated token
    (``result.projections``). ``watch``: more watchers (Detectors, Directions, ``Watch`` hooks) whose
    per-token scores land in ``result.scores``; they see the steered activations downstream of the steering.
    """
    if is_encoder(model):
        raise SteeringError("this model is an encoder (no next-token head); generate with a decoder such as GPT-2")
    if isinstance(steering, Intervention):
        steering = [steering]
    steering = list(steering)
    for s in steering:
        if not isinstance(s, Intervention):
            raise ConfigError(f"steering= takes Intervention objects, got {type(s).__name__}; "
                              "build one with Intervention(direction, op='add', alpha=4)")
    target = _projection_target(project, steering, model)
    watchers = list(watch) if isinstance(watch, (list, tuple)) else [watch]
    if target is not None:
        watchers.append(projection_watch(target[1], name="projection", hook=target[0]))
    acts = [a for s in steering for a in s.acts(model)]
    res = engine_generate(
        model, prompts, act=acts, watch=watchers, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos, stop_when=stop_when,
        score_last=len(watchers) > (target is not None), return_logits=return_logits, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    # one mask per intervention (the union over its hooks), as the steering handle reports it
    per_iv, k = [], 0
    for s in steering:
        n = len(s.hooks_for(model))
        m = res.steered[k]
        for extra in res.steered[k + 1 : k + n]:
            m = m | extra
        per_iv.append(m)
        k += n
    res.steered = per_iv
    if target is not None:
        proj = res.scores.pop("projection")
        steps = res.token_ids.shape[1]
        out = torch.full((len(res.prompt_ids), steps), float("nan"))
        for i, p in enumerate(res.prompt_ids):
            n = int(res.lengths[i])
            out[i, :n] = proj[i, len(p) - 1 : len(p) - 1 + n]
        res.projections = out
    res.config.update({"steering": [s.describe() for s in steering],
                       "project_hook": None if target is None else target[0]})
    return res


# ----------------------------------------------------------------------------------------------- sweeps and metrics


class Metric:
    """A built-in sweep metric: ``evaluate(model, generation) -> one float per prompt``.

    ``steered`` metrics read what the steered model computed while generating (recorded during
    :func:`generate`); the others score the generated text with the unsteered model.
    """

    name = "metric"
    needs_logits = False
    project: Any = None

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        raise NotImplementedError


def _token_id(model, t: int | str) -> int:
    if isinstance(t, int) and not isinstance(t, bool):
        if not 0 <= t < int(model.cfg.d_vocab):
            raise ConfigError(f"token id {t} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return t
    ids = model.tokenizer.encode(str(t), add_special_tokens=False)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{t!r} is {len(ids)} tokens {pieces} for this tokenizer; give single-token strings or ids")
    return int(ids[0])


class logit_diff(Metric):  # noqa: N801 - used like a function: logit_diff([" love"], [" hate"])
    """Mean logit of ``pos_tokens`` minus mean logit of ``neg_tokens`` in the steered model's next-token
    logits, averaged over the positions that produced generated tokens (``at="generated"``) or taken at
    the first one only (``at="first"``). Tokens: single-token strings or ids."""

    needs_logits = True

    def __init__(self, pos_tokens: Sequence[int | str], neg_tokens: Sequence[int | str], at: str = "generated"):
        if at not in ("generated", "first"):
            raise ConfigError(f"at must be 'generated' or 'first', got {at!r}")
        if isinstance(pos_tokens, (str, int)):
            pos_tokens = [pos_tokens]
        if isinstance(neg_tokens, (str, int)):
            neg_tokens = [neg_tokens]
        if not pos_tokens or not neg_tokens:
            raise ConfigError("logit_diff needs at least one token in each set")
        self.pos_tokens, self.neg_tokens, self.at = list(pos_tokens), list(neg_tokens), at
        side = lambda ts: repr(ts[0]) if len(ts) == 1 else "mean(" + ", ".join(map(repr, ts)) + ")"  # noqa: E731
        where = "" if at == "generated" else ", first token"
        self.name = f"logit_diff({side(self.pos_tokens)} - {side(self.neg_tokens)}{where})"

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        assert gen.logits is not None
        p = [_token_id(model, t) for t in self.pos_tokens]
        n = [_token_id(model, t) for t in self.neg_tokens]
        diff = gen.logits[..., p].mean(-1) - gen.logits[..., n].mean(-1)  # [B, steps], NaN past the end
        if self.at == "first":
            return diff[:, 0].tolist()
        return torch.nanmean(diff, 1).tolist()


class projection(Metric):  # noqa: N801
    """Mean projection on ``direction`` (unit) at its hook, after steering, over the positions that produced
    the generated tokens: how far along the direction the steered model actually was while writing."""

    def __init__(self, direction: Any):
        if getattr(direction, "hook", None) is None:
            raise ConfigError("projection() needs a Direction with a hook")
        self.project = direction
        self.name = "projection"

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        assert gen.projections is not None
        return torch.nanmean(gen.projections, 1).tolist()


class probe_score(Metric):  # noqa: N801
    """The score of the generated text under a probe, on the unsteered model.

    ``scorer``: a probe with ``decision_function`` (e.g. :class:`~interp.probes.linear.LinearProbe`) or a
    Direction, read at ``hook`` (default: the Direction's or the probe's hook) over the generated tokens,
    with the prompt as context. ``pool``: ``"tokens"`` (mean of per-token scores), ``"mean"`` (score of the
    mean activation, for probes trained with ``positions="mean"``) or ``"last"``. Or any callable / object
    with ``score_texts(texts)`` / ``score(texts)`` / ``score(model, texts)`` (a Detector: its ``aggregate`` is
    used) returning one score per continuation text.
    """

    def __init__(self, scorer: Any, hook: str | None = None, pool: str = "tokens", batch_size: int = 16):
        if pool not in ("tokens", "mean", "last"):
            raise ConfigError(f"pool must be 'tokens', 'mean' or 'last', got {pool!r}")
        self.scorer, self.hook, self.pool, self.batch_size = scorer, hook, pool, batch_size
        self.name = "probe_score"

    def _text_scores(self, model, texts: list[str]) -> list[float] | None:
        """Scores from a text scorer (Detector-like ``score(model, texts)``, ``score(texts)``, a callable), or
        None when the scorer reads activations (a probe or a Direction)."""
        import inspect

        s = self.scorer
        if hasattr(s, "decision_function") or hasattr(s, "vector"):
            return None
        fn = next((getattr(s, a) for a in ("score_texts", "score") if callable(getattr(s, a, None))), None)
        if fn is None:
            if not callable(s):
                raise ConfigError(f"cannot score texts with a {type(s).__name__}; give a probe, a Direction, "
                                  "a detector or a callable texts -> scores")
            fn = s
        try:
            takes_model = "model" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_model = False
        out = fn(model, texts) if takes_model else fn(texts)
        out = getattr(out, "aggregate", out)
        return [float(x) for x in _to_list(out)]

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        text_scores = self._text_scores(model, gen.texts)
        if text_scores is not None:
            return text_scores
        hook = self.hook or getattr(self.scorer, "hook", None)
        if hook is None:
            raise ConfigError("probe_score needs hook= for a probe that does not record its hook")
        hook = canonical_hook(model, hook)
        seqs, L = gen.sequences(), gen.prompt_lengths
        scores: list[float] = []
        device = model_device(model)
        with torch.inference_mode():
            for b0 in range(0, len(seqs), self.batch_size):
                chunk = seqs[b0 : b0 + self.batch_size]
                T = max(len(s) for s in chunk)
                ids = torch.zeros(len(chunk), T, dtype=torch.long)
                mask = torch.zeros(len(chunk), T, dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)], mask[i, : len(s)] = s, 1
                toks = Tokens(ids, mask, [], [len(s) for s in chunk]).to(device)
                acts = run_hooks(model, toks, [hook])  # the fast path where the hook maps (interp.fastpath)
                for i, s in enumerate(chunk):
                    lo, hi = int(L[b0 + i]), len(s)
                    x = acts[hook][i, lo:hi].float().cpu()
                    if x.shape[0] == 0:
                        scores.append(float("nan"))
                        continue
                    if self.pool == "mean":
                        x = x.mean(0, keepdim=True)
                    elif self.pool == "last":
                        x = x[-1:]
                    scores.append(float(self._score_acts(x).mean()))
        return scores

    def _score_acts(self, x: Tensor) -> Tensor:
        s = self.scorer
        if hasattr(s, "decision_function"):
            return torch.as_tensor(_to_array(s.decision_function(x))).float().flatten()
        v = _as_vector(s)
        return x @ (v / v.norm())


def _to_array(x: Any):
    return x.detach().cpu() if isinstance(x, Tensor) else x


def _to_list(x: Any) -> list:
    if isinstance(x, Tensor):
        return x.detach().cpu().flatten().tolist()
    try:
        import numpy as np

        return np.asarray(x, dtype=float).ravel().tolist()
    except (TypeError, ValueError):
        return list(x)


@dataclass
class SweepResult:
    """A table (one row per alpha and prompt: ``alpha``, ``prompt``, ``text``, metric columns) and its figure."""

    table: Any
    figure: Any
    config: dict[str, Any] = field(default_factory=dict)

    _group: ClassVar[tuple[str, ...]] = ("alpha",)  # summary rows
    _columns: ClassVar[tuple[str, ...]] = ("alpha", "prompt", "text")  # the table's columns that are not metrics
    _file: ClassVar[str] = "sweep"  # save(): FILE.json (format interp.FILE) and FILE.html

    def __iter__(self):
        return iter((self.table, self.figure))

    def plot(self):
        return self.figure

    @property
    def metrics(self) -> list[str]:
        return [c for c in self.table.columns if c not in self._columns]

    def summary(self):
        """Mean and standard error of each metric per alpha (per method and alpha for a comparison)."""
        return self.table.groupby(list(self._group), sort=False)[self.metrics].agg(["mean", "sem"])

    def save(self, path: str | os.PathLike) -> Path:
        """``FILE.json`` (config + rows) and ``FILE.html`` (the figure); FILE is ``sweep`` or
        ``steering_comparison``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        rows = json.loads(self.table.to_json(orient="records"))
        body = {"format": f"interp.{self._file}", "version": 1, "config": self.config, "rows": rows}
        atomic_write_json(path / f"{self._file}.json", body)
        from interp.reports import write_html

        write_html(path / f"{self._file}.html", self.figure)  # loads plotly.min.js written beside it
        return path


def _metrics(metric: Any, direction: Any) -> dict[str, Any]:
    if metric is None:
        return {"projection": projection(direction)}
    if isinstance(metric, Mapping):
        out = dict(metric)
    elif isinstance(metric, (list, tuple)):
        out = {}
        for m in metric:
            name = getattr(m, "name", None) or getattr(m, "__name__", "metric")
            out[name if name not in out else f"{name}_{len(out)}"] = m
    else:
        out = {"metric": metric}
    for name, m in out.items():
        if not (isinstance(m, Metric) or callable(m)):
            raise ConfigError(f"metric {name!r} is a {type(m).__name__}; give a Metric or fn(model, texts, token_ids)")
    return out


def sweep(
    model,
    prompts: str | Sequence[str],
    direction: Any,
    alphas: Sequence[float],
    metric: Any = None,
    op: str = "add",
    positions: Positions = "all",
    hook: str | Sequence[str] | None = None,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> SweepResult:
    """Generate from ``prompts`` steered with each of ``alphas`` and score every continuation.

    ``metric``: a built-in (:class:`logit_diff`, :class:`projection`, :class:`probe_score`), a callable
    ``fn(model, texts, token_ids) -> list[float]`` (continuation texts and generated ids per prompt, scored
    on the unsteered model), or a dict ``{name: metric}``; default: the projection on ``direction``. Every
    alpha uses the same ``seed``, so differences come from steering, not from sampling noise. ``op="clamp"``
    sweeps the clamp value. Returns a :class:`SweepResult` (``table, figure = sweep(...)`` also works).
    """
    if op == "ablate":
        raise ConfigError("ablate has no alpha to sweep; compare generate() with and without it instead")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("sweep needs at least one alpha")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    metrics = _metrics(metric, direction)
    need_logits = any(getattr(m, "needs_logits", False) for m in metrics.values())
    projects = [m.project for m in metrics.values() if isinstance(m, Metric) and m.project is not None]
    if len({id(p) for p in projects}) > 1:
        raise ConfigError("one sweep records one projection; use one projection() metric per sweep")
    rows = []
    for a in tqdm(alphas, desc="sweep", disable=not progress):
        iv = Intervention(direction, op=op, alpha=a, positions=positions, hook=hook)
        gen = generate(model, prompts, steering=[iv], max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, project=projects[0] if projects else None, return_logits=need_logits,
                       batch_size=batch_size)
        values = {}
        for name, m in metrics.items():
            if isinstance(m, Metric):
                v = m.evaluate(model, gen)
            else:
                v = m(model, gen.texts, [gen.generated(i) for i in range(len(prompts))])
            v = [float(x) for x in _to_list(v)]
            if len(v) != len(prompts):
                raise ConfigError(f"metric {name!r} returned {len(v)} values for {len(prompts)} prompts")
            values[name] = v
        for i, p in enumerate(prompts):
            rows.append({"alpha": a, "prompt": p, "text": gen.texts[i], **{k: v[i] for k, v in values.items()}})
    import pandas as pd

    from interp import plots

    table = pd.DataFrame(rows)
    config = {
        "model": model_identity(model), "op": op,
        "positions": positions if isinstance(positions, str) else list(positions),
        "hook": Intervention(direction, op=op, alpha=alphas[0], hook=hook).hooks_for(model),
        "alphas": alphas, "metrics": list(metrics), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "seed": seed,
    }
    title = f"Steering {config['model'].get('name', 'the model')}: {op} at {', '.join(config['hook'])}"
    fig = plots.steering_curve(table, metrics=list(metrics), title=title, op=op,
                               labels={k: getattr(m, "name", k) for k, m in metrics.items()})
    return SweepResult(table=table, figure=fig, config=config)
