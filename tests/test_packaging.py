"""Packaging: the Triton folder ships as ``moe_fastmask.kernels`` and never shadows Hugging Face's ``kernels``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    # ``python -c`` from the repository root puts the root on sys.path, where the ``kernels/`` folder lives
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_transformers_and_olmoe_import_cleanly_from_repo_root():
    result = run_python(
        "import transformers\n"
        "from transformers import OlmoeConfig, OlmoeForCausalLM\n"
        "from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_kernel_modules_load_only_inside_the_package():
    result = run_python(
        "import importlib\n"
        "try:\n"
        "    importlib.import_module('kernels.route')\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
        "import moe_fastmask.kernels.route as r\n"
        "print(r.__name__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "refused: moe_fastmask's Triton kernels are importable only" in result.stdout
    assert "moe_fastmask.kernels.route" in result.stdout


def test_top_level_kernels_exports_nothing():
    result = run_python("import kernels\nprint(getattr(kernels, '__file__', 'x'), kernels.__all__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None []"


def test_setup_ships_every_subpackage_and_the_mapped_folders(monkeypatch):
    import runpy

    import setuptools

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "moe_fastmask").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    shipped = set(captured["packages"])
    assert on_disk <= shipped, f"packages missing from setup.py: {sorted(on_disk - shipped)}"
    assert {"moe_fastmask.kernels", "moe_fastmask.csrc"} <= shipped
    # every kernel source in csrc/ (the .cu files include the shared .cuh header) ships with the package
    patterns = captured["package_data"]["moe_fastmask.csrc"]
    sources = [path for path in (REPO / "csrc").iterdir() if path.is_file()]
    assert any(path.suffix == ".cuh" for path in sources)
    unshipped = [path.name for path in sources if not any(path.match(pattern) for pattern in patterns)]
    assert unshipped == [], f"csrc files outside setup.py's package_data: {unshipped}"
    assert captured["package_dir"]["moe_fastmask.kernels"] == "kernels"
