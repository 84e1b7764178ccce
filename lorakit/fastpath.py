"""Fast paths and backend quirks the LoRA layer relies on, kept apart from the math.

- ``is_bare_linear``: a plain ``nn.Linear`` the layer may call as ``F.linear`` (no hooks
  of its own or global ones). It reads torch's private hook registries; should a torch
  upgrade move them, every layer simply takes the module call.
- ``SharedInput``: sibling projections (q/k/v, gate/up) share one dropout mask and one
  matmul against their stacked A factors while training.
- ``dropout`` and ``dropped_down``: the adapter's input dropout with a cheaper random mask
  on the CPU; backward gets the dropped positions (or, at high rates, the mask's seed), not
  a mask.
- bitsandbytes 4-bit weights: detection, dequantization, and undoing the CPU repacking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

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
            rows = x.reshape(-1, x.shape[-1])
            A = torch.cat(weights).to(x.dtype)
            if layer.dropout and layer.training:
                projected = dropped_down(rows, A, layer.dropout)
            else:
                projected = F.linear(rows, A)
            parts = projected.split([w.shape[0] for w in weights], -1)
            self._input, self._version = x, x._version
            self._parts = {id(m): part for m, part in zip(self.layers, parts)}
        part = self._parts.pop(id(layer))
        if not self._parts:
            self._input = None  # the last member took its part: keep nothing alive
        return part


_FEW_DROPS = 0.15  # up to this rate, drawing where the drops fall is cheaper than a draw per element


def _drops(n: int, p: float, seed: int) -> torch.Tensor:
    """The flat indices of the dropped elements among ``n`` (int64), each dropped
    independently with probability ``p``: the gaps between drops are geometric, so one draw
    per dropped element (``p`` honoured to a double's precision). The same for the same ``seed``."""
    rng = np.random.Generator(np.random.SFC64(seed))
    rate = -np.log1p(-p)
    parts, last = [], -1.0  # last: where the previous drop fell
    while True:
        # Geometric gaps by inversion, ceil(E / -log(1 - p)) for exponential E: the draws
        # numpy's own geometric makes one call at a time, here in whole arrays (a third faster).
        # Positions stay float64 until the end: exact integers below 2**53.
        gaps = rng.standard_exponential(size=int(n * p * 1.05) + 64)
        drops = np.cumsum(np.ceil(np.divide(gaps, rate, out=gaps), out=gaps), out=gaps)
        drops += last
        inside = int(np.searchsorted(drops, n))
        parts.append(drops[:inside])
        if inside < len(drops):
            return torch.from_numpy((parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.int64))
        last = float(drops[-1])


def _keep_mask(like: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """A CPU keep-mask of ones and zeros in ``like``'s shape and dtype, for dropout at a
    rate ``p`` above ``_FEW_DROPS``; the same for the same ``seed``.

    The random numbers are most of dropout's cost on a CPU, so they come from numpy's
    SFC64 (3× torch's CPU generator here): 32-bit draws per element, compared with
    ``p·2³²`` (``p`` honoured to 2⁻³³). The mask is written in ``like``'s dtype: a bool
    mask would be converted at every use.
    """
    if seed is None:  # a memory estimate (lorakit plan) traces shapes, with no data to draw
        return torch.empty_like(like)
    n = like.numel()
    draws = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 1) // 2)).view(torch.int32)[:n]
    return torch.ge(draws.view(like.shape), round(p * 2**32) - 2**31, out=torch.empty(like.shape, dtype=like.dtype))


def _new_seed(like: torch.Tensor) -> int | None:
    """A mask seed from torch's generator, so ``torch.manual_seed`` (and a resumed run's
    restored RNG state) fixes every mask; None for a shape-only (fake) ``like``."""
    return None if is_fake(like) else int(torch.randint(0, 2**63 - 1, ()))


_INT32_INDICES = 2**31  # positions up to this many elements are kept as int32


class _Draw:
    """One dropout mask, for forward and backward alike: the dropped positions at rates up
    to ``_FEW_DROPS`` (kept for backward as a tensor, 4 bytes a drop: a fifth of a byte per
    element at p = 0.05, so backward neither draws again nor builds a mask; the draws are
    most of dropout's cost), else the seed the mask is redrawn from."""

    def __init__(self, p: float, seed: int | None, drops: torch.Tensor | None,
                 index: torch.Tensor | None = None) -> None:
        self.p, self.seed, self.drops = p, seed, drops
        self._index = index  # the positions as int64, as index_fill_ needs them: made once per draw

    @classmethod
    def new(cls, like: torch.Tensor, p: float) -> _Draw:
        seed, n = _new_seed(like), like.numel()
        if p > _FEW_DROPS:
            return cls(p, seed, None)
        index = torch.empty(round(n * p), dtype=torch.int64) if seed is None else _drops(n, p, seed)
        return cls(p, seed, index.int() if n <= _INT32_INDICES else index, index)

    def dropped(self, t: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """``t`` with the dropped elements zeroed; in place when ``fresh`` says ``t`` is the
        caller's own new tensor (and it is contiguous), else in a copy."""
        if self.drops is None:
            keep = _keep_mask(t, self.p, self.seed)
            return t.mul_(keep) if fresh else t * keep
        if not (fresh and t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        if self._index is None:
            self._index = self.drops.long()
        return t.view(-1).index_fill_(0, self._index, 0).view(t.shape)


def _on_cpu_eagerly(x: torch.Tensor, p: float) -> bool:
    # Elsewhere, and under the compiler (which has its own RNG), F.dropout is as fast.
    return x.device.type == "cpu" and p < 1 and not torch.compiler.is_compiling()


class _Dropout(torch.autograd.Function):
    """Inverted dropout that keeps only its draw (the dropped positions, or a seed) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        draw = _Draw.new(x, p)
        ctx.save_for_backward(draw.drops)
        ctx.p, ctx.seed = p, draw.seed
        return draw.dropped(x).mul_(1 / (1 - p))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        draw = _Draw(ctx.p, ctx.seed, *ctx.saved_tensors)
        return draw.dropped(grad).mul_(1 / (1 - ctx.p)), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout(x, p, training=True)`` computes it."""
    if not _on_cpu_eagerly(x, p):
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class _DroppedDown(torch.autograd.Function):
    """``dropout(x)·Aᵀ`` that keeps the dropped input and the draw for backward, not a
    mask: at p = 0.05 the draw is a fifth of a byte per input element held through the
    step, where a mask would hold a byte (a quarter of a gigabyte on the quickstart). The
    dropped input takes the place of ``x``, which other backwards seldom keep (80 MB more at
    the quickstart's peak, for a backward that neither copies nor zeroes ``x`` again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        draw = _Draw.new(x, p)
        scaled = A * (1 / (1 - p))  # the inverted-dropout scale on the r×d_in factor, not on x
        kept = draw.dropped(x)
        ctx.save_for_backward(kept, scaled, draw.drops)
        ctx.p, ctx.seed = p, draw.seed
        return F.linear(kept, scaled)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        kept, scaled, drops = ctx.saved_tensors
        draw = _Draw(ctx.p, ctx.seed, drops)
        grad_x = draw.dropped(grad @ scaled, fresh=True) if ctx.needs_input_grad[0] else None
        grad_A = (grad * (1 / (1 - ctx.p))).t() @ kept if ctx.needs_input_grad[1] else None
        return grad_x, grad_A, None


def dropped_down(x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(x, p)·Aᵀ`` for a 2-D ``x`` and an ``A`` of its dtype: the adapter's
    down-projection while training."""
    if not _on_cpu_eagerly(x, p):
        return F.linear(F.dropout(x, p, training=True), A)
    return _DroppedDown.apply(x, A, p)


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
        # Bᵀ as its own contiguous (r, d_out) copy: autograd then computes B's gradient as
        # aᵀ·grad, a row-major product, where a transposed view of B gets (gradᵀ·a)ᵀ,
        # a quarter slower at the quickstart's shapes.
        return result.addmm_(a, B.t().contiguous(), alpha=scale)
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
