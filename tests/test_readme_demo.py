"""The README's demo commands, read from README.md, run as written end to end on the CPU."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "a test runs exactly them"


def readme_demo_commands() -> list[str]:
    """The commands of the first ``bash`` block after the sentence that promises they run as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    at = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[at:], flags=re.S)
    assert block is not None, "no bash block after the demo sentence"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_readme_demo_block_is_the_three_steps():
    commands = readme_demo_commands()
    assert [shlex.split(c)[:2] for c in commands] == [["moe-fastmask", "analyze"], ["moe-fastmask", "train"],
                                                      ["moe-fastmask", "evaluate"]]  # fmt: skip


@pytest.mark.slow
def test_readme_demo_commands_run_as_written(tmp_path):
    script = Path(sys.executable).parent / "moe-fastmask"  # the installed console script, as a user types it
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "moe_fastmask.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for command in readme_demo_commands():
        argv = shlex.split(command)
        assert argv[0] == "moe-fastmask"
        done = subprocess.run([*prefix, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # what the README says each step leaves behind
    run = tmp_path / "demo_run"
    assert list(run.glob("risk_diff_*.csv")) and list(run.glob("sft_dataset_*.pkl")) and list(run.glob("split_*.json"))
    final = run / "train" / "final_model"
    assert (final / "config.json").is_file() and (run / "train" / "expert_selection.json").is_file()
    evaluation = json.loads((run / "train" / "evaluation" / "evaluation.json").read_text())
    assert set(evaluation["results"]) == {"before", "steering", "after"}
    assert evaluation["settings"]["model"] == "demo_run/train/final_model"
