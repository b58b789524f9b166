"""Subcommands whose flags are a dataclass's fields (``HfArgumentParser``), shared by ``train`` and ``evaluate``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, TypeVar

T = TypeVar("T")


def add_dataclass_subcommand(
    subparsers, name: str, arguments_type: type, *, help: str, description: str, func: Callable
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose flags come from the dataclass ``arguments_type``; ``func(args)`` runs it."""
    from transformers import HfArgumentParser

    template = HfArgumentParser(arguments_type, add_help=False)
    parser = subparsers.add_parser(name, parents=[template], help=help, description=description)
    parser.set_defaults(func=func)
    return parser


def dataclass_from_args(arguments_type: type[T], args: argparse.Namespace) -> T:
    """Build ``arguments_type`` from the parsed flags (extra attributes such as ``func`` are ignored)."""
    names = {f.name for f in dataclasses.fields(arguments_type)}
    return arguments_type(**{name: getattr(args, name) for name in names if hasattr(args, name)})
