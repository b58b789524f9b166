"""Expert labels: ``"L08_E42"`` <-> ``(layer 8, expert 42)``."""

from __future__ import annotations

import re

_LAYER_EXPERT = re.compile(r"^L(\d+)_E(\d+)$")


def parse_layer_expert(label: str) -> tuple[int, int]:
    """``"L08_E42"`` -> ``(8, 42)``."""
    match = _LAYER_EXPERT.match(label.strip())
    if match is None:
        raise ValueError(f"expert label {label!r} is not of the form 'L<layer>_E<expert>', e.g. 'L08_E42'")
    return int(match.group(1)), int(match.group(2))


def layer_expert_label(layer: int, expert: int) -> str:
    """``(8, 42)`` -> ``"L08_E42"``."""
    return f"L{layer:02d}_E{expert:02d}"
