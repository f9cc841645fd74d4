"""Fused logistic loss and gradient for many probes sharing one activation matrix per hook.

Contract used by the probe optimiser (``interp.probes``): it touches the activations only through a
``loss_grad`` function with this signature, one pass over ``X`` per call::

    loss_grad(X, W, b, Y, S) -> (loss, gW, gb)
      X: [H, N, d]  float16 / bfloat16 / float32 activations (never copied or upcast as a whole)
      W: [H, P, d]  float32 weights, b: [H, P] float32 biases
      Y: [P, N]     float32 targets in {0, 1}
      S: [P, N]     float32 sample weights (0 drops a row from probe p: fold masks, class weights)
      loss[h, p] = sum_n S[p, n] * BCEWithLogits(X[h, n] . W[h, p] + b[h, p], Y[p, n])      (float32)
      gW = d loss / d W  [H, P, d],   gb = d loss / d b  [H, P]

Regularisation is added by the optimiser, not here. ``loss_grad_torch`` is the plain-torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from interp.errors import ConfigError


def loss_grad_torch(
    X: Float[Tensor, "H N d"],
    W: Float[Tensor, "H P d"],
    b: Float[Tensor, "H P"],
    Y: Float[Tensor, "P N"],
    S: Float[Tensor, "P N"],
) -> tuple[Float[Tensor, "H P"], Float[Tensor, "H P d"], Float[Tensor, "H P"]]:
    """Plain-torch reference: logits, weighted logistic loss and its gradient, float32 accumulation."""
    Xf = X.float()
    logits = torch.einsum("hnd,hpd->hpn", Xf, W) + b[..., None]
    loss = (F.binary_cross_entropy_with_logits(logits, Y.expand_as(logits), reduction="none") * S).sum(-1)
    r = (torch.sigmoid(logits) - Y) * S  # dloss/dlogit
    gW = torch.einsum("hpn,hnd->hpd", r, Xf)
    return loss, gW, r.sum(-1)


def get_loss_grad(backend: str = "auto", device: torch.device | str | None = None):
    """The ``loss_grad`` implementation for ``backend`` ("auto" | "torch" | "triton") on ``device``."""
    if backend not in ("auto", "torch", "triton"):
        raise ConfigError(f"unknown backend {backend!r}: use 'auto', 'torch' or 'triton'")
    return loss_grad_torch
