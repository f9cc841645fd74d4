"""Test-only entry point for tests/test_distributed_capture.py: ``torchrun ... tests/distributed_worker.py capture ...``
runs the ``interp`` command in each rank, after two optional test hooks read from the environment:

- ``INTERP_TEST_KILL=RANK:N``: that rank SIGKILLs itself right after committing its N-th shard (a crash mid-capture,
  at a deterministic point);
- ``INTERP_TEST_LOG=PATH``: every rank appends ``RANK FIRST_EXAMPLE`` to PATH for each shard it commits;
- ``INTERP_TEST_EARLY_FLUSH=BYTES``: capture's ``EARLY_FLUSH_BYTES`` (commit the buffer during the last forward).
"""

import importlib
import os
import signal
import sys

from interp.cli import main
from interp.store.writer import StoreWriter

_commit = StoreWriter._commit
rank = int(os.environ.get("RANK", "0"))
kill = os.environ.get("INTERP_TEST_KILL")
kill_rank, kill_at = map(int, kill.split(":")) if kill else (-1, 0)
log = os.environ.get("INTERP_TEST_LOG")
done = [0]


def commit(self: StoreWriter, *args, **kwargs) -> None:
    first = self.example_offset + int(self.manifest["n_examples"])
    _commit(self, *args, **kwargs)
    done[0] += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{rank} {first}\n")
    if rank == kill_rank and done[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


StoreWriter._commit = commit
if "INTERP_TEST_EARLY_FLUSH" in os.environ:
    importlib.import_module("interp.capture").EARLY_FLUSH_BYTES = int(os.environ["INTERP_TEST_EARLY_FLUSH"])
sys.exit(main(sys.argv[1:]))
