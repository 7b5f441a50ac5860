"""Learning-rate schedules as pure functions of the step (linear warmup, then decay)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")


def learning_rate(
    step: int, *, base_lr: float, warmup_steps: int, max_steps: int, schedule: str,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate at `step` (1-based): linear warmup to `base_lr`, then the decay.

    cosine / linear decay to `min_lr_ratio * base_lr` at `max_steps`; inverse_sqrt decays as
    sqrt(warmup / step) (the paper's schedule, up to scale); constant stays at `base_lr`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "inverse_sqrt":
        return base_lr * math.sqrt(max(warmup_steps, 1) / step)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    floor = base_lr * min_lr_ratio
    if schedule == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
