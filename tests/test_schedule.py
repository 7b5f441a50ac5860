"""ferry.train.schedule.learning_rate: warmup, then cosine / linear / inverse_sqrt / constant."""

from __future__ import annotations

import math

import pytest

from ferry.train.schedule import SCHEDULES, learning_rate

BASE, WARMUP, MAX, FLOOR = 0.002, 40, 400, 0.1


def lr(step: int, schedule: str, **kwargs) -> float:
    args = {"base_lr": BASE, "warmup_steps": WARMUP, "max_steps": MAX, "schedule": schedule,
            "min_lr_ratio": FLOOR, **kwargs}
    return learning_rate(step, **args)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_is_linear_and_reaches_base_lr(schedule):
    values = [lr(step, schedule) for step in range(1, WARMUP + 1)]
    for step, value in enumerate(values, start=1):
        assert value == pytest.approx(BASE * step / WARMUP, rel=1e-12)
    assert values[-1] == pytest.approx(BASE, rel=1e-12)
    assert values[0] > 0
    differences = [b - a for a, b in zip(values, values[1:])]
    assert max(differences) == pytest.approx(min(differences), rel=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_at_the_floor_and_never_rises(schedule):
    values = [lr(step, schedule) for step in range(WARMUP, MAX + 1)]
    assert values[0] == pytest.approx(BASE)
    assert values[-1] == pytest.approx(FLOOR * BASE, rel=1e-9)
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
    assert all(value >= FLOOR * BASE - 1e-15 for value in values)
    # past max_steps it stays at the floor
    assert lr(MAX + 1, schedule) == pytest.approx(FLOOR * BASE)
    assert lr(10 * MAX, schedule) == pytest.approx(FLOOR * BASE)


def test_cosine_and_linear_shapes_at_the_midpoint():
    middle = WARMUP + (MAX - WARMUP) // 2
    halfway = FLOOR * BASE + (BASE - FLOOR * BASE) * 0.5
    assert lr(middle, "cosine") == pytest.approx(halfway)
    assert lr(middle, "linear") == pytest.approx(halfway)
    quarter = WARMUP + (MAX - WARMUP) // 4
    cosine_quarter = FLOOR * BASE + (BASE - FLOOR * BASE) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr(quarter, "cosine") == pytest.approx(cosine_quarter)
    assert lr(quarter, "linear") == pytest.approx(FLOOR * BASE + (BASE - FLOOR * BASE) * 0.75)
    assert lr(quarter, "cosine") > lr(quarter, "linear")  # cosine decays slower at first


def test_zero_floor_decays_to_zero():
    assert lr(MAX, "cosine", min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-15)
    assert lr(MAX, "linear", min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("step", [WARMUP, WARMUP + 1, 100, 160, 399, 1000])
def test_inverse_sqrt(step):
    assert lr(step, "inverse_sqrt") == pytest.approx(BASE * math.sqrt(WARMUP / step), rel=1e-12)


def test_inverse_sqrt_quarters_with_sixteen_times_the_steps():
    assert lr(16 * WARMUP, "inverse_sqrt") == pytest.approx(BASE / 4)


@pytest.mark.parametrize("step", [WARMUP, WARMUP + 1, MAX, 5 * MAX])
def test_constant(step):
    assert lr(step, "constant") == BASE


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_no_warmup_starts_at_base_lr(schedule):
    assert lr(1, schedule, warmup_steps=0) == pytest.approx(BASE, rel=1e-2)
    assert all(lr(step, schedule, warmup_steps=0) > 0 for step in range(1, MAX))


def test_unknown_schedule_raises_value_error():
    with pytest.raises(ValueError, match="exponential"):
        lr(10, "exponential")
    with pytest.raises(ValueError):
        lr(100, "Cosine")
