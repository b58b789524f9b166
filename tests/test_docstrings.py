"""Every public function, class, method and property of the package says what it does."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import moe_fastmask

# autograd.Function's forward / backward follow torch's documented contract
_CONTRACT_METHODS = {"forward", "backward", "setup_context", "jvp", "vjp"}


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(moe_fastmask.__path__, prefix="moe_fastmask."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        if info.name.startswith("moe_fastmask.kernels") or info.name.endswith(".vllm"):
            continue  # the Triton kernels are documented at their launchers; vLLM is optional
        names.append(info.name)
    return names


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        is_autograd = issubclass(obj, __import__("torch").autograd.Function)
        for attr, member in vars(obj).items():
            if attr.startswith("_") or (is_autograd and attr in _CONTRACT_METHODS):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if not (inspect.isfunction(member) or isinstance(member, property)):
                continue
            # getdoc on the bound attribute inherits the base class's docstring for overrides
            if not inspect.getdoc(getattr(obj, attr)):
                missing.append(f"{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", _public_modules())
def test_public_api_has_docstrings(module_name):
    assert _undocumented(module_name) == [], f"undocumented public names in {module_name}"
