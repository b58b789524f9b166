"""The ``moe-fastmask`` command line: one style for every subcommand, a fast ``--help``, the old spellings."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from moe_fastmask.cli import build_parser
from moe_fastmask.pipeline.cli_args import SUBCOMMANDS, add_dataclass_arguments, dataclass_from_args


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys, contextlib, io\n"
        "from moe_fastmask.cli import build_parser, main\n"
        "build_parser()\n"
        "for argv in (['--help'], ['analyze', '--help'], ['train', '--help'], ['evaluate', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as exit_:\n"
        "            assert exit_.code == 0, argv\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "heavy: []"


def test_top_level_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("analyze", "train", "evaluate", "build-ext"):
        assert name in text
    assert "moe-fastmask analyze --demo --out" in text
    assert "pipeline module" not in text and "no logic of its own" not in text


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_flag_is_described_hyphenated_with_its_default(name, capsys):
    parser = _subparser(name)
    settings = SUBCOMMANDS[name].settings_type()
    visible = [a for a in parser._actions if a.help != argparse.SUPPRESS and a.option_strings]
    for action in visible:
        assert action.help and action.help.strip(), action.option_strings
        for flag in action.option_strings:
            assert "_" not in flag, flag  # one spelling in --help: hyphens
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(settings):
        if field.metadata.get("cli", True) is False:
            continue
        if "_" in field.name:
            assert f"--{field.name} " not in text  # the old spelling parses but is not shown
        if field.metadata.get("required"):
            assert f"--{field.name.replace('_', '-')} {field.name.upper()} {field.metadata['help']} (required)" in text
            continue
        default = field.default
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and default != "" and \
                "default" not in field.metadata["help"].lower():  # fmt: skip
            assert f"(default: {default!r})" in text or f"(default: {default})" in text, field.name


def test_negated_flags_have_their_own_text(capsys):
    for name, flag, words in (("train", "--no-routing-stats", "do not count routing"),
                              ("evaluate", "--no-steering", "leave out the steering column"),
                              ("analyze", "--no-token-experts", "do not keep each token"),
                              ("analyze", "--quiet", "only errors and warnings")):  # fmt: skip
        action = next(a for a in _subparser(name)._actions if flag in a.option_strings)
        assert words in action.help, (flag, action.help)


def test_old_and_new_spellings_give_the_same_settings():
    parser = build_parser()
    pairs = [
        (["train", "--model_name", "m", "--sft", "s", "--out", "o", "--no_routing_stats", "--per_layer", "4",
          "--gradient_checkpointing", "--max_steps", "3"],
         ["train", "--model", "m", "--sft", "s", "--out", "o", "--no-routing-stats", "--per-layer", "4",
          "--gradient-checkpointing", "--max-steps", "3"]),
        (["evaluate", "--data", "d", "--base_model", "b", "--no_steering", "--max_new_tokens", "9"],
         ["evaluate", "--data", "d", "--base-model", "b", "--no-steering", "--max-new-tokens", "9"]),
        (["analyze", "--demo", "--out", "o", "--batch_size", "8", "--safe_ratio", "0.5", "--max_new_tokens", "4"],
         ["analyze", "--demo", "--out", "o", "--batch-size", "8", "--safe-ratio", "0.5", "--max-new-tokens", "4"]),
        (["analyze", "--model_name", "m", "--data", "d", "--out", "o"], ["analyze", "--model", "m", "--data", "d",
                                                                        "--out", "o"]),
        (["evaluate", "--data", "d", "--model_name_or_path", "m"], ["evaluate", "--data", "d", "--model", "m"]),
    ]  # fmt: skip
    for old, new in pairs:
        settings = SUBCOMMANDS[old[0]].settings_type()
        a, b = parser.parse_args(old), parser.parse_args(new)
        assert dataclasses.asdict(dataclass_from_args(settings, a)) == dataclasses.asdict(dataclass_from_args(settings, b))
    train = dataclass_from_args(SUBCOMMANDS["train"].settings_type(), parser.parse_args(pairs[0][1]))
    assert (train.routing_stats, train.per_layer, train.gradient_checkpointing) == (False, 4, True)
    evaluate = dataclass_from_args(SUBCOMMANDS["evaluate"].settings_type(), parser.parse_args(pairs[1][1]))
    assert (evaluate.steering, evaluate.base_model) == (False, "b")


def test_required_flag_by_its_old_spelling_counts(capsys):
    from moe_fastmask.pipeline.cli_args import check_required

    args = build_parser().parse_args(["train", "--model_name_or_path", "m", "--sft", "s", "--out", "o"])
    check_required(args)  # --model given by an alias: no error
    args = build_parser().parse_args(["train", "--sft", "s", "--out", "o"])
    with pytest.raises(SystemExit) as info:
        check_required(args)
    assert info.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_builder_refuses_an_undescribed_field():
    @dataclasses.dataclass
    class Settings:
        described: int = dataclasses.field(default=1, metadata={"help": "a described flag"})
        silent: int = 2

    with pytest.raises(TypeError, match="Settings.silent: every flag needs a help text"):
        add_dataclass_arguments(argparse.ArgumentParser(), Settings)


def test_the_op_is_registered_whichever_is_imported_first():
    code = (
        "import sys, moe_fastmask\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "x = torch.randn(4, 6)\n"
        "weights, ids = torch.ops.moe_fastmask.route(x, 2, None, None, None, False, 'torch')\n"
        "assert torch.equal(ids, torch.sort(x, dim=1, descending=True, stable=True).indices[:, :2])\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_sigterm_unwinds_like_ctrl_c():
    """The command turns SIGTERM (timeout, Slurm, docker stop) into an exit that runs finally blocks and exit
    handlers, so engine processes and partial files are cleaned up; exit status 128 + 15."""
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from moe_fastmask.cli import _exit_on_sigterm\n"
        "_exit_on_sigterm()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "finally:\n"
        "    print('cleaned up', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stdout.strip() == "cleaned up"


def _run_command_body(body: str) -> subprocess.CompletedProcess:
    """``moe-fastmask analyze --demo`` in a fresh process, its work replaced by ``body`` (a function of args)."""
    code = (
        "import os, signal, sys, time\n"
        "from moe_fastmask import cli\n"
        f"{body}\n"
        "cli.check_required = lambda args: setattr(args, 'func', work)\n"
        "sys.exit(cli.main(['analyze', '--demo', '--out', 'unused']))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_sigterm_during_a_command_says_how_to_resume():
    """SIGTERM during a command ends it as Ctrl-C does, with the same hint, and exit status 143."""
    done = _run_command_body("def work(args):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)")
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == [
        "moe-fastmask analyze: terminated; the finished batches are saved; rerun the same command to resume"
    ], done.stderr


def test_a_refused_write_is_one_line():
    """The file system refusing a write (a read-only or special --out) ends the command with one line naming the
    path, exit status 1, no traceback."""
    done = _run_command_body("def work(args):\n    raise OSError(30, 'Read-only file system', '/ro/out/stats.csv')")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "moe-fastmask analyze: error: [Errno 30] Read-only file system: '/ro/out/stats.csv'"
    ], done.stderr


def test_version_and_python_dash_m():
    from importlib.metadata import version

    for argv in (["-m", "moe_fastmask", "--version"], ["-m", "moe_fastmask.cli", "--version"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"moe-fastmask {version('moe_fastmask')}"
    done = subprocess.run([sys.executable, "-m", "moe_fastmask", "analyze", "--out", "o"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "give --model and --data, or --demo" in done.stderr


def test_ctrl_c_ends_in_one_line_saying_how_to_resume(monkeypatch, capsys):
    from moe_fastmask import cli
    from moe_fastmask.pipeline import analyze

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze, "run_cli", interrupted)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.choices["analyze"].set_defaults(func=interrupted)
    assert cli.main(["analyze", "--demo", "--out", "o"]) == 130
    err = capsys.readouterr().err
    assert "moe-fastmask analyze: interrupted; the finished batches are saved; rerun the same command" in err
    assert "Traceback" not in err


def test_the_packages_warnings_are_one_line_on_the_command_line(tmp_path):
    """A warning from inside the package prints as one ``moe-fastmask CMD: warning:`` line (in a fresh process:
    pytest records warnings instead of printing them); the formatter is restored when ``main`` returns."""
    code = (
        "import sys, warnings\n"
        "from moe_fastmask import cli\n"
        "from moe_fastmask.pipeline.artifacts import RunStore\n"
        f"store = RunStore({str(tmp_path)!r}, 'slug')\n"
        "store.batch_dir.mkdir()\n"
        "store.batch_path(0).write_bytes(b'')\n"
        "parser = cli.build_parser()\n"
        "cli.build_parser = lambda: parser\n"
        "sub = next(a for a in parser._actions if hasattr(a, 'choices') and isinstance(a.choices, dict))\n"
        "sub.choices['train'].set_defaults(func=lambda args: 0 if store.load_batches([0]) == {} else 1)\n"
        "before = warnings.formatwarning\n"
        "code = cli.main(['train', '--model', 'm', '--sft', 's', '--out', 'o'])\n"
        "assert warnings.formatwarning is before\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"moe-fastmask train: warning: {tmp_path}/batches_slug/batch_00000.pkl cannot be "
                                  "read (EOFError")  # fmt: skip
    assert done.stderr.count("\n") == 1 and "UserWarning" not in done.stderr


def test_build_ext_failure_is_one_line(monkeypatch, capsys):
    from moe_fastmask import cli
    from moe_fastmask.ops import cpp_route

    def failing():
        raise RuntimeError("building the C++ routing kernel failed: Error building extension 'moe_fastmask_C'\nninja")

    monkeypatch.setattr(cpp_route, "build", failing)
    assert cli.main(["build-ext"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moe-fastmask build-ext: error: building the C++ routing kernel failed: Error building extension "
                   "'moe_fastmask_C' (route falls back to the PyTorch reference on CPU)"]


def test_quiet_runs_hide_the_bars_of_transformers_too(tmp_path):
    """--quiet / --no-progress leave stderr free of transformers' own bars (loading weights, writing shards) as
    well as ours, through the whole pipeline; without them the bars show."""
    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "moe_fastmask", *argv], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    bars = ("Loading weights", "Writing model shards", "it/s]")
    common = ["--batch-size", "4", "--num-batches", "1", "--max-new-tokens", "2"]
    loud = run("analyze", "--demo", "--out", str(tmp_path / "loud"), *common)
    assert any(bar in loud for bar in bars), loud[-2000:]

    analysis = tmp_path / "quiet"
    for flag in ("--quiet", "--no-progress"):
        err = run("analyze", "--demo", "--out", str(analysis), *common, flag)  # the second run resumes the first
        assert not any(bar in err for bar in bars), (flag, err[-2000:])
    model = analysis / "demo" / "model"
    assert model.is_dir(), sorted(p.name for p in analysis.iterdir())
    err = run("train", "--model", str(model), "--sft", str(analysis), "--out", str(tmp_path / "run"), "--top-n", "2",
              "--allow-unmasked", "--max-steps", "1", "--batch-size", "4", "--device", "cpu", "--no-progress")
    assert not any(bar in err for bar in bars), err[-2000:]
    err = run("evaluate", "--model", str(tmp_path / "run" / "final_model"), "--data", str(analysis / "demo" / "data.json"),
              "--limit", "1", "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "ev"),
              "--no-progress")
    assert not any(bar in err for bar in bars), err[-2000:]
