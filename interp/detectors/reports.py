"""Reports: a detector's metrics on labelled data, at example, token and span level."""

from __future__ import annotations

from typing import Any

import torch

from interp.datasets import Dataset, load_dataset, token_labels_from_spans, token_mask_for_region
from interp.detectors.calibration import _metrics, _runs
from interp.detectors.results import DetectorReport
from interp.errors import ConfigError, DetectorError, StoreError
from interp.store import ActivationStore


class _Reporting:
    """Detector methods that measure it on labelled data (a dataset through a model, or a store)."""

    # ------------------------------------------------------------------------------------------- report

    def report(
        self,
        model_or_store,
        data: Any = None,
        *,
        split: str | None = "test",
        batch_size: int = 32,
        progress: bool = False,
    ) -> DetectorReport:
        """Metrics at example, token and span level: ``report(model, dataset)`` or ``report(store)``.

        With a model, ``data`` is a dataset (name, path, Dataset, rows) whose ``label`` gives example-level
        truth and whose ``spans`` give token- and span-level truth (a span is scored by its maximum token);
        the report keeps the scores for a token heatmap (``report.plot()``). With a store, its rows are scored
        without a model; token-level needs stored token labels, and spans are runs of consecutive tokens with
        the same label. ``split``: ``"test"`` (default; every example when the data has no split column),
        ``"train"``, or None for all.
        """
        self._check_fitted()
        if isinstance(model_or_store, ActivationStore):
            if data is not None:
                raise ConfigError("report(store) takes no dataset: the store holds its own examples")
            return self._report_store(model_or_store, split)
        if data is None:
            raise ConfigError("report(model, data) needs a dataset to score; or pass an ActivationStore alone")
        ds = load_dataset(data, require_label=False)
        if split is not None and any(e.split is not None for e in ds):
            ds = Dataset([e for e in ds if e.split == split], ds.name, ds.source)
            if not len(ds):
                raise DetectorError(f"dataset has no examples in split {split!r}; use split=None for all of them")
        scores = self.score(model_or_store, ds, batch_size=batch_size, progress=progress)
        metrics: dict[str, dict[str, float]] = {}
        labels = [e.label for e in ds]
        if all(lab is not None for lab in labels):
            y = torch.tensor([self._is_positive(lab) for lab in labels], dtype=torch.int64)
            metrics["example"] = _metrics(scores.aggregate, y, self.threshold_)
        if ds.has_spans:
            tok_s, tok_y, span_s, span_y = [], [], [], []
            for i, ex in enumerate(ds):
                offsets = scores.offsets[i]  # type: ignore[index]
                spans01 = [{**s, "label": self._is_positive(s["label"])} for s in ex.spans]
                labs = token_labels_from_spans(offsets, spans01)
                labs_t = torch.tensor(labs, dtype=torch.int64)
                keep = labs_t >= 0
                tok_s.append(scores.scores[i][keep].double())
                tok_y.append(labs_t[keep])
                for s in ex.spans:
                    m = torch.tensor(token_mask_for_region(offsets, [s["start"], s["end"]]), dtype=torch.bool)
                    if m.any():
                        span_s.append(float(scores.scores[i][m].max()))
                        span_y.append(self._is_positive(s["label"]))
            metrics["token"] = _metrics(torch.cat(tok_s), torch.cat(tok_y), self.threshold_)
            metrics["span"] = _metrics(torch.tensor(span_s), torch.tensor(span_y), self.threshold_)
        if not metrics:
            raise DetectorError("the dataset has neither labels nor spans; nothing to report on")
        positive = [self._is_positive(lab) for lab in labels] if all(lab is not None for lab in labels) else None
        return DetectorReport(metrics, self.threshold_, scores, source=f"{ds.name} ({len(ds)} texts)", labels=positive,
                              detector=f"{self.method} at {self.hook_} of {self.model_.get('name')}")

    def _is_positive(self, value: Any) -> int:
        return int(value == self.positive_ or (isinstance(value, bool) and int(value) == self.positive_))

    def _report_store(self, store: ActivationStore, split: str | None) -> DetectorReport:
        if store.d_model != self.d_model:
            raise DetectorError(f"store {store.path} has d_model={store.d_model}, the detector reads {self.d_model}")
        hook = store.resolve_hook(self.hook_)
        if split is None:
            rows = torch.arange(len(store))
        elif split in ("train", "test"):
            train, test = store.train_test_split(seed=self.seed)
            rows = test if split == "test" else train
        else:
            raise ConfigError(f"split must be 'train', 'test' or None, got {split!r}")
        metrics: dict[str, dict[str, float]] = {}
        try:
            y_ex, _classes, _pos = self._row_labels(store, "label")
            s, y = self._unit_scores(store, hook, rows, y_ex, "example", self.weight_, self.bias_)
            metrics["example"] = _metrics(s, y, self.threshold_)
        except (DetectorError, StoreError):
            pass
        if store.manifest.get("has_token_labels"):
            y_tok, _c, _p = self._row_labels(store, "token_label")
            lab_rows = rows[y_tok[rows] >= 0]
            s, y = self._unit_scores(store, hook, lab_rows, y_tok, "token", self.weight_, self.bias_)
            metrics["token"] = _metrics(s, y, self.threshold_)
            span_s, span_y = _runs(store, lab_rows, s, y)
            metrics["span"] = _metrics(span_s, span_y, self.threshold_)
        if not metrics:
            raise DetectorError(f"store {store.path} has no binary 'label' and no token labels to report on")
        return DetectorReport(metrics, self.threshold_, None, source=f"store {store.path} ({split or 'all'} rows)")
