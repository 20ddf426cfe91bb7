"""The learning-rate schedule of the official recipes (mmcv's linear warm-up + step policy):
a linear warm-up from WARMUP_START x lr, then x0.1 at each milestone."""

from __future__ import annotations

from collections.abc import Callable, Sequence

WARMUP_START = 0.001  # warm-up starts at 0.001 x lr (mmcv linear warm-up ratio)
# A warm-up longer than this share of a run is cut to it: the recipes' 500 iterations are
# ~0.3% of a 300-epoch COCO run, but a short run would end still warming up (1 epoch of
# 100 steps would end at lr x 0.2).
MAX_WARMUP_FRACTION = 0.1


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


def scaled_warmup(warmup_iters: int, total_steps: int) -> int:
    """The warm-up a run of `total_steps` uses: `warmup_iters`, at most MAX_WARMUP_FRACTION
    of the run (at least 1 iteration when a warm-up was asked for)."""
    if warmup_iters <= 0 or total_steps <= 0:
        return max(0, warmup_iters)
    return min(warmup_iters, max(1, int(total_steps * MAX_WARMUP_FRACTION)))
