"""What every benchmark here shares: medians, paired ratios, FLOP counts, the machine record."""

from __future__ import annotations

import os
import platform
import statistics
import time
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


def race(
    contenders: dict[str, Callable[[], Any]],
    warmup: int,
    repeats: int,
    before: dict[str, Callable[[], None]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Each contender ``repeats`` times, interleaved round by round (the order alternates),
    after ``warmup`` untimed rounds. ``before[name]`` runs untimed ahead of each call.

    Returns wall and CPU seconds per contender. Other processes on a shared machine add
    wall time when they deschedule ours, CPU time much less: where the two ratios
    disagree, the wall-time one is noise.
    """
    before = before or {}
    names = list(contenders)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for index in range(warmup + repeats):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            if name in before:
                before[name]()
            started, cpu_started = time.perf_counter(), time.process_time()
            contenders[name]()
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            if index >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
    return {"wall": wall, "cpu": cpu}
