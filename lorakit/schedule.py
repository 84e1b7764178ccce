"""The learning-rate schedule: a linear warmup from 0 to ``training.lr`` over
``warmup_steps``, then ``constant``, ``linear`` decay to 0 at the last step, or
``cosine`` decay to 0 (half a cosine period).

The decays are those of transformers' schedulers of the same names. Its ``constant``
ignores the warmup; lorakit's warms up, as ``training.warmup_steps`` says.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, name: str, warmup: int, total: int) -> float:
    """The share of the peak learning rate at ``step`` (0-based) of a ``total``-step run."""
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant":
        return 1.0
    decay = max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - step) / decay)
    if name == "cosine":  # written as transformers writes it, so the rates are the same to the bit
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((step - warmup) / decay))))
    raise ValueError(f"unknown learning-rate schedule {name!r}")


def lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int) -> LambdaLR:
    """A scheduler that sets each parameter group's learning rate to its initial one times
    ``lr_factor``; its ``state_dict`` is what checkpoints save."""
    return LambdaLR(optimizer, partial(lr_factor, name=name, warmup=warmup, total=total))
