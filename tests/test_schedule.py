"""The learning-rate schedule: transformers' decays, and a warmup for every schedule."""

import json

import pytest
import torch
from transformers import get_scheduler

from conftest import tiny_config
from lorakit.config import validate_config
from lorakit.schedule import lr_factor, lr_scheduler
from lorakit.train import train


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (4, 5), (7, 7)])
def test_decays_match_transformers_schedulers(name, warmup, total):
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    peer_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = _lrs(lr_scheduler(ours_opt, name, warmup, total), ours_opt, total + 2)
    peer = _lrs(get_scheduler(name, peer_opt, num_warmup_steps=warmup, num_training_steps=total), peer_opt, total + 2)
    assert ours == peer  # to the bit: a run's rates are what they were with transformers' schedulers


def test_constant_warms_up_then_holds():
    assert [lr_factor(step, "constant", 4, 10) for step in range(7)] == [0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [lr_factor(step, "constant", 0, 10) for step in range(3)] == [1, 1, 1]


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="'step'"):
        lr_factor(0, "step", 0, 10)


def test_training_follows_the_constant_schedules_warmup(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, warmup_steps=2, scheduler="constant")
    train(validate_config(raw, "test"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])  # after steps 1–4 of a 2-step warmup to 1e-2
