"""Steering: push a model along a direction, or remove it, while it runs, and measure what changed.

Three operations act on the activation ``x`` at a hook, at the chosen token positions only:

==========  ==========================================  =================================================
op          what happens to ``x``                       ``alpha``
==========  ==========================================  =================================================
``add``     ``x + alpha * v``                           the scale (``v`` as given: unit for a Direction)
``ablate``  ``x - (x . u) u``                           not used
``clamp``   ``x + (alpha - x . u) u``                   the value the component along ``u`` is set to
==========  ==========================================  =================================================

``v`` is the direction's vector and ``u = v / |v|``. A :class:`~interp.directions.Direction` holds a unit
vector, so ``add`` moves its component by exactly ``alpha``; a raw tensor is used as given.

Positions
---------
A position is a token's index in its own row's sequence, padding excluded: ``0`` is the first prompt token
(BOS included when the model prepends one), ``L - 1`` the last of the row's ``L`` prompt tokens, ``L + k``
the ``k``-th generated token. The residual at position ``p`` is what the model reads token ``p`` into and
what its next-token prediction is made from, so **the output at ``L - 1`` is the first generated token**.

==================  ==================================================================================
``positions``       steered positions
==================  ==================================================================================
``"all"``           every real token (padding is never steered)
``"prompt"``        ``0 .. L-1``: every prompt token, the whole prefill
``"generated"``     ``L-1, L, L+1, ...``: every position whose output is a generated token, i.e. the last
                    prompt token (it produces the first generated token) and every generated token fed
                    back in. Prompt positions ``0 .. L-2`` are untouched.
``[i, j, ...]``     those positions; negative indices count back from the end of the prompt (``-1`` is
                    ``L - 1``)
==================  ==================================================================================

How ``L`` is known: a forward without a KV cache starts a sequence and its real tokens are the prompt, so a
plain forward or ``run_with_cache`` of a prompt steers under ``"generated"`` exactly the position that
would produce the first generated token. A forward that continues a KV cache (every decoding step of
``model.generate`` or :func:`generate`) continues that sequence; so does a forward without a cache whose
tokens extend the previous forward's by exactly one token (what ``model.generate(use_past_kv_cache=False)``
does each step). Padding is read from the attention mask the model is given (pass ``attention_mask`` with a
padded batch), so left- and right-padded batches are steered at the same real positions.

Use :func:`steer` around any model call (``model(...)``, ``run_with_cache``, ``model.generate``); contexts
nest, and inner interventions run after outer ones on the same hook. :func:`generate` runs its own batched,
seeded, KV-cached loop and reports which positions were steered and, optionally, the projection on a
direction at every generated token. :func:`sweep` generates over a range of alphas and scores the outputs.
"""

from __future__ import annotations

from interp.generation import GenerationResult, Positions
from interp.steering.interventions import OPS, Intervention, SteeringHandle, _as_vector, _trackers, steer  # noqa: F401 (private: comparisons, tests)
from interp.steering.sweeps import Metric, SweepResult, generate, logit_diff, probe_score, projection, sweep
from interp.steering.sweeps import _metrics  # noqa: F401 (comparisons)
from interp.steering.vectors import METHODS, steering_vector

__all__ = [
    "METHODS", "OPS", "GenerationResult", "Intervention", "Metric", "Positions", "SteeringHandle", "SweepResult", "generate",
    "logit_diff", "probe_score", "projection", "steer", "steering_vector", "sweep",
]
