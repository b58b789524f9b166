"""Loader and wrapper of the C++ CPU routing kernel (``csrc/``)."""

from __future__ import annotations


def is_available() -> bool:
    return False


def load_error() -> str:
    return "not built"
