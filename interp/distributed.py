"""Process groups for data-parallel work: which rank this is, how ranks split a dataset, how they agree.

Everything here runs on the CPU-side ``gloo`` backend, whatever the ranks compute on: when the default group
is NCCL (a GPU job), a gloo group over the same ranks is made once and used for interp's few small messages
(plans, errors, "done"). Outside a process group every function is the single-process case: rank 0 of 1.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` starts the group from them when no group is running yet.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from interp.errors import ConfigError, RankFailedError

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_GLOO: dict[int, Any] = {}  # id of the default group -> the gloo group interp talks through


def env_world() -> tuple[int, int] | None:
    """``(rank, world)`` from torchrun's environment variables, or None when they are not set."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not integers;"
                          " launch with torchrun, which sets them") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun, which sets them")
    if world > 1 and not all(k in os.environ for k in _ENV):  # half a launch: never run as one silent process
        raise ConfigError("RANK/WORLD_SIZE are set without MASTER_ADDR/MASTER_PORT: launch with torchrun")
    return rank, world


def init_from_env(timeout_s: float = 24 * 3600) -> tuple[int, int]:
    """Start a gloo process group from torchrun's variables when they say there is more than one rank and no
    group runs yet; return ``(rank, world)``. Without those variables (a plain ``python``), ``(0, 1)``.

    ``timeout_s`` bounds how long a rank that finished its slice waits for the slowest one (torchrun ends the
    whole job at once when a rank dies, so a long wait costs nothing); a group a caller starts needs a timeout
    longer than that skew too (torch's default is 30 minutes)."""
    if dist.is_available() and dist.is_initialized():
        return rank_world()
    env = env_world()
    if env is None or env[1] == 1:
        return 0, 1
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process, or install a torch with it")
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)  # a group left running at exit can abort the process in gloo's threads
    return rank_world()


def shutdown() -> None:
    """End the process group, if one runs: every rank first meets the others (so that none tears its connections
    down while a peer still talks to it: gloo aborts a process whose peer vanishes mid-exchange), then destroys it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:  # bounded: a rank leaving on an error must not wait for peers that will never come
        dist.monitored_barrier(group=_group(), timeout=timedelta(seconds=60))
    except Exception:  # noqa: BLE001 - a peer that died or left already: nothing left to wait for
        pass
    dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running process group, or ``(0, 1)`` when none is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints, and commits shared results."""
    return rank_world()[0] == 0


def local_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` when torchrun launched this process and GPUs are visible, else None (the default)."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}")
    return None


def _group():
    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return default
    key = id(default)
    if key not in _GLOO:
        _GLOO[key] = dist.new_group(backend="gloo")
    return _GLOO[key]


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (JSON-like values)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=_group())
    return out


def agree(error: BaseException | None, what: str) -> None:
    """A step every rank takes together: each rank reports whether ``what`` failed on it; when any rank's did,
    every rank raises (the rank that failed re-raises its own error, the others a :class:`RankFailedError`
    naming the first rank that failed and its message), so no rank waits forever for one that gave up."""
    rank, _ = rank_world()
    msg = None if error is None else (str(error).splitlines()[0] if str(error) else type(error).__name__)
    failed = [(r, m) for r, m in enumerate(gather(msg)) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, m = failed[0]
    raise RankFailedError(f"{what} failed on rank {r}: {m}")


def split_range(start: int, stop: int, unit: int, world: int) -> list[tuple[int, int]]:
    """Each rank's slice ``[a, b)`` of items ``[start, stop)``: contiguous, disjoint, in rank order, covering the
    range, made of whole units of ``unit`` items counted from ``start`` (whole batches, so each batch is the one a
    single process would run), as even as whole units allow. A rank may get an empty slice."""
    if unit < 1 or world < 1:
        raise ConfigError(f"the unit and the world size must be positive, got {unit} and {world}")
    n_units = -(-max(stop - start, 0) // unit)
    out = []
    for r in range(world):
        lo = start + (r * n_units // world) * unit
        hi = start + ((r + 1) * n_units // world) * unit
        out.append((min(lo, stop), min(hi, stop)))
    return out
