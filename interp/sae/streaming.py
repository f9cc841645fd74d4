"""Streaming one hook of a store in batches, read ahead on a thread, and resolving an SAE's hook in a store."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from interp.errors import ConfigError, HookError, SAEError
from interp.store import ActivationStore
from torch import Tensor

if TYPE_CHECKING:
    from interp.sae.autoencoder import SAE


def _as_store(store: ActivationStore | str | os.PathLike) -> ActivationStore:
    return store if isinstance(store, ActivationStore) else ActivationStore(store)



def resolve_sae_hook(store: ActivationStore, sae: SAE, hook: str | int | None = None) -> str:
    """The store hook an SAE reads: ``hook`` if given, else the SAE's ``hook_name`` (aliases accepted), else
    the store's only hook; the SAE's ``d_in`` must match the store's width."""
    if hook is not None:
        name = store.resolve_hook(hook)
    elif sae.hook_name:
        try:
            name = store.resolve_hook(sae.hook_name)
        except HookError:
            raise HookError(
                f"the SAE reads hook {sae.hook_name!r}, which store {store.path} lacks (stored: "
                f"{', '.join(store.hooks[:6])}{', ...' if len(store.hooks) > 6 else ''}); pass hook=... (--hook)"
            ) from None
    elif len(store.hooks) == 1:
        name = store.hooks[0]
    else:
        raise HookError(f"the SAE names no hook and the store has {len(store.hooks)}; pass hook=... (--hook)")
    if sae.d_in != store.d_model:
        raise SAEError(
            f"SAE d_in={sae.d_in} does not match store hook {name} width {store.d_model}: use an SAE trained on"
            " this model and hook"
        )
    return name


_DONE = object()


def _prefetch(
    store: ActivationStore,
    hook: str,
    rows: Tensor | None,
    batch_size: int,
    progress: bool,
    desc: str,
    depth: int = 2,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(rows, activations)`` batches of one hook (all rows, or ``rows`` in that order), read by a background
    thread ``depth`` batches ahead, with a progress bar."""
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    order = torch.arange(len(store)) if rows is None else torch.as_tensor(rows, dtype=torch.int64).flatten()
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for start in range(0, order.numel(), batch_size):
                idx = order[start : start + batch_size]
                x = store.activations(hook, idx)
                item = (idx, x.pin_memory() if pin_memory else x)  # pinned: the copy to the GPU overlaps
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    total = int(order.numel())
    thread = threading.Thread(target=work, daemon=True, name="interp-prefetch")
    thread.start()
    bar = tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not progress, leave=False)
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            bar.update(int(item[0].numel()))
            yield item
    finally:
        stop.set()
        bar.close()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
