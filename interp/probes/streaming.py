"""Probe sweeps on stores larger than memory, and across the processes of a ``torch.distributed`` group.

:func:`interp.probes.train_probes` holds the selected rows of every hook in memory when they fit its memory
budget and there is one process. Otherwise it reads them through a :class:`StoreRows`: the rows of this process
(all of them, or under ``torch.distributed`` a contiguous slice: ``N`` ranks, ``N`` slices), held in memory when
the slice fits the budget, else read from the store in chunks of rows at every pass. The solver still runs
full-batch L-BFGS: each loss/gradient evaluation is one pass over the rows (chunk by chunk, partial sums added
up), and under ``torch.distributed`` the sums of all ranks are all-reduced, so every rank sees the same loss and
gradient, runs the same iterations and ends with the same probes as one process would (up to float32 rounding
of the summation order). The standardisation statistics are reduced the same way, the preconditioner's rows
(at most 4096, the same on every rank) are read by every rank, and the held-out scores are gathered, so the
metrics and the chosen probes are identical on every rank.

Only ``torch.distributed`` itself is used: the group is whatever the caller initialised (torchrun + the
``interp probe`` command initialise gloo from torchrun's environment variables); collectives run on CPU tensors
for gloo, on the tensors' own device otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from interp.distributed import rank_world, split_range
from interp.errors import ConfigError
from interp.probes.solver import linear_scores, shifted_moments, stats_from_moments
from interp.store import ActivationStore

MB = 2**20


def check_budget(max_memory_mb: float | None) -> float | None:
    """The memory budget in bytes (None: no limit); a ConfigError for 0, negative, NaN or non-numbers."""
    if max_memory_mb is None:
        return None
    try:
        v = float(max_memory_mb)
    except (TypeError, ValueError):
        raise ConfigError(f"max_memory_mb={max_memory_mb!r}: give a positive number of MiB, e.g. 4096") from None
    if not v > 0:
        raise ConfigError(f"max_memory_mb={max_memory_mb!r}: give a positive number of MiB, e.g. 4096")
    return v * MB if math.isfinite(v) else None


def _collective_tensor(t: Tensor) -> Tensor:
    import torch.distributed as dist

    return t.cpu() if dist.get_backend() == "gloo" else t


def all_reduce_sum(*tensors: Tensor) -> list[Tensor]:
    """The elementwise sums over all ranks of float32 ``tensors`` (one collective for all of them)."""
    import torch.distributed as dist

    flat = _collective_tensor(torch.cat([t.reshape(-1).float() for t in tensors]))
    dist.all_reduce(flat)
    flat = flat.to(tensors[0].device)
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos : pos + t.numel()].reshape(t.shape))
        pos += t.numel()
    return out


def chunk_rows(budget: float | None, H: int, d: int, itemsize: int, P: int) -> int:
    """Rows per chunk so that a chunk (store dtype, its float32 copy, the logits of ``P`` probes and their
    temporaries) takes at most half of ``budget`` bytes."""
    if budget is None:
        return 1 << 62
    per_row = H * d * (itemsize + 4) + 16 * H * P + d * itemsize
    return max(1, int(budget // 2 // per_row))


def _spans(rows: Tensor, span: int) -> list[tuple[int, int]]:
    """Split ascending store rows into runs ``[i, j)`` whose store rows lie within ``span`` of each other."""
    out, i, n = [], 0, rows.numel()
    r = rows.tolist()
    while i < n:
        j = i + 1
        while j < n and r[j] - r[i] < span:
            j += 1
        out.append((i, j))
        i = j
    return out


class StoreRows:
    """``[H, n, d]`` activations of ``hooks`` at this rank's rows of a row selection, read chunk by chunk.

    ``rows`` are all ``N`` selected store rows (ascending); this rank handles positions ``[lo, hi)`` of them
    (:func:`interp.distributed.split_range`). With ``hold``, that slice is read once and kept; otherwise each pass reads it again in
    chunks covering at most ``span`` store rows, with plain file reads (no memory maps). It stands in for the
    activation tensor in :func:`interp.probes.solver.fit_logistic` (``shape``, ``device``, ``dim()``, hook
    slicing), with :meth:`loss_grad` as the solver's ``loss_grad``.
    """

    def __init__(
        self,
        store: ActivationStore,
        hooks: list[str],
        rows: Tensor,
        lo: int,
        hi: int,
        device: torch.device,
        span: int,
        hold: bool,
        base_loss_grad,
        distributed: bool,
        _held: Tensor | None = None,
    ):
        self.store, self.hooks, self.rows, self.lo, self.hi = store, hooks, rows, lo, hi
        self.device, self.span, self.base, self.distributed = device, span, base_loss_grad, distributed
        self.local = rows[lo:hi]
        self._runs = _spans(self.local, span)
        self.dtype = store.dtype
        self._held = _held
        if hold and _held is None:
            self._held = self.read(self.local)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.hooks), self.hi - self.lo, self.store.d_model)

    def dim(self) -> int:
        return 3

    def __getitem__(self, sl: slice) -> StoreRows:
        """The same rows for the hooks ``sl`` (a slice), sharing what is held."""
        if not isinstance(sl, slice):
            raise TypeError("StoreRows takes a slice of hooks")
        held = None if self._held is None else self._held[sl]
        return StoreRows(self.store, self.hooks[sl], self.rows, self.lo, self.hi, self.device, self.span, False,
                         self.base, self.distributed, _held=held)

    def read(self, store_rows: Tensor) -> Float[Tensor, "H n d"]:
        """The activations of ascending ``store_rows``, read span by span (never more than ``span`` rows at once
        beyond the result)."""
        out = torch.empty(len(self.hooks), store_rows.numel(), self.store.d_model, dtype=self.dtype,
                          device=self.device)
        for i, j in _spans(store_rows, self.span):
            r0, r1 = int(store_rows[i]), int(store_rows[j - 1]) + 1
            for h, hook in enumerate(self.hooks):
                block = self.store.activation_range(hook, r0, r1)
                out[h, i:j] = (block if r1 - r0 == j - i else block[store_rows[i:j] - r0]).to(self.device)
        return out

    def chunks(self) -> Iterator[tuple[int, int, Tensor]]:
        """``(i, j, X[:, i:j])`` over this rank's rows (positions local to the slice)."""
        if self._held is not None:
            yield 0, self.hi - self.lo, self._held
            return
        for i, j in self._runs:
            yield i, j, self.read(self.local[i:j])

    def loss_grad(self, X: StoreRows, W: Tensor, b: Tensor, Y: Tensor, S: Tensor):
        """The solver's ``loss_grad`` over every chunk of ``X`` (a hook slice of this object), summed over the
        ranks."""
        loss = torch.zeros(W.shape[:2], device=W.device)
        gW = torch.zeros_like(W)
        gb = torch.zeros_like(loss)
        for i, j, Xc in X.chunks():
            lc, gWc, gbc = self.base(Xc, W, b, Y[:, i:j], S[:, i:j])
            loss += lc
            gW += gWc
            gb += gbc
        if self.distributed:
            loss, gW, gb = all_reduce_sum(loss, gW, gb)
        return loss, gW, gb

    def reduce(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the ranks (the solver's ``reduce``)."""
        return all_reduce_sum(t)[0] if self.distributed else t

    def column_stats(
        self, S: Float[Tensor, "M N"], constant_scale: float
    ) -> tuple[Float[Tensor, "H M d"], Float[Tensor, "H M d"]]:
        """:func:`~interp.probes.solver.column_stats` over all ``N`` rows (``S`` covers all of them): the
        shift from the first rows (read by every rank), the moment sums over the chunks, reduced over ranks."""
        H, _, d = self.shape
        S = S.to(self.device, torch.float32)
        first = self.read(self.rows[: min(self.rows.numel(), 1024)])
        shift = first.float().mean(1, keepdim=True)
        s1 = torch.zeros(H, S.shape[0], d, device=self.device)
        s2 = torch.zeros_like(s1)
        Sl = S[:, self.lo : self.hi]
        for i, j, Xc in self.chunks():
            shifted_moments(Xc, Sl[:, i:j], shift, s1, s2)
        if self.distributed:
            s1, s2 = all_reduce_sum(s1, s2)
        return stats_from_moments(s1, s2, S.sum(-1), shift, constant_scale)

    def scores(self, W: Float[Tensor, "H P d"], b: Float[Tensor, "H P"]) -> Float[Tensor, "H P N"]:
        """Logits of every probe at all ``N`` rows (this rank's chunks, gathered from every rank), on CPU."""
        parts = [linear_scores(Xc, W, b).cpu() for _, _, Xc in self.chunks()]
        local = torch.cat(parts, -1) if parts else torch.zeros(*W.shape[:2], 0)
        if not self.distributed:
            return local
        import torch.distributed as dist

        rank, world = rank_world()
        n = self.rows.numel()
        sizes = [b - a for a, b in split_range(0, n, 1, world)]
        pad = _collective_tensor(torch.zeros(*local.shape[:2], max(sizes), device=W.device))
        pad[..., : local.shape[-1]] = local.to(pad.device)
        bufs = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(bufs, pad)
        return torch.cat([bufs[r][..., : sizes[r]] for r in range(world)], -1).cpu()
