"""What every benchmark here shares: medians, paired ratios, FLOP counts, the machine record."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median of per-round ratios ``num / den`` (rounds paired by index)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Median milliseconds per contender."""
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def step_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one call of ``step`` (torch's FlopCounterMode)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def machine() -> dict[str, Any]:
    """What the numbers were measured on (recorded beside them)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
