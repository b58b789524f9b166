"""Test set-up: Triton through its CPU interpreter when there is no GPU, and one fresh random seed per session."""

import os
import random

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined: CI tests the real kernels through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SESSION_SEED = int(os.environ.get("MOE_FASTMASK_TEST_SEED", random.SystemRandom().randrange(1 << 30)))


def pytest_report_header(config):
    return f"moe_fastmask random seed: {SESSION_SEED} (set MOE_FASTMASK_TEST_SEED to replay)"


@pytest.fixture
def session_seed() -> int:
    """Fresh each run (printed in the header); fixed with MOE_FASTMASK_TEST_SEED to replay a failure."""
    return SESSION_SEED
