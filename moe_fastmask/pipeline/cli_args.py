"""Subcommands whose flags are a settings dataclass's fields: one style for ``analyze``, ``train`` and ``evaluate``.

Each field ``foo_bar`` becomes ``--foo-bar``; the underscore spelling ``--foo_bar`` (and any ``aliases`` in the
field's metadata) still parse but are left out of ``--help``. A field's metadata gives its ``help`` (required: every
flag is described), and optionally ``choices``, ``nargs``/``const``, ``group`` (the help section), ``metavar``,
``aliases`` and, for a flag that is on by default, ``negative`` (the spelling that turns it off; default
``--no-foo-bar``) with ``negative_help``. ``--help`` shows every default. Fields with ``metadata={"cli": False}``
are not flags.

Built with ``argparse`` alone, from the annotations as written: building the parser imports neither torch nor
transformers, so ``moe-fastmask --help`` is immediate.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, TypeVar

T = TypeVar("T")

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs and widens the option column a little."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _field_type(field: dataclasses.Field) -> type:
    """The value type from the annotation text (``int``, ``str | None``, ...; ``None`` means "not given")."""
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    parts = [part.strip() for part in text.replace("Optional[", "").rstrip("]").split("|")]
    names = [part for part in parts if part != "None"]
    if len(names) != 1 or names[0] not in _TYPES:
        raise TypeError(f"field {field.name!r}: no command-line type for annotation {text!r}")
    return _TYPES[names[0]]


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _with_default(help_text: str, default) -> str:
    """The help text followed by ``(default: X)``, unless the text already says what the default is."""
    if default is None or "default" in help_text.lower():
        return help_text
    shown = repr(default) if isinstance(default, str) and (not default or " " in default) else default
    return f"{help_text} (default: {shown})"


def _hidden(group, flags: list[str], **kwargs) -> None:
    if flags:
        group.add_argument(*flags, help=argparse.SUPPRESS, **kwargs)


def add_dataclass_arguments(parser: argparse.ArgumentParser, arguments_type: type) -> argparse.ArgumentParser:
    """Add a flag per field of ``arguments_type`` to ``parser`` (see the module docstring for the rules)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    required: list[tuple[str, str]] = []
    for field in dataclasses.fields(arguments_type):
        meta = dict(field.metadata)
        if meta.get("cli", True) is False:
            continue
        if "help" not in meta:
            raise TypeError(f"{arguments_type.__name__}.{field.name}: every flag needs a help text")
        title = meta.get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        flag = "--" + field.name.replace("_", "-")
        old = [f"--{field.name}"] if "_" in field.name else []
        aliases = [a for a in meta.get("aliases", []) if a != flag]
        kind = _field_type(field)
        default = _default(field)
        if kind is bool:
            if default is True:
                negative = meta.get("negative", "--no-" + field.name.replace("_", "-"))
                target.add_argument(negative, dest=field.name, action="store_false",
                                    help=meta.get("negative_help", f"turn off: {meta['help']}"))
                hidden = [f"--no_{field.name}"] if f"--no_{field.name}" != negative else []
                _hidden(target, hidden + meta.get("negative_aliases", []), dest=field.name, action="store_false")
                _hidden(target, [flag, *old], dest=field.name, action="store_true")  # the positive form: a no-op
            else:
                target.add_argument(flag, dest=field.name, action="store_true", help=meta["help"])
                _hidden(target, old + aliases, dest=field.name, action="store_true")
            parser.set_defaults(**{field.name: bool(default)})
            continue
        kwargs = {"dest": field.name, "type": kind}
        for key in ("choices", "nargs", "const", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        if default is dataclasses.MISSING or meta.get("required"):  # checked after parsing, whichever spelling
            required.append((field.name, flag))
            target.add_argument(flag, default=None, help=f"{meta['help']} (required)", **kwargs)
            _hidden(target, old + aliases, default=None, **kwargs)
            continue
        target.add_argument(flag, default=default, help=_with_default(meta["help"], default), **kwargs)
        _hidden(target, old + aliases, default=default, **kwargs)
    parser.set_defaults(_required=tuple(required), _parser=parser)
    return parser


def check_required(args: argparse.Namespace) -> None:
    """Exit with argparse's usage error (status 2) when a required flag of the subcommand was not given."""
    missing = [flag for name, flag in getattr(args, "_required", ()) if getattr(args, name, None) is None]
    if missing:
        args._parser.error(f"the following arguments are required: {', '.join(missing)}")


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """A pipeline subcommand: its settings dataclass and its runner (``"module:attribute"``, imported only when
    needed: the settings modules are light, the runners import torch)."""

    settings: str
    runner: str
    help: str
    description: str

    def settings_type(self) -> type:
        """The subcommand's settings dataclass (imported on first use)."""
        return _load(self.settings)

    def run(self, args: argparse.Namespace) -> int:
        """Run the subcommand on parsed arguments; returns the exit status."""
        return _load(self.runner)(args)


def _load(target: str):
    import importlib

    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


SUBCOMMANDS = {
    "analyze": Subcommand(
        settings="moe_fastmask.pipeline.analysis_config:AnalysisConfig",
        runner="moe_fastmask.pipeline.analyze:run_cli",
        help="find the experts that fire more on jailbreak prompts than on the plain goals",
        description=(
            "Generate answers to each record's plain goal and its jailbreak in mixed batches, count which experts "
            "each token routes to, and rank the experts by how much more often they fire on jailbreaks (risk "
            "difference).\n\nWrites to --out: risk_diff_<slug>.pkl/.csv (the ranking), sft_dataset_<slug>.pkl (the "
            "training set of 'train'), split_<slug>.json (records held out for 'evaluate'), batch_outputs_<slug>.pkl, "
            "plots and the run settings. Re-running the same command resumes an interrupted run.\n\n"
            "Try it without a model or data: moe-fastmask analyze --demo --out DIR"
        ),
    ),
    "train": Subcommand(
        settings="moe_fastmask.pipeline.train.arguments:MaskedFinetuneArguments",
        runner="moe_fastmask.pipeline.train:run_cli",
        help="fine-tune only the selected (unsafe) experts, with jailbreak prompts routed to them alone",
        description=(
            "Masked fine-tuning on the output of 'analyze': select the experts with the highest risk difference, "
            "then train only those experts on the SFT set while jailbreak prompts may route only to them (the mask) "
            "and safe prompts route freely.\n\nWrites to --out: final_model/ (a plain checkpoint that loads with "
            "from_pretrained), expert_selection.json, training_config.json and checkpoints/ (--resume continues "
            "from them)."
        ),
    ),
    "evaluate": Subcommand(
        settings="moe_fastmask.pipeline.evaluate:EvaluationArguments",
        runner="moe_fastmask.pipeline.evaluate:run_cli",
        help="refusal and attack success rates before and after the repair, and with steering",
        description=(
            "Answer the held-out records with the model before the repair, with the selected experts switched off "
            "(steering), and after the repair; judge each answer for refusal and report refusal and attack success "
            "rates (attack success = 1 - refusal rate).\n\nWrites evaluation.json, evaluation.md and the answers "
            "to --out."
        ),
    ),
}


def add_subcommand(subparsers, name: str) -> argparse.ArgumentParser:
    """Add the pipeline subcommand ``name`` (a key of :data:`SUBCOMMANDS`) to ``subparsers``."""
    spec = SUBCOMMANDS[name]
    return add_dataclass_subcommand(
        subparsers, name, spec.settings_type(), help=spec.help, description=spec.description, func=spec.run
    )


def add_dataclass_subcommand(
    subparsers, name: str, arguments_type: type, *, help: str, description: str, func: Callable
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose flags come from the dataclass ``arguments_type``; ``func(args)`` runs it."""
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    add_dataclass_arguments(parser, arguments_type)
    parser.set_defaults(func=func)
    return parser


def dataclass_from_args(arguments_type: type[T], args: argparse.Namespace) -> T:
    """Build ``arguments_type`` from the parsed flags (extra attributes such as ``func`` are ignored)."""
    names = {f.name for f in dataclasses.fields(arguments_type) if f.metadata.get("cli", True) is not False}
    return arguments_type(**{name: getattr(args, name) for name in names if hasattr(args, name)})
