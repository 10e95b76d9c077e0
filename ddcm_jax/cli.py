"""The `ddcm` command line. Each subcommand parses its own options and returns an exit code.

Exit codes: 0 success, 1 an input failed (one line on stderr naming it), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from ddcm_jax import __version__
    from ddcm_jax.convert import add_arguments as add_convert_arguments

    parser = argparse.ArgumentParser(prog="ddcm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ddcm_jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = sub.add_parser(
        "convert",
        help="convert a PyTorch checkpoint into a MODEL_DIR",
        description="Convert a guided-diffusion checkpoint (no torch needed) into a MODEL_DIR.",
    )
    add_convert_arguments(convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from ddcm_jax.convert import run

        return run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
