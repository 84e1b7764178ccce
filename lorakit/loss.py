"""The training loss, computed only where it counts.

With the prompt masked, most positions carry no loss, yet a plain causal-LM forward
builds logits for every position (batch × length × vocabulary: 500 MB in float32 for
SmolLM2 at 8 × 320). ``CausalLMLoss`` runs the transformer body, keeps the hidden
states of positions whose next token is labelled, and applies the output head and
cross-entropy to those rows only. The result equals the model's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data import IGNORE

# Config attributes of heads that do more than a matmul (soft-capping, scaling):
# those models keep transformers' own loss.
_SPECIAL_HEADS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def supports_sparse_head(model: nn.Module) -> bool:
    """True when the model's logits are exactly ``head(body(x))``."""
    config = getattr(model, "config", None)
    body = getattr(model, "base_model", None)
    return (
        config is not None
        and body is not None
        and body is not model
        and model.get_output_embeddings() is not None
        and not any(getattr(config, key, None) for key in _SPECIAL_HEADS)
    )


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that ``forward(batch)`` returns the mean next-token loss.

    Wrapping (rather than calling the body directly) keeps DDP's gradient hooks in
    the path when Accelerate wraps this module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sparse = supports_sparse_head(model)
        # FSDP shards per transformer block; Accelerate finds the block class here.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:  # packed rows
            inputs["position_ids"] = position_ids
        if not self.sparse:
            return self.model(**inputs, labels=labels).loss
        body = self.model.base_model(**inputs, use_cache=False)
        hidden = body.last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])
