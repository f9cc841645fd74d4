"""What detectors return: token scores of texts, reports of metrics, monitored generations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.artifacts import jsonable as _jsonable
from interp.errors import DetectorError


@dataclass
class DetectorScores:
    """Scores of a batch of texts: per-token scores (every token), the mask of tokens that count, and the
    aggregate per text. ``flagged`` is ``aggregate > threshold``."""

    token_ids: list[Int[Tensor, " pos"]]
    scores: list[Float[Tensor, " pos"]]
    masks: list[Tensor]
    aggregate: Float[Tensor, " texts"]
    threshold: float | None
    aggregation: str
    texts: list[str] | None = None
    offsets: list[list[tuple[int, int]]] | None = None
    tokenizer: Any = field(default=None, repr=False)
    _tokens: list[list[str]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def tokens(self) -> list[list[str]]:
        """Each text's tokens as strings (decoded on first use, so batch scoring pays nothing for them)."""
        if self._tokens is None:
            self._tokens = [_token_strings(self.tokenizer, t) for t in self.token_ids]
        return self._tokens

    @property
    def flagged(self) -> Tensor:
        """Texts whose aggregate score is above the threshold (all False when the detector has none)."""
        if self.threshold is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.aggregate > self.threshold

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per text: tokens, token scores, mask, aggregate, flagged."""
        out = []
        for i in range(len(self)):
            out.append(
                _jsonable(
                    {
                        "text": None if self.texts is None else self.texts[i],
                        "tokens": self.tokens[i],
                        "token_ids": self.token_ids[i].tolist(),
                        "scores": self.scores[i].tolist(),
                        "mask": self.masks[i].tolist(),
                        "aggregate": float(self.aggregate[i]),
                        "flagged": bool(self.flagged[i]),
                    }
                )
            )
        return out

    def format(self, i: int = 0, color: bool = False, only_mask: bool = False) -> str:
        """Text ``i`` as a token table (position, token, score, bar), coloured with ANSI codes when ``color``."""
        lines = []
        thr = self.threshold
        scale = max(1e-6, float(self.scores[i].abs().max()) if self.scores[i].numel() else 1.0)
        for p, (tok, s, m) in enumerate(zip(self.tokens[i], self.scores[i].tolist(), self.masks[i].tolist())):
            if only_mask and not m:
                continue
            bar = "#" * int(round(10 * min(1.0, abs(s) / scale)))
            flag = "!" if thr is not None and s > thr else " "
            row = f"{p:5d} {flag} {tok!r:<18} {s:+9.4f} {bar}" + ("" if m else "   (not in mask)")
            if color:
                row = _ansi(row, s, thr, scale)
            lines.append(row)
        verdict = "" if thr is None else ("  FLAGGED" if bool(self.flagged[i]) else "  below threshold")
        thr_text = "none" if thr is None else f"{thr:+.4f}"
        lines.append(f"{self.aggregation} over mask: {float(self.aggregate[i]):+.4f}  threshold: {thr_text}{verdict}")
        return "\n".join(lines)

    def plot(
        self,
        indices: int | Sequence[int] | None = None,
        width: int = 16,
        title: str | None = None,
        labels: Sequence[Any] | None = None,
    ):
        """A plotly token heatmap of texts ``indices`` (default: the first up to 4), centred on the threshold."""
        from interp.plots import token_heatmap

        if indices is None:
            indices = list(range(min(4, len(self))))
        elif isinstance(indices, int):
            indices = [indices]
        return token_heatmap(
            [self.tokens[i] for i in indices],
            [self.scores[i] for i in indices],
            threshold=self.threshold,
            masks=[self.masks[i] for i in indices],
            row_labels=[f"text {i}: {self.aggregation}={float(self.aggregate[i]):+.2f}" for i in indices],
            width=width,
            title=title or "detector token scores",
            labels=None if labels is None else [labels[i] for i in indices],
            flags=None if self.threshold is None else [bool(self.flagged[i]) for i in indices],
            aggregates=[float(self.aggregate[i]) for i in indices],
        )


def _ansi(row: str, score: float, thr: float | None, scale: float) -> str:
    """Colour a row: red above the threshold (brighter when further), green below it."""
    centre = 0.0 if thr is None else thr
    frac = max(0.0, min(1.0, abs(score - centre) / max(scale, 1e-6)))
    level = int(round(80 + 175 * frac))
    rgb = (level, 60, 60) if score > centre else (60, level, 60)
    return f"\x1b[38;2;{rgb[0]};{rgb[1]};{rgb[2]}m{row}\x1b[0m"


@dataclass
class DetectorReport:
    """Metrics of a detector on labelled data at each level it could be judged on.

    ``metrics[level]`` for level ``example`` (aggregate per text vs text label), ``token`` (each labelled token)
    and ``span`` (each labelled span scored by its maximum token) holds ``auroc``, ``recall_at_1pct_fpr``, and
    ``accuracy``, ``fpr``, ``recall`` at the detector's threshold, with ``n`` and ``n_positive``.
    """

    metrics: dict[str, dict[str, float]]
    threshold: float | None
    scores: DetectorScores | None = None
    source: str = ""
    labels: list[int] | None = None  # per scored text: 1 = positive class (for the heatmap's label column)
    detector: str = ""  # what scored them, for figure titles: method, hook, model

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"metrics": self.metrics, "threshold": self.threshold, "source": self.source})

    def __str__(self) -> str:
        cols = [("auroc", "auroc"), ("recall_at_1pct_fpr", "rec@1%fpr"), ("accuracy", "accuracy"), ("fpr", "fpr"),
                ("recall", "recall"), ("n", "n"), ("n_positive", "n_pos")]
        thr = "none" if self.threshold is None else f"{self.threshold:+.4f}"
        lines = [f"detector report on {self.source}; threshold {thr}",
                 f"{'level':<8}" + "".join(f"{head:>11}" for _, head in cols)]
        for level, m in self.metrics.items():
            vals = []
            for key, _ in cols:
                v = m.get(key, float("nan"))
                vals.append(f"{v:>11d}" if isinstance(v, int) else f"{v:>11.4f}")
            lines.append(f"{level:<8}" + "".join(vals))
        return "\n".join(lines)

    def plot(self, indices: int | Sequence[int] | None = None, width: int = 16):
        """Token heatmap of the scored texts (reports made from a model and a dataset)."""
        if self.scores is None:
            raise DetectorError("this report was made from a store: it has no token strings to draw; "
                                "use detector.report(model, dataset) for a heatmap")
        by = f" ({self.detector})" if self.detector else ""
        return self.scores.plot(indices, width=width, title=f"Detector{by} token scores on {self.source}",
                                labels=self.labels)


@dataclass
class MonitorResult:
    """What :meth:`Detector.monitor` generated and how each generated token scored.

    ``scores[i]`` is the score of generated token ``token_ids[i]`` (from the activation at its own position);
    ``prompt_scores`` are the prompt's tokens' scores from the prefill pass. ``full_ids`` is prompt + generated,
    the token sequence that ``detector.score(model, result.full_ids)`` scores identically in one pass.
    """

    prompt: str
    text: str
    token_ids: Int[Tensor, " new"]
    tokens: list[str]
    scores: Float[Tensor, " new"]
    prompt_ids: Int[Tensor, " prompt"]
    prompt_scores: Float[Tensor, " prompt"]
    stopped: bool
    stop_index: int | None
    threshold: float | None
    aggregate: float = float("nan")
    aggregation: str = "mean"
    reason: str = "max_new_tokens"

    @property
    def full_ids(self) -> Int[Tensor, " total"]:
        return torch.cat([self.prompt_ids, self.token_ids])

    def plot(self, width: int = 16):
        from interp.plots import token_heatmap

        return token_heatmap(
            [self.tokens], [self.scores], threshold=self.threshold, width=width,
            row_labels=[f"generated: {self.aggregation}={self.aggregate:+.2f}"],
            title="detector scores during generation"
            + (f" (stopped at token {self.stop_index})" if self.stopped else ""),
        )


def _token_strings(tokenizer, ids: Tensor | Sequence[int]) -> list[str]:
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if tokenizer is None:
        return [str(i) for i in ids]
    return list(tokenizer.batch_decode([[i] for i in ids]))
