"""The ``interp`` command: a thin layer over the Python API.

Each command group lives in its own module here with a ``register(subparsers)`` function; the heavy imports
happen inside the command functions, so ``interp --help`` is fast. Errors a user can act on
(:class:`interp.errors.InterpError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["capture", "store", "probe", "inlp", "steer", "sae", "detect", "lens", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description="Mechanistic interpretability on stored activations.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print interp's version and its key dependencies")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"interp.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"interp.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


class _Version(argparse.Action):
    """``interp --version``: this package and the versions that decide its numbers (read only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from interp import __version__
        from interp.model import versions

        print(f"interp {__version__} ({versions()})")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    from interp.errors import InterpError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InterpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
