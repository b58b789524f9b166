"""The ``moe-fastmask`` command line: one parser, one subcommand per pipeline call, no logic of its own."""

from __future__ import annotations

import argparse
import sys


def _add_build_ext(subparsers) -> None:
    parser = subparsers.add_parser("build-ext", help="compile the C++ CPU kernel ahead of time (cached)")
    parser.set_defaults(func=_run_build_ext)


def _run_build_ext(args: argparse.Namespace) -> int:
    from moe_fastmask.ops import cpp_route

    print(cpp_route.build())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-fastmask", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_build_ext(subparsers)
    # Each pipeline module adds its own subcommand's arguments; the parser stays in one place.
    from moe_fastmask.pipeline import analyze

    analyze.add_cli_arguments(subparsers)
    from moe_fastmask.pipeline import train

    train.add_cli_arguments(subparsers)
    from moe_fastmask.pipeline import evaluate

    evaluate.add_cli_arguments(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
