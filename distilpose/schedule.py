"""The learning-rate schedule of the official recipes (mmcv's linear warm-up + step policy):
a linear warm-up from WARMUP_START x lr, then x0.1 at each milestone."""

from __future__ import annotations

from collections.abc import Callable, Sequence

WARMUP_START = 0.001  # warm-up starts at 0.001 x lr (mmcv linear warm-up ratio)


def warmup_step_factor(ramp: float, milestones_passed: int) -> float:
    """Multiplier of the base lr: `ramp` is the warm-up done (0 -> 1, clipped at 1)."""
    ramp = min(1.0, ramp)
    return 0.1**milestones_passed * (WARMUP_START + (1 - WARMUP_START) * ramp)


def step_schedule(warmup_iters: int, milestones: Sequence[int]) -> Callable[[int], float]:
    """Per-iteration multiplier for LambdaLR: warm-up over `warmup_iters` iterations (0: none),
    x0.1 at each milestone iteration."""

    def factor(step: int) -> float:
        ramp = step / warmup_iters if warmup_iters else 1.0
        return warmup_step_factor(ramp, sum(step >= m for m in milestones))

    return factor
