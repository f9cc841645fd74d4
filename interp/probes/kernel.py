"""Fused logistic loss and gradient for many probes sharing one activation matrix per hook.

Contract used by the probe optimiser (``interp.probes``): it touches the activations only through a
``loss_grad`` function with this signature, one pass over ``X`` per call::

    loss_grad(X, W, b, Y, S) -> (loss, gW, gb)
      X: [H, N, d]  float16 / bfloat16 / float32 activations (never copied or upcast as a whole)
      W: [H, P, d]  float32 weights, b: [H, P] float32 biases
      Y: [P, N]     float32 targets in {0, 1}  (or [N]: the same targets for every probe)
      S: [P, N]     float32 sample weights (0 drops a row from probe p: fold masks, class weights; or [N])
      loss[h, p] = sum_n S[p, n] * BCEWithLogits(X[h, n] . W[h, p] + b[h, p], Y[p, n])      (float32)
      gW = d loss / d W  [H, P, d],   gb = d loss / d b  [H, P]

Regularisation is added by the optimiser, not here. Two implementations of exactly this computation live
here: ``loss_grad_torch`` (plain torch, the reference, any device) and ``loss_grad_triton`` (one fused Triton
kernel, CUDA, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``). ``get_loss_grad`` picks one.

The optimiser around the kernel is the batched L-BFGS of :mod:`interp.probes.solver`: full-batch, because
each evaluation costs one pass over ``X`` whatever the number of probes, so the method that needs the fewest
passes wins, and a full-batch quasi-Newton method converges in far fewer passes than minibatch SGD on the
badly conditioned problems real activations give (and it has a stopping test: the gradient). It touches ``X``
only through ``get_loss_grad(backend, device)``, so both backends run the same iterations over the same
loss and gradient and reach the same optimum up to float32 rounding.

The Triton kernel
-----------------
Grid: one program per ``(tile of BLOCK_N rows, hook h)``; the rows of one hook are consecutive programs, so
that hook's weights stay in L2 while its tiles stream past. Each program:

1. loops over ``d`` in tiles of ``BLOCK_D``, accumulating the logits of *all* probes of the tile,
   ``z^T[P_PAD, BLOCK_N] += W[h, :, dtile] @ X[h, rows, dtile]^T`` on the tensor cores (float32 accumulator;
   ``P`` padded to a power of two >= 16, padded probes have zero weight and zero sample weight);
2. computes the numerically stable loss ``max(z, 0) - z y + log1p(exp(-|z|))`` and the residual
   ``r = S (sigmoid(z) - y)`` in float32, and writes the tile's per-probe sums of both (``loss``, ``gb``) to a
   small partial buffer that is summed afterwards (deterministic);
3. loops over ``d`` again, last tile first (the tiles it read most recently, so the re-read is served from L2
   as far as possible), and adds ``r^T @ X[h, rows, dtile]`` into ``gW[h, :, dtile]`` with float32 atomics.

Cost model (the issue's size: H=32, P=40, N=50,000, d=4096, bfloat16, 13.1 GB of X). HBM: X once, 3.9 ms
per pass at an H100's 3.35 TB/s; a program's rows (``BLOCK_N * d * 2`` bytes, 1 MB) times the ~132 programs in
flight exceed the 50 MB L2, so part of step 3's re-read comes from HBM too (reading it last tile first keeps
the share that hits as large as it can be). L2: the weights (4 bytes per probe and column) and the ``gW``
atomics are ``~2 P / BLOCK_N`` of X's bytes each, which is why ``BLOCK_N`` is not smaller. Tensor cores: P is
padded to 64 and each product is done twice (the split below), 3.4 TFLOP per pass, ~3.4 ms at the H100's
dense bfloat16 peak: at this P the pass is as much compute as memory. ``bench/kernel.py`` measures all this
(``--sweep-tiles`` for the tile trade-offs, and a ``split=False`` diagnostic for the compute share).

Precision. Tensor cores multiply 16-bit operands exactly into a float32 accumulator; X in float16/bfloat16
is used as stored, and the float32 operands it meets (``W`` in step 1, ``r`` in step 3) are each split into
two 16-bit numbers ``hi + lo`` (``hi`` = the value rounded to the 16-bit type, ``lo`` = the rounding error
rounded again), costing two tensor-core products instead of one. That keeps 16 (bfloat16) or 22 (float16)
significant bits of the float32 operand instead of 8 or 11, so logits and gradients agree with the float32
reference computed on the same 16-bit ``X`` to about 1e-5 relative (bfloat16) / 1e-6 (float16), instead of
1e-3. For float16, whose exponent range is narrow, ``W`` and ``r`` are scaled per probe by powers of two
(exact) so that neither the high nor the low part overflows or loses digits to underflow. X in
float32 uses ``tf32x3`` products (three TF32 products: float32 accuracy on tensor cores).

On the GPU the only non-determinism is the order of the float32 atomic adds into ``gW`` (a few ulps from run
to run); the interpreter runs programs one after another and is deterministic.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from interp.errors import AnalysisError, ConfigError

if TYPE_CHECKING:  # the kernel's source names ``tl``; it is bound when the kernel is compiled (``_kernel``)
    import triton.language as tl

BACKENDS = ("auto", "torch", "triton")
P_GROUP = 128  # most probes one launch handles; more are split into groups of this size (one pass each)


def loss_grad_torch(
    X: Float[Tensor, "H N d"],
    W: Float[Tensor, "H P d"],
    b: Float[Tensor, "H P"],
    Y: Float[Tensor, "P N"],
    S: Float[Tensor, "P N"],
) -> tuple[Float[Tensor, "H P"], Float[Tensor, "H P d"], Float[Tensor, "H P"]]:
    """Plain-torch reference: logits, weighted logistic loss and its gradient, float32 accumulation."""
    Xf = X.float()
    logits = torch.baddbmm(b[..., None], W, Xf.transpose(1, 2))  # [H, P, N]
    Yx, Sx = Y.expand_as(logits), S.expand_as(logits)
    loss = F.binary_cross_entropy_with_logits(logits, Yx, weight=Sx, reduction="none").sum(-1)
    r = (torch.sigmoid(logits) - Y) * S  # dloss/dlogit
    gW = torch.bmm(r, Xf)
    return loss, gW, r.sum(-1)


# --------------------------------------------------------------------------------------------------------
# The Triton kernel. Written as a plain function and compiled lazily (``_kernel``) so that this module
# imports without triton; ``tl`` is bound in the private globals the compiled copy is given. It calls only
# Triton builtins, none of triton.language's own @jit helpers (tl.zeros, tl.sum, tl.cdiv): those are
# decorated when triton.language is imported, so with them the interpreter would work only if
# TRITON_INTERPRET=1 was set before that import. Without them, setting it any time before the first call works.
# --------------------------------------------------------------------------------------------------------


def _add(a, b):
    return a + b


def _fused_logistic_kernel(
    X,  # [H, N, d] float16/bfloat16/float32, last dim contiguous
    W_HI,  # [H, P_PAD, d] scaled weights in X's dtype (float32 for float32 X), padded probes are 0
    W_LO,  # [H, P_PAD, d] rounding error of W_HI in X's dtype (unused for float32 X)
    INV_WSCALE,  # [H, P_PAD] float32: 1 / weight scale
    BIAS,  # [H, P] float32
    Y,  # [P, N] float32
    S,  # [P, N] float32
    RSCALE,  # [P_PAD] float32: scale applied to r before it is split (1 / RSCALE after the product)
    GW,  # [H, P, d] float32, zero on entry, atomically accumulated
    LOSS_PART,  # [H, n_tiles, P_PAD] float32 per-tile loss sums
    GB_PART,  # [H, n_tiles, P_PAD] float32 per-tile residual sums
    N,
    D,
    P,
    stride_xh,
    stride_xn,
    n_tiles,
    P_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_F32: tl.constexpr,  # float32 X: tf32x3 products of float32 operands
    SPLIT: tl.constexpr,  # 16-bit X: float32 operands as a two-term split (else rounded once)
    DOT_F32: tl.constexpr,  # upcast dot operands to float32 (the CPU interpreter cannot multiply bfloat16)
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    offs_p = tl.arange(0, P_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_D)
    mask_p = offs_p < P
    mask_n = offs_n < N
    x_rows = X + h.to(tl.int64) * stride_xh + offs_n[:, None].to(tl.int64) * stride_xn  # [BLOCK_N, 1]
    w_rows = (h * P_PAD + offs_p[:, None]).to(tl.int64) * D  # [P_PAD, 1]

    # 1. logits of every probe for this tile of rows: zT[p, n] = W[h, p] . X[h, n]
    acc = tl.full([P_PAD, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + offs_k
        mk = kk < D
        x = tl.load(x_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        xt = tl.trans(x)  # [BLOCK_D, BLOCK_N]
        w_hi = tl.load(W_HI + w_rows + kk[None, :], mask=mk[None, :], other=0.0)  # [P_PAD, BLOCK_D]
        if IS_F32:
            acc = tl.dot(w_hi, xt, acc, input_precision="tf32x3")
        else:
            if DOT_F32:
                xt = xt.to(tl.float32)
                w_hi = w_hi.to(tl.float32)
            acc = tl.dot(w_hi, xt, acc)
            if SPLIT:
                w_lo = tl.load(W_LO + w_rows + kk[None, :], mask=mk[None, :], other=0.0)
                if DOT_F32:
                    w_lo = w_lo.to(tl.float32)
                acc = tl.dot(w_lo, xt, acc)

    inv_ws = tl.load(INV_WSCALE + h * P_PAD + offs_p)
    bias = tl.load(BIAS + h * P + offs_p, mask=mask_p, other=0.0)
    z = acc * inv_ws[:, None] + bias[:, None]

    # 2. stable logistic loss and residual; masked rows/probes have S = 0 and contribute nothing
    m2 = mask_p[:, None] & mask_n[None, :]
    yn = offs_p[:, None].to(tl.int64) * N + offs_n[None, :]
    y = tl.load(Y + yn, mask=m2, other=0.0)
    s = tl.load(S + yn, mask=m2, other=0.0)
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    tiny = u == 1.0  # e below float32 resolution next to 1: log1p(e) = e
    log1p_e = tl.where(tiny, e, tl.log(u) * (e / tl.where(tiny, 1.0, u - 1.0)))  # log1p(e), accurate when small
    loss = (tl.maximum(z, 0.0) - z * y + log1p_e) * s
    r = (tl.where(z >= 0, 1.0 / u, e / u) - y) * s  # S * (sigmoid(z) - y)
    part = (h * n_tiles + pid_n) * P_PAD + offs_p
    tl.store(LOSS_PART + part, tl.reduce(loss, 1, _sum_combine))
    tl.store(GB_PART + part, tl.reduce(r, 1, _sum_combine))

    # 3. gW[h, :, dtile] += r^T X[h, rows, dtile], last d tile first (most likely still in L2)
    rscale = tl.load(RSCALE + offs_p)
    inv_rs = 1.0 / rscale
    if not IS_F32:
        rs = r * rscale[:, None]
        r_hi = rs.to(X.dtype.element_ty)
        r_lo = (rs - r_hi.to(tl.float32)).to(X.dtype.element_ty)
        if DOT_F32:
            r_hi = r_hi.to(tl.float32)
            r_lo = r_lo.to(tl.float32)
    g_rows = GW + (h * P + offs_p[:, None]).to(tl.int64) * D  # [P_PAD, 1]
    n_k = (D + BLOCK_D - 1) // BLOCK_D
    for i in range(0, n_k):
        kk = (n_k - 1 - i) * BLOCK_D + offs_k
        mk = kk < D
        x = tl.load(x_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if IS_F32:
            g = tl.dot(r, x, input_precision="tf32x3")
        else:
            if DOT_F32:
                x = x.to(tl.float32)
            g = tl.dot(r_hi, x)
            if SPLIT:
                g = tl.dot(r_lo, x, g)
            g = g * inv_rs[:, None]
        tl.atomic_add(g_rows + kk[None, :], g, mask=mask_p[:, None] & mk[None, :], sem="relaxed")


_KERNELS: dict[bool, object] = {}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read as Triton reads it)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton without knobs: the environment variable itself
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernel():
    """The compiled (or, under TRITON_INTERPRET=1, interpreted) kernel, built on first use for each mode."""
    interpret = _interpreting()
    if interpret not in _KERNELS:
        import triton
        import triton.language as tl

        src = _fused_logistic_kernel
        # private globals: the interpreter writes its helpers into the kernel's globals, keep them out of ours
        scope = {"tl": tl, "triton": triton, "__builtins__": builtins, "__name__": __name__}
        # the combine function tl.sum uses (the interpreter reduces it with numpy); our own where it is absent
        std_sum = getattr(tl.standard, "_sum_combine", None)
        scope["_sum_combine"] = std_sum if std_sum is not None else triton.jit(_private_copy(_add, scope))
        _KERNELS[interpret] = triton.jit(_private_copy(src, scope))
    return _KERNELS[interpret]


def _private_copy(src, scope: dict):
    """``src`` with ``scope`` as its globals."""
    fn = types.FunctionType(src.__code__, scope, src.__name__, src.__defaults__, src.__closure__)
    fn.__qualname__ = src.__qualname__
    fn.__module__ = src.__module__
    fn.__annotations__ = dict(src.__annotations__)
    fn.__doc__ = src.__doc__
    return fn


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_scale(amax: Tensor, target_exp: int = 14) -> Tensor:
    """Powers of two ``s`` with ``amax * s < 2**target_exp`` (1 where ``amax`` is 0): exact rescaling."""
    _, e = torch.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1, so amax < 2**e
    s = torch.ldexp(torch.ones_like(amax), (target_exp - e).to(torch.int32))
    return torch.where(amax > 0, s, torch.ones_like(amax))


def default_config(P: int, dtype: torch.dtype, interpret: bool) -> dict[str, int]:
    """Tile sizes and launch options for ``P`` probes (one group) of activations in ``dtype``."""
    p_pad = max(16, _next_pow2(min(P, P_GROUP)))
    if interpret:  # every program is a Python call: few, small tiles
        return {"block_n": 32, "block_d": 32, "num_warps": 4, "num_stages": 1}
    # the [P_PAD, BLOCK_N] float32 logits stay in registers: at most 8192 values (4096 for float32 X, whose
    # tiles are twice the bytes and whose products are split three ways)
    f32 = dtype == torch.float32
    block_n = max(32, min(128, (4096 if f32 else 8192) // p_pad))
    block_d = 16 if f32 else 64
    # sm_90, checked with ptxas (tests/test_kernel.py): these stay free of register spills
    return {"block_n": block_n, "block_d": block_d, "num_warps": 8 if p_pad * block_n >= 4096 else 4, "num_stages": 3}


def _check_inputs(X: Tensor, W: Tensor, b: Tensor, Y: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    if X.dim() != 3:
        raise AnalysisError(f"activations must be [H, N, d], got shape {list(X.shape)}")
    if X.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise AnalysisError(f"activations in {X.dtype} are not supported: store them as float16, bfloat16 or float32")
    H, N, d = X.shape
    if W.dim() != 3 or W.shape[0] != H or W.shape[2] != d:
        raise AnalysisError(f"weights must be [H={H}, P, d={d}], got shape {list(W.shape)}")
    P = W.shape[1]
    if tuple(b.shape) != (H, P):
        raise AnalysisError(f"biases must be [H={H}, P={P}], got shape {list(b.shape)}")
    out = []
    for name, t in (("targets", Y), ("sample weights", S)):
        if t.dim() == 1:
            t = t.expand(P, -1)
        if tuple(t.shape) != (P, N):
            raise AnalysisError(f"{name} must be [P={P}, N={N}] or [N={N}], got shape {list(t.shape)}")
        out.append(t.to(X.device, torch.float32).contiguous())
    for name, t in (("weights", W), ("biases", b)):
        if t.device != X.device:
            raise AnalysisError(f"{name} are on {t.device} but the activations on {X.device}: move them together")
    return out[0], out[1]


def loss_grad_triton(
    X: Float[Tensor, "H N d"],
    W: Float[Tensor, "H P d"],
    b: Float[Tensor, "H P"],
    Y: Float[Tensor, "P N"],
    S: Float[Tensor, "P N"],
    *,
    block_n: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split: bool = True,
) -> tuple[Float[Tensor, "H P"], Float[Tensor, "H P d"], Float[Tensor, "H P"]]:
    """The fused Triton kernel: same inputs, outputs and semantics as :func:`loss_grad_torch`.

    One launch per group of up to ``P_GROUP`` probes reads ``X`` once. The keyword options are for
    benchmarking: tile sizes overriding :func:`default_config` (powers of two, ``block_n``/``block_d`` >= 16),
    and ``split=False``, which multiplies 16-bit ``X`` by weights and residuals rounded once to its dtype (half
    the tensor-core work, ~1e-3 relative error: too coarse for the optimiser's stopping test).
    """
    if not _triton_available():
        raise ConfigError("backend 'triton' needs the triton package: pip install triton, or use backend='torch'")
    interpret = _interpreting()
    if X.device.type != "cuda" and not interpret:
        raise ConfigError(
            f"the triton kernel runs on CUDA devices, not {X.device.type}: move the activations to a GPU, "
            "set TRITON_INTERPRET=1 (Triton's slow CPU interpreter, for tests) or use backend='torch'"
        )
    for name, v in (("block_n", block_n), ("block_d", block_d)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ConfigError(f"{name}={v}: tile sizes must be powers of two >= 16 (e.g. 32, 64, 128)")
    Y, S = _check_inputs(X, W, b, Y, S)
    H, N, d = X.shape
    P = W.shape[1]
    dev = X.device
    f32 = torch.float32
    if X.stride(2) != 1:
        X = X.contiguous()
    W = W.to(f32)
    b = b.to(f32).contiguous()
    if X.numel() == 0 or P == 0:  # nothing to launch
        return loss_grad_torch(X, W, b, Y, S)
    loss = torch.empty(H, P, device=dev, dtype=f32)
    gW = torch.zeros(H, P, d, device=dev, dtype=f32)
    gb = torch.empty(H, P, device=dev, dtype=f32)
    is_f32 = X.dtype == f32
    kernel = _kernel()
    for p0 in range(0, P, P_GROUP):
        p1 = min(P, p0 + P_GROUP)
        Pg = p1 - p0
        cfg = default_config(Pg, X.dtype, interpret)
        bn = block_n or cfg["block_n"]
        bd = block_d or cfg["block_d"]
        p_pad = max(16, _next_pow2(Pg))
        n_tiles = -(-N // bn)
        Wg = W[:, p0:p1]
        Sg = S[p0:p1]
        if X.dtype == torch.float16:  # narrow exponent range: bring each probe's values near 2**14
            wscale = _pow2_scale(Wg.abs().amax(-1))  # [H, Pg]
            rscale = _pow2_scale(Sg.abs().amax(-1))  # [Pg]; |r| <= |S|
        else:
            wscale = torch.ones(H, Pg, device=dev, dtype=f32)
            rscale = torch.ones(Pg, device=dev, dtype=f32)
        w_pad = torch.zeros(H, p_pad, d, device=dev, dtype=f32)
        w_pad[:, :Pg] = Wg * wscale[..., None]
        inv_ws = torch.ones(H, p_pad, device=dev, dtype=f32)
        inv_ws[:, :Pg] = 1.0 / wscale
        rs_pad = torch.ones(p_pad, device=dev, dtype=f32)
        rs_pad[:Pg] = rscale
        if is_f32:
            w_hi = w_lo = w_pad
        else:
            w_hi = w_pad.to(X.dtype)
            w_lo = (w_pad - w_hi.float()).to(X.dtype) if split else w_hi
        gW_g = gW if Pg == P else torch.zeros(H, Pg, d, device=dev, dtype=f32)
        loss_part = torch.empty(H, n_tiles, p_pad, device=dev, dtype=f32)
        gb_part = torch.empty(H, n_tiles, p_pad, device=dev, dtype=f32)
        launch = dict(
            num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"], enable_fp_fusion=True
        )
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            kernel[(n_tiles, H)](
                X, w_hi, w_lo, inv_ws, b[:, p0:p1].contiguous(), Y[p0:p1], Sg, rs_pad, gW_g, loss_part, gb_part,
                N, d, Pg, X.stride(0), X.stride(1), n_tiles,
                P_PAD=p_pad, BLOCK_N=bn, BLOCK_D=bd, IS_F32=is_f32, SPLIT=bool(split) and not is_f32,
                DOT_F32=bool(interpret and X.dtype == torch.bfloat16),
                **launch,
            )  # fmt: skip
        if Pg != P:
            gW[:, p0:p1] = gW_g
        loss[:, p0:p1] = loss_part.sum(1)[:, :Pg]
        gb[:, p0:p1] = gb_part.sum(1)[:, :Pg]
    return loss, gW, gb


def get_loss_grad(backend: str = "auto", device: torch.device | str | None = None):
    """The ``loss_grad`` implementation for ``backend`` ("auto" | "torch" | "triton") on ``device``.

    ``"auto"`` is the Triton kernel on a CUDA device when triton is installed (and not in interpreter mode),
    the torch reference otherwise.
    ``"triton"`` insists on the kernel: it needs triton and a CUDA device, or Triton's CPU interpreter
    (``TRITON_INTERPRET=1``, slow, meant for tests). ``device=None`` means torch's default device.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: use 'auto', 'torch' or 'triton'")
    if backend == "torch":
        return loss_grad_torch
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if backend == "auto":  # never the interpreter: far too slow to be anyone's automatic choice
        use = dev.type == "cuda" and _triton_available() and not _interpreting()
        return loss_grad_triton if use else loss_grad_torch
    if not _triton_available():
        raise ConfigError("backend 'triton' needs the triton package: pip install triton, or use backend='torch'")
    if dev.type != "cuda" and not _interpreting():
        raise ConfigError(
            f"backend 'triton' runs on CUDA devices, not {dev.type}: use a GPU, set TRITON_INTERPRET=1 "
            "(Triton's slow CPU interpreter, for tests) or use backend='torch'"
        )
    return loss_grad_triton
