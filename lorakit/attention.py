"""Attention for training on CPUs in bfloat16: torch's fused forward, a faster backward.

torch's CPU flash-attention backward is slow in bfloat16: at SmolLM2's training shapes
(8 × 300 tokens, 9 heads of 64) it takes five times its forward, twice what plain
matmuls take to recompute the probabilities and form the gradients. ``attention``
keeps torch's fused ``scaled_dot_product_attention`` for the forward (and everything
torch's own attention serves: inference, CUDA, float32, attention dropout) and replaces
only that backward. The probabilities are recomputed in float32 from the saved inputs, a
block of query rows at a time, so memory stays that of the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "lorakit_sdpa"
_HALF = (torch.bfloat16, torch.float16)
_BLOCK_BYTES = 32 << 20  # float32 scores per block of query rows


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, mask)
        ctx.causal, ctx.scale = causal, scale
        # A query row that may attend to nothing has no probabilities; it passes no gradient.
        ctx.empty_rows = mask is not None and mask.dtype == torch.bool and not bool(mask.any(-1).all())
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, mask = ctx.saved_tensors
        length, keys = q.shape[-2], k.shape[-2]
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # rowsum(P ∘ dP), as flash attention does
        dq = torch.empty_like(q)
        # The scale on q and k, not on score-sized tensors: two passes fewer over each block's
        # float32 scores (dq = dS·k·scale, dk = dSᵀ·q·scale). Exact for a power-of-two scale
        # (head size 64); otherwise q and k round once more, at bfloat16's precision.
        q_scaled, k_scaled = q * ctx.scale, k * ctx.scale
        if mask is not None and mask.dtype == torch.bool:  # (a causal call has no mask)
            # As a float bias, added: masked_fill_ through a mask broadcast over the heads is
            # 3× slower than an add, and this bias is a head's size, made once for all blocks.
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        block = max(1, _BLOCK_BYTES // (4 * q.shape[0] * q.shape[1] * keys))
        dk = dv = None  # float32 sums over the blocks
        for start in range(0, length, block):
            rows = slice(start, min(start + block, length))
            scores = torch.matmul(q_scaled[..., rows, :], k.transpose(-1, -2)).float()
            if ctx.causal:
                above = torch.ones(rows.stop - start, keys, dtype=torch.bool, device=q.device).triu_(start + 1)
                scores.masked_fill_(above, float("-inf"))
            elif mask is not None:
                scores.add_(mask[..., rows, :] if mask.shape[-2] > 1 else mask)
            probs = torch.softmax(scores, -1)
            if ctx.empty_rows:
                probs.nan_to_num_(0.0)
            g = grad[..., rows, :]
            dv_part = torch.matmul(probs.to(q.dtype).transpose(-1, -2), g)
            dprobs = torch.matmul(g, v.transpose(-1, -2)).float()
            dscores = probs.mul_(dprobs.sub_(delta[..., rows, :])).to(q.dtype)  # unscaled
            dq[..., rows, :] = torch.matmul(dscores, k_scaled)
            dk_part = torch.matmul(dscores.transpose(-1, -2), q_scaled[..., rows, :])
            if block >= length:  # one block: its matmuls' results are the sums, with no float32 round trip
                return dq, dk_part, dv_part, None, None, None
            dk = dk_part.float() if dk is None else dk.add_(dk_part)
            dv = dv_part.float() if dv is None else dv.add_(dv_part)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with the fast backward where it applies: a CPU
    bfloat16/float16 training forward (gradients on, not compiled), no attention dropout,
    no extra bias."""
    length = query.shape[2]
    # Under torch.compile the compiler derives its own backward (and this one would break the graph).
    ours = (torch.is_grad_enabled() and not torch.compiler.is_compiling() and query.device.type == "cpu"
            and query.dtype in _HALF and not dropout
            and (query.requires_grad or key.requires_grad or value.requires_grad)
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and length > 1
            # torch's is_causal aligns a shorter query block to the keys' start, not their end
            and (length == key.shape[2] or attention_mask is not None))
    if not ours:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _Attention.apply(query, key, value, attention_mask, bool(causal), scale)
    return out.transpose(1, 2).contiguous(), None


def use_fast_backward(model: nn.Module) -> None:
    """Switch a model on transformers' SDPA attention to ``attention`` (same forward).

    Models on another implementation (eager, flash attention, their own code) are left
    as they are.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
