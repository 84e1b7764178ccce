"""Attention for training on CPUs in bfloat16: torch's fused forward, a faster backward.

torch's CPU flash-attention backward is slow in bfloat16: at SmolLM2's training shapes
(8 × 300 tokens, 9 heads of 64) it takes five times its forward, twice what plain
matmuls take to recompute the probabilities and form the gradients. ``attention``
keeps torch's fused ``scaled_dot_product_attention`` for the forward (and everything
torch's own attention serves: inference, CUDA, float32, attention dropout) and replaces
only that backward. The probabilities are recomputed in float32 from the saved inputs, a
block of query rows at a time, so memory stays that of the fused kernel. Grouped-query
models' keys and values are never repeated per query head (SmolLM2: 3 for 9), which the
forward and backward both read grouped: 100 MB less kept at the quickstart's peak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "lorakit_sdpa"
_HALF = (torch.bfloat16, torch.float16)
_BLOCK_BYTES = 32 << 20  # float32 scores per block of query rows


class _Attention(torch.autograd.Function):
    """Attention over ``k`` and ``v`` with ``q``'s heads or fewer (grouped queries: query head
    ``h`` reads key head ``h // groups``, transformers' ``repeat_kv`` order), never repeated:
    the fused forward reads them grouped, and backward multiplies each key head by all its
    query heads at once, so dk and dv come out summed over the group."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        ctx.save_for_backward(q, k, v, out, mask)
        ctx.causal, ctx.scale = causal, scale
        # A query row that may attend to nothing has no probabilities; it passes no gradient.
        ctx.empty_rows = (mask is not None and mask.dtype == torch.bool and not is_fake(mask)  # (plan: shapes only)
                          and not bool(mask.any(-1).all()))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, mask = ctx.saved_tensors
        batch, heads, length, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        groups = heads // kv_heads

        def grouped(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, rows, d) as (batch, kv heads, groups, rows, d)
            return t.view(t.shape[0], kv_heads, groups, *t.shape[2:])

        delta = grouped((grad.float() * out.float()).sum(-1, keepdim=True))  # rowsum(P ∘ dP), as flash attention does
        dq = torch.empty_like(q)
        # The scale on q and k, not on score-sized tensors: two passes fewer over each block's
        # float32 scores (dq = dS·k·scale, dk = dSᵀ·q·scale). Exact for a power-of-two scale
        # (head size 64); otherwise q and k round once more, at bfloat16's precision.
        q_scaled, k_scaled = grouped(q * ctx.scale), k * ctx.scale
        grad, dq_rows = grouped(grad), grouped(dq)
        if mask is not None:
            if mask.dtype == torch.bool:  # (a causal call has no mask)
                # As a float bias, added: masked_fill_ through a mask broadcast over the heads is
                # 3× slower than an add, and this bias is a head's size, made once for all blocks.
                mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
            mask = mask.unsqueeze(2) if mask.shape[1] == 1 else grouped(mask)
        block = max(1, _BLOCK_BYTES // (4 * batch * heads * keys))
        dk = dv = None  # float32 sums over the blocks
        for start in range(0, length, block):
            rows = slice(start, min(start + block, length))
            n = rows.stop - start
            # A block's queries as (batch, kv heads, groups × rows, d): a view when the block
            # is every row, else a copy of the block.
            q_block = q_scaled[..., rows, :].reshape(batch, kv_heads, groups * n, dim)
            g = grad[..., rows, :].reshape(batch, kv_heads, groups * n, dim)
            scores = torch.matmul(q_block, k.transpose(-1, -2)).float()
            by_row = scores.view(batch, kv_heads, groups, n, keys)
            if ctx.causal:
                above = torch.ones(n, keys, dtype=torch.bool, device=q.device).triu_(start + 1)
                by_row.masked_fill_(above, float("-inf"))
            elif mask is not None:
                by_row.add_(mask[..., rows, :] if mask.shape[-2] > 1 else mask)
            probs = torch.softmax(scores, -1)
            if ctx.empty_rows:
                probs.nan_to_num_(0.0)
            dv_part = torch.matmul(probs.to(q.dtype).transpose(-1, -2), g)
            dprobs = torch.matmul(g, v.transpose(-1, -2)).float()
            dprobs.view(batch, kv_heads, groups, n, keys).sub_(delta[..., rows, :])
            dscores = probs.mul_(dprobs).to(q.dtype)  # unscaled
            dq_rows[..., rows, :] = torch.matmul(dscores, k_scaled).view(batch, kv_heads, groups, n, dim)
            dk_part = torch.matmul(dscores.transpose(-1, -2), q_block)
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
            and (length == key.shape[2] or attention_mask is not None)
            and query.shape[1] % key.shape[1] == 0)
    if not ours:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _Attention.apply(query, key, value, attention_mask, bool(causal), scale)
    return out.transpose(1, 2).contiguous(), None


def use_fast_backward(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Switch a model on transformers' SDPA attention to ``attention`` (same forward) where
    training takes it: on the CPU (``device``, where training runs), in half precision
    (``dtype``, the model's compute dtype). Elsewhere, and for models on another
    implementation (eager, flash attention, their own code), nothing changes.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if (torch.device(device).type != "cpu" or dtype not in _HALF
            or getattr(config, "_attn_implementation", None) != "sdpa"):
        return
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
