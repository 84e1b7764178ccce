"""Fast paths and backend quirks the LoRA layer relies on, kept apart from the math.

- ``is_bare_linear``: a plain ``nn.Linear`` the layer may call as ``F.linear`` (no hooks
  of its own or global ones). It reads torch's private hook registries; should a torch
  upgrade move them, every layer simply takes the module call.
- ``SharedInput``: sibling projections (q/k/v, gate/up) share one dropout mask and one
  matmul against their stacked A factors while training.
- ``dropout``: the adapter's input dropout with a cheaper random mask on the CPU.
- bitsandbytes 4-bit weights: detection, dequantization, and undoing the CPU repacking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lorakit.lora import LoRALinear

try:
    from torch.nn.modules.module import (
        _global_backward_hooks,
        _global_backward_pre_hooks,
        _global_forward_hooks,
        _global_forward_pre_hooks,
    )

    _GLOBAL_HOOKS = (_global_forward_hooks, _global_forward_pre_hooks, _global_backward_hooks,
                     _global_backward_pre_hooks)
except ImportError:  # a torch without these registries: never take the fast path
    _GLOBAL_HOOKS = None


def is_4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (its weight carries a ``quant_state``)."""
    return hasattr(getattr(layer, "weight", None), "quant_state")


def unpack_cpu_4bit(layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference packing of a 4-bit weight.

    On AVX512-BF16 CPUs, bitsandbytes repacks a 4-bit weight in place at the first
    no-grad eval forward; that layout breaks backward and dequantization, so training
    and merging put the standard layout back first.
    """
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, state
        )


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a dense ``(d_out, d_in)`` or Conv1D ``(d_in, d_out)`` tensor."""
    if is_4bit(layer):
        import bitsandbytes.functional as bnbf

        unpack_cpu_4bit(layer)
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data


class SharedInput:
    """The down-projections ``A·dropout(x)`` of LoRA layers that read the same ``x``.

    The first member to run computes every member's projection in one matmul; the
    others take theirs while ``x`` is the same, unchanged tensor. A member that runs
    twice, or on another input, starts a new round, so the result is always its own.
    """

    def __init__(self, layers: list[LoRALinear]) -> None:
        self.layers = layers
        self._input: torch.Tensor | None = None
        self._version = -1
        self._parts: dict[int, torch.Tensor] = {}

    def down(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s ``A·dropout(x)`` as a ``(rows, r)`` matrix, rows being ``x``'s leading dims flattened."""
        if x is not self._input or x._version != self._version or id(layer) not in self._parts:
            weights = [m._modules["lora_A"]._parameters["weight"] for m in self.layers]
            if layer.dropout and layer.training:
                x_in = dropout(x, layer.dropout)
            else:
                x_in = x
            x_in = x_in.reshape(-1, x_in.shape[-1])
            parts = F.linear(x_in, torch.cat(weights).to(x_in.dtype)).split([w.shape[0] for w in weights], -1)
            self._input, self._version = x, x._version
            self._parts = {id(m): part for m, part in zip(self.layers, parts)}
        part = self._parts.pop(id(layer))
        if not self._parts:
            self._input = None  # the last member took its part: keep nothing alive
        return part


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout(x, p, training=True)`` computes it.

    On the CPU the keep-mask comes from 31-bit integer draws compared with ``p·2³¹``:
    about twice as fast as the float Bernoulli draws of ``F.dropout`` (the random number
    generator is most of dropout's cost there), and ``p`` is honoured to 2⁻³¹.
    """
    if x.device.type != "cpu" or p >= 1 or torch.compiler.is_compiling():  # compiled: the compiler's own RNG
        return F.dropout(x, p, training=True)
    draws = torch.empty(x.shape, dtype=torch.int32).random_()  # uniform on [0, 2³¹)
    return x * (draws >= round(p * 2**31)) * (1 / (1 - p))


def is_bare_linear(layer: nn.Module) -> bool:
    """An ``nn.Linear`` whose call is exactly ``F.linear``: no hooks of its own or global
    ones, no forward replaced (as Accelerate's offload hooks do)."""
    return (
        type(layer) is nn.Linear
        and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks)
        and "forward" not in layer.__dict__
        and _GLOBAL_HOOKS is not None
        and not any(_GLOBAL_HOOKS)
    )


def base_rows(base: nn.Module, bare: bool, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The base layer's output as ``(rows, d_out)``."""
    if bare:
        # On the rows, not on x: a 3-D F.linear folds and unfolds its input around the
        # same matmul, a dozen more dispatches per call.
        return F.linear(rows, base._parameters["weight"], base._parameters["bias"])
    out = base(x)  # a hooked or quantized base gets the input it was called with
    return out.reshape(-1, out.shape[-1])


def add_update(result: torch.Tensor, a: torch.Tensor, B: torch.Tensor, scale: float, bare: bool) -> torch.Tensor:
    """``result + scale · a·Bᵀ``, in place into ``result`` where that is exact."""
    if bare and result.dtype == a.dtype == B.dtype:
        # ``result`` is a fresh tensor from a bare base that no backward reads: accumulating
        # into it allocates no second d_out-wide tensor (on the CPU, fresh memory costs page
        # faults that outweigh the small matmul itself).
        return result.addmm_(a, B.t(), alpha=scale)
    delta = F.linear(a, B)
    return torch.add(result, delta if delta.dtype == result.dtype else delta.to(result.dtype), alpha=scale)


def dense_linear(layer: nn.Module) -> nn.Linear:
    """A bitsandbytes 4-bit layer as a plain float32 ``nn.Linear`` holding its dequantized weight."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.to(device=layer.weight.device)
    with torch.no_grad():
        dense.weight.copy_(dequantized_weight(layer))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    dense.requires_grad_(False)
    return dense
