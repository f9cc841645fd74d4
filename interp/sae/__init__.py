"""Sparse autoencoders on stored activations: SAELens-format I/O, encode/decode, metrics and TopK training.
Comparing SAE latents with a dense probe and a difference-in-means direction lives in :mod:`interp.comparisons`.

On disk an SAE is a directory in SAELens's layout (version 6)::

    cfg.json                   {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                "normalize_activations", "reshape_activations", "metadata": {"model_name",
                                "hook_name", ...}, "k" (topk only)}
    sae_weights.safetensors    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
                               threshold [d_sae] (jumprelu only)

:meth:`SAE.load` also reads older SAELens configs (top-level ``hook_name`` / ``hook_point``, TopK written as
``architecture="standard"`` with ``activation_fn_str="topk"``) and EleutherAI ``sparsify`` directories
(``cfg.json`` + ``sae.safetensors`` holding ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec``,
``b_dec``). The ``sae-lens`` package is not needed.

The encoder follows SAELens::

    x' = normalize(x) - b_dec * apply_b_dec_to_input
    pre = x' @ W_enc + b_enc
    standard:  f = relu(pre)
    jumprelu:  f = relu(pre) * (pre > threshold)
    topk:      f = scatter(topk(pre, k).indices, relu(topk(pre, k).values))   # top k of the raw
               pre-activations, then ReLU: identical to the top k of relu(pre), and what EleutherAI does
    decode(f) = f @ W_dec + b_dec

This package reads stores only: it never imports :mod:`interp.model` or :mod:`interp.capture`. Its modules:
``autoencoder`` (the SAE), ``formats`` (reading SAELens and EleutherAI directories), ``streaming`` (batches of
a store read ahead), ``evaluation`` (metrics, top activations), ``training`` (TopK training).
"""

from interp.sae.autoencoder import (
    ARCHITECTURES,
    CFG_FILE,
    EAI_WEIGHTS_FILE,
    NORMALIZATIONS,
    OPTIMIZER_STATE,
    SAE,
    TRAINING_STATE,
    WEIGHTS_FILE,
)
from interp.sae.evaluation import SAEMetrics, _as_sae, evaluate, top_activations
from interp.sae.formats import fold_decoder_norms
from interp.sae.streaming import _as_store, resolve_sae_hook
from interp.sae.training import _train_step, train_topk_sae

__all__ = [
    "ARCHITECTURES",
    "CFG_FILE",
    "EAI_WEIGHTS_FILE",
    "NORMALIZATIONS",
    "OPTIMIZER_STATE",
    "SAE",
    "SAEMetrics",
    "TRAINING_STATE",
    "WEIGHTS_FILE",
    "evaluate",
    "fold_decoder_norms",
    "resolve_sae_hook",
    "top_activations",
    "train_topk_sae",
]
