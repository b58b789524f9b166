"""The ``moe-fastmask`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings

from moe_fastmask.pipeline.cli_args import SUBCOMMANDS, HelpFormatter, add_subcommand, check_required

DESCRIPTION = """\
Find and repair the experts of a Mixture-of-Experts model that jailbreak prompts lean on.

  1. analyze   run plain and jailbreak prompts, rank the experts by how much more they fire on jailbreaks
  2. train     fine-tune only the top-ranked experts, with jailbreak prompts routed to them alone
  3. evaluate  compare refusal rates before and after the repair (and with the experts switched off)

Start with a tiny demo that needs no model or data:  moe-fastmask analyze --demo --out demo_run
Each subcommand's options:  moe-fastmask SUBCOMMAND --help
"""


def _add_build_ext(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-ext", help="compile the C++ CPU kernel ahead of time (otherwise it compiles on first use; cached)",
        description="Compile the C++ CPU routing kernel now and print where it was cached.",
    )
    parser.set_defaults(func=_run_build_ext)


def _run_build_ext(args: argparse.Namespace) -> int:
    from moe_fastmask.ops import cpp_route

    try:
        print(cpp_route.build())
    except RuntimeError as error:  # the compiler's own output is above; one line says what it means
        first = next((line for line in str(error).splitlines() if line.strip()), "failed")
        print(f"moe-fastmask build-ext: error: {first} (route falls back to the PyTorch reference on CPU)",
              file=sys.stderr)
        return 1
    return 0


# what a rerun after an interruption does, by subcommand
_AFTER_INTERRUPT = {
    "analyze": "the finished batches are saved; rerun the same command to resume",
    "train": "rerun the same command with --resume to continue from the last checkpoint",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe_fastmask")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The whole parser; building it imports neither torch nor transformers (they load when a subcommand runs)."""
    parser = argparse.ArgumentParser(prog="moe-fastmask", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name in SUBCOMMANDS:
        add_subcommand(subparsers, name)
    _add_build_ext(subparsers)
    return parser


class Terminated(SystemExit):
    """SIGTERM, as :func:`_exit_on_sigterm` raises it: a ``SystemExit`` with status 128 + the signal's number."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(128 + signum)


def _exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, Slurm, ``docker stop``) ends the command as Ctrl-C does: ``finally`` blocks and exit
    handlers run, so an engine process (vLLM) is shut down and partial files are cleaned up, not orphaned. A
    handler set by the embedding program is kept."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)


def _one_line_warnings(command: str):
    """The package's own warnings as ``moe-fastmask CMD: warning: ...`` lines, without Python's file, line and
    source line (which point into the package, not at anything the user wrote); other packages' keep their form."""
    import os

    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package_dir):
            return f"moe-fastmask {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    return default


def main(argv: list[str] | None = None) -> int:
    """The ``moe-fastmask`` command: parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit
    status."""
    args = build_parser().parse_args(argv)
    check_required(args)
    _exit_on_sigterm()
    previous_format = _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, Terminated) as stop:
        hint = _AFTER_INTERRUPT.get(args.command)
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"\nmoe-fastmask {args.command}: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return stop.code if isinstance(stop, Terminated) else 130
    except OSError as error:
        # the file system refusing a write (a read-only or special --out, a full disk): one line, not a traceback
        print(f"moe-fastmask {args.command}: error: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        # a missing package (an optional one such as wandb for --report-to, or a broken install): one line
        if error.name is None or error.name.split(".")[0] == "moe_fastmask":
            raise
        print(f"moe-fastmask {args.command}: error: the package {error.name!r} is not installed "
              f"(pip install {error.name.split('.')[0]})", file=sys.stderr)  # fmt: skip
        return 2
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
