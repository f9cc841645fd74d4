"""The package's lazy public API: names that are also submodule names (``capture``) stay the public objects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_capture_is_the_function_after_submodules_import_it():
    """Issue 11: importing interp.detectors / steering / sae (which import interp.capture) made
    ``from interp import capture`` return the module."""
    proc = _run(
        """
        import sys, types
        import interp.detectors, interp.steering, interp.sae
        from interp import capture
        assert not isinstance(capture, types.ModuleType), capture
        assert capture is sys.modules["interp.capture"].capture
        import interp
        assert interp.capture is capture
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_every_lazy_name_that_is_a_submodule_name_stays_public_in_either_order():
    proc = _run(
        """
        import importlib, pkgutil, sys, types
        import interp
        subs = {m.name for m in pkgutil.iter_modules(interp.__path__)}
        clashes = sorted(set(interp._LAZY) & subs)
        assert "capture" in clashes, clashes
        for name in clashes:
            first = getattr(interp, name)            # the public object first ...
            importlib.import_module(f"interp.{name}")  # ... then the submodule (already loaded: a no-op)
            assert getattr(interp, name) is first and not isinstance(first, types.ModuleType), name
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    proc = _run(
        """
        import importlib, sys, types
        import interp
        importlib.import_module("interp.capture")  # the submodule first, by its full name
        from interp import capture
        assert callable(capture) and not isinstance(capture, types.ModuleType), capture
        assert capture is sys.modules["interp.capture"].capture
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
