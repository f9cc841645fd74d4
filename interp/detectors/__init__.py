"""Detectors: a probe or direction, how its token scores are aggregated, and a calibrated threshold.

A :class:`Detector` turns the activations at one hook into a score per token (a probe's logit, or a
direction's projection mapped through a fitted scale and offset: both are one affine map ``x . w + b``),
aggregates the tokens a detection mask selects (``mean``, ``max``, ``topk``, ``last``) into one score per text,
and flags texts (or tokens) whose score is above a threshold chosen for a target false-positive rate::

    store = capture(model, "deception", hooks="resid_post", layers=[4], positions="response", out="runs/dec")
    det = Detector.fit(store, label="label")               # probe on response tokens, threshold at 1% FPR
    det.save("detectors/deception")
    det = Detector.load("detectors/deception", model=model)
    s = det.score(model, ["Question: ...\\nAnswer: ..."])   # per-token scores + one aggregate per text
    det.monitor(gpt2, "Tell me about", max_new_tokens=40, on_token=print, stop_above=det.threshold_)

Streaming convention (``monitor``): a generated token is scored by the activation at its own position, the
same activation that scoring the finished text in one pass uses. That activation exists only in the forward
step that consumes the token, which is also the step that produces the next token's logits; so each token's
score arrives with the next step (no second pass), and the last token's score costs one forward that stops
at the hook's layer. ``stop_above`` stops right after the first token whose score is above it: that token is
the last one returned.

On disk (``save(dir)``): ``detector.json`` (settings, threshold and its calibration, model identity,
provenance, validation metrics, the sha256 of the tensors file) and ``detector.safetensors`` (``weight``
``[d_model]`` and ``bias`` ``[1]`` of the affine token scorer; for a direction also ``direction`` ``[d_model]``

The package splits the class by responsibility: :mod:`~interp.detectors.calibration` (fitting and calibration
on stores), :mod:`~interp.detectors.scoring` (scoring texts and monitoring generation through a model),
:mod:`~interp.detectors.reports` and :mod:`~interp.detectors.results` (metrics, token tables, plots), and
:mod:`~interp.detectors.detector` (the class, its settings, save and load).
"""

from interp.detectors.calibration import AGGREGATIONS, METHODS, aggregate_scores, threshold_at_fpr
from interp.detectors.detector import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, TENSORS_FILE, Detector
from interp.detectors.results import DetectorReport, DetectorScores, MonitorResult, _ansi

__all__ = ["AGGREGATIONS", "CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "METHODS", "TENSORS_FILE", "Detector",
           "DetectorReport", "DetectorScores", "MonitorResult", "_ansi", "aggregate_scores", "threshold_at_fpr"]
