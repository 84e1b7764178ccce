"""Prompt prefixes that many rows share, computed once.

Rows rendered from one template start with the same tokens (a chat template's system
turn, the instruction: 41 of the quickstart's 97-288 prompt tokens). A causal model
computes those tokens identically in every row, since they attend only to each other.
So they can run once, as a batch of one, and their keys and values be given to every row
as a cache that the rows' own tokens attend to, at their true positions. In training,
the gradient reaching the shared keys and values is the sum over the rows, which is
what each row's copy would have received. The result is the same up to float rounding.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.data import IGNORE

# A shared pass costs a batch of one (SmolLM2, bfloat16, 2 CPU cores: a 41-token prefix's
# forward and backward take as long as about 140 tokens in a full batch), so a batch
# shares its prefix only when that saves at least this many tokens: the quickstart's
# 8 rows × 41 tokens save 287, and its forward and backward take 8% less time.
MIN_SAVED_TOKENS = 128


def cache_keyword(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache; None if it takes none."""
    takes = inspect.signature(module.forward).parameters
    # transformers 5 names the argument ``cache``; earlier versions ``past_key_values``
    return next((name for name in ("cache", "past_key_values") if name in takes), None)


def takes_positions(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``position_ids``: rows after a shared prefix, or
    after padding, need their true positions."""
    return "position_ids" in inspect.signature(module.forward).parameters


def computed_alike(config, tokens: int) -> bool:
    """Whether leading tokens computed apart, in a shorter call, come out as they would in
    rows of ``tokens`` tokens. Not under a sliding window the rows could outgrow (it counts
    cache slots, and padding after the prefix would push real tokens out of it), nor under
    RoPE whose frequencies follow the call's longest position (dynamic NTK, LongRoPE)."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and tokens > window:
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    kinds = {str(p.get("rope_type") or p.get("type")) for p in per_layer if isinstance(p, dict)}
    return not kinds & {"dynamic", "longrope"}


def expanded(cache: DynamicCache, rows: int) -> DynamicCache:
    """A batch-of-one cache as a cache of ``rows`` rows (views, not copies)."""
    out = DynamicCache()
    for index, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
    return out


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """Leading tokens of a right-padded batch that every row has, of which no row's next
    token is labelled (their hidden states are then never needed), leaving each row at
    least one token of its own. 0 when sharing them would not pay (``MIN_SAVED_TOKENS``)."""
    rows = input_ids.shape[0]
    if rows < 2:
        return 0
    shared = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    unlabelled = (labels == IGNORE).all(0)
    # position j may be shared if its token is, and the token after it is nobody's target
    usable = shared & torch.cat([unlabelled[1:], unlabelled.new_zeros(1)])
    length = min(int(usable.int().cumprod(0).sum()), int(attention_mask.sum(1).min()) - 1)
    return length if (rows - 1) * length >= MIN_SAVED_TOKENS else 0


def hidden_after_prefix(body: nn.Module, keyword: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        length: int) -> torch.Tensor:
    """The transformer body's last hidden states of positions ``length`` onwards, with the
    first ``length`` tokens (shared by every row) computed once."""
    rows, width = input_ids.shape
    positions = torch.arange(width, device=input_ids.device)[None]
    cache = DynamicCache()
    body(input_ids=input_ids[:1, :length], position_ids=positions[:, :length], use_cache=True, **{keyword: cache})
    return body(input_ids=input_ids[:, length:], attention_mask=attention_mask,
                position_ids=positions[:, length:].expand(rows, -1), use_cache=True,
                **{keyword: expanded(cache, rows)}).last_hidden_state
