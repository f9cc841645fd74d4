"""The single-writer lock of a store: ``.lock``, held with ``flock`` on an open file.

Taking it is atomic across processes: ``flock(LOCK_EX | LOCK_NB)`` on the file lets exactly one open file
description hold it, and the kernel drops it when its holder exits however it exits (SIGKILL included), so
a lock left by a dead writer is free again with no pid guessing and no race between two processes that both
think it stale. Linux forwards ``flock`` to NFS servers as a byte-range lock, so it also holds across the
machines of a shared filesystem that supports locking; one that does not is refused with a clear error.

The holder writes its identity (pid, host, start time) into the file, for the message a second writer gets.
Releasing unlinks the file while still holding it; a process that locked an inode which is no longer the one
at ``.lock`` (it opened it just before the unlink) lets go and tries again, so two writers can never each
hold a different ``.lock``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from interp.errors import StoreError, StoreLockedError

LOCK = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class WriterLock:
    """``acquire()`` takes the lock or raises :class:`StoreLockedError` naming the holder; ``release()`` frees it."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        for _ in range(50):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise StoreLockedError(f"store is locked by {self.path} ({_describe(owner)}): another writer is"
                                       " using it; wait for it to finish (the lock frees itself when it exits)") from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_LOCKS:
                    raise StoreError(f"the filesystem holding {self.path.parent} does not support file locks"
                                     f" ({e.strerror}); write the store on a local disk") from None
                raise StoreError(f"cannot lock {self.path} ({e.strerror})") from None
            if not self._still_current(fd):  # the previous holder unlinked it as we opened it: start over
                os.close(fd)
                continue
            try:
                me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, me, 0)
                os.fsync(fd)
            except OSError as e:
                self._fd = fd
                self.release()
                raise StoreError(f"cannot write the lock {self.path} ({e.strerror}); check free space and permissions") from None
            self._fd = fd
            return
        raise StoreLockedError(f"could not take the lock {self.path}: it kept being replaced by other writers")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except IsADirectoryError:
            raise StoreError(f"{self.path} is a directory, not a lock file: remove it (no writer uses it) and rerun") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreError(f"{self.path} is a symbolic link, not a lock file: remove it and rerun") from None
            raise StoreError(
                f"cannot create the lock {self.path} ({e.strerror}); choose an --out directory you can write to"
            ) from None

    def _still_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._still_current(self._fd):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _read_owner(fd: int) -> dict[str, Any] | None:
    """The holder's identity, read defensively (at most 4 KiB of JSON; anything else is unknown)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "holder still starting up"
    pid, host, since = (str(owner.get(k, "?"))[:64] for k in ("pid", "host", "since"))
    return f"pid {pid} on {host} since {since}"
