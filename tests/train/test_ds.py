"""The learning-rate schedule every stage trains with (train/ds.py), against the hand-written
curve it replaced."""
import math

import pytest
import torch

from train import ds
from train.config import SFTConfig


def hand_written(step: int, total: int, warmup: int, schedule: str) -> float:
    """The factor of the peak rate the project used before transformers' schedules."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def curve(schedule: str, warmup_ratio: float, total: int) -> list[float]:
    """The factors the scheduler train/ds.py builds gives at optimizer steps 0 .. total - 1."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = ds.lr_scheduler(optimizer, SFTConfig(lr_scheduler=schedule, warmup_ratio=warmup_ratio),
                                total)
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_is_the_hand_written_curve_after_warmup(schedule):
    total, warmup = 40, 4                                 # warmup_ratio 0.1 of 40 steps
    ours = curve(schedule, 0.1, total)
    old = [hand_written(step, total, warmup, schedule) for step in range(total)]
    assert ours[warmup:] == pytest.approx(old[warmup:], abs=1e-12)
    # warmup rises linearly from 0, one step behind the old curve (which started at 1/warmup)
    assert ours[:warmup] == pytest.approx([0.0] + old[:warmup - 1], abs=1e-12)
    assert curve(schedule, 0.0, total) == pytest.approx(
        [hand_written(step, total, 0, schedule) for step in range(total)], abs=1e-12)
