"""Launchers of the Triton routing kernels (``moe_fastmask.kernels.route``)."""

from __future__ import annotations

import torch


def is_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``."""
    return False
