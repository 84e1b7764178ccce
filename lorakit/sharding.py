"""Whole tensors from sharded training (FSDP), for saving and loading.

Under FSDP each process holds a shard of every parameter (a ``DTensor``) and of its
optimizer state. Files are written whole, the same as in single-process and DDP runs,
so a checkpoint or adapter does not depend on how the run was sharded. Gathering is
a collective: every process must call these functions, and only the main one writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextmanager
def whole_parameters(model: nn.Module, trainable_only: bool = True, write_back: bool = False) -> Iterator[None]:
    """Inside the block the model's sharded parameters are whole, plain tensors.

    Args:
        model: the (possibly FSDP-sharded) model.
        trainable_only: gather only parameters that train (the adapters): the frozen
            base is never copied.
        write_back: after the block, scatter the whole tensors' values back into the
            shards (for loading a checkpoint).
    """
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and (param.requires_grad or not trainable_only):
                whole = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                module._parameters[name] = whole
                swapped.append((module, name, param, whole))
    try:
        yield
    finally:
        for module, name, shard, whole in swapped:
            if write_back:
                with torch.no_grad():
                    shard.copy_(distribute_tensor(whole.detach(), shard.device_mesh, shard.placements))
            module._parameters[name] = shard


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name (on the main process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``optimizer_state``'s result, resharding it to this run's processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
