"""The training loss, computed only where it counts and a slice at a time.

With the prompt masked, most positions carry no loss, yet a plain causal-LM forward
builds logits for every position (batch × length × vocabulary: 500 MB in float32 for
SmolLM2 at 8 × 320, and three such tensors live at once in backward). ``CausalLMLoss``
runs the transformer body, keeps the hidden states of positions whose next token is
labelled, and hands them to ``head_loss``, which applies the output head and
cross-entropy to a chunk of rows at a time: the logits of one chunk exist at once, never
the whole batch's. The result equals the model's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.batching import collate, length_batches
from lorakit.data import IGNORE
from lorakit.lora import is_bare_linear
from lorakit.prefix import cache_keyword, computed_alike, hidden_after_prefix, shared_length, takes_positions

# Config attributes of heads that do more than a matmul (soft-capping, scaling):
# those models keep transformers' own loss.
_SPECIAL_HEADS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

# Logits per chunk (float32): 32 MB, e.g. 170 rows of SmolLM2's 49,152-token vocabulary.
# Smaller chunks measured slower on the CPU; larger ones only cost memory.
CHUNK_LOGITS = 2**23


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


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGITS // vocab)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` by chunks of rows,
    for a frozen ``weight``.

    The gradient of a scalar loss is known once a chunk's softmax is: ``softmax - onehot``.
    Forward therefore turns each chunk's logits into that gradient in place and multiplies
    it out into the hidden states at once; backward only scales what forward stored by
    the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        step = _chunk_rows(weight.shape[0])
        for start in range(0, rows, step):
            h, t = hidden[start:start + step], targets[start:start + step]
            logits = (h @ weight.T).float()
            picked = logits.gather(1, t[:, None])
            # softmax in the logits' own memory, one exp per logit
            peak = logits.amax(-1, keepdim=True)
            grad = logits.sub_(peak).exp_()
            sums = grad.sum(-1, keepdim=True)
            total += (peak + sums.log() - picked).sum()
            grad.div_(sums)
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad_hidden[start:start + step] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.rows = rows
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_loss / ctx.rows).to(grad_hidden.dtype), None, None


def _chunked_loss_value(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same mean loss without gradients (evaluation): one chunk of logits at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = _chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        t = targets[start:start + step]
        logits = (hidden[start:start + step] @ weight.T).float()
        total += F.cross_entropy(logits, t, reduction="sum")
    return total / hidden.shape[0]


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` (float32 logits) against ``targets``.

    Args:
        head: the output embedding layer.
        hidden: ``(rows, hidden_size)`` final hidden states of the labelled positions.
        targets: ``(rows,)`` the next token at each of them.

    A frozen, plain, bias-free linear head (every LoRA run's) is applied in chunks
    (``CHUNK_LOGITS`` logits at a time). A trained head (full fine-tuning, trained
    embeddings) or any other head (LoRA on ``lm_head``, a bias, hooks) gets the direct
    formula: its weight gradient would need the whole logits again in backward.
    """
    grad = torch.is_grad_enabled()
    chunked = is_bare_linear(head) and head.bias is None and not (grad and head.weight.requires_grad)
    if not chunked or hidden.shape[0] == 0:
        return F.cross_entropy(head(hidden).float(), targets)
    if grad and hidden.requires_grad:
        return _ChunkedHeadLoss.apply(hidden, head.weight, targets)
    return _chunked_loss_value(hidden, head.weight, targets)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that ``forward(batch)`` returns the mean next-token loss.

    Wrapping (rather than calling the body directly) keeps DDP's gradient hooks in
    the path when Accelerate wraps this module.
    """

    def __init__(self, model: nn.Module, share_prefixes: bool = True) -> None:
        """``share_prefixes``: compute the leading tokens a batch's rows share once
        (``lorakit.prefix``); off where the body is sharded or compiled, which run it as
        one call per batch."""
        super().__init__()
        self.model = model
        self.sparse = supports_sparse_head(model)
        body = model.base_model if self.sparse else None
        self.prefix_keyword = (cache_keyword(body) if share_prefixes and self.sparse and takes_positions(body)
                               else None)
        # FSDP shards per transformer block; Accelerate finds the block class here.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
        """The mean next-token loss over this batch's labelled tokens or, with
        ``normalizer``, their summed loss divided by it (the batch's share of a mean over
        several micro-batches and processes)."""
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if not self.sparse:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if position_ids is not None:  # packed rows
                inputs["position_ids"] = position_ids
            loss = self.model(**inputs, labels=labels).loss
        else:
            start = 0
            if self.may_share(attention_mask, position_ids):
                start = shared_length(input_ids, attention_mask, labels)
            hidden = self.hidden(input_ids, attention_mask, position_ids, start)
            # the first ``start`` positions' next tokens are nobody's targets (shared_length)
            kept = keep[:, start:]
            loss = head_loss(self.model.get_output_embeddings(), hidden[:, :-1][kept], targets[:, start:][kept])
        if normalizer is None:
            return loss
        n = int(keep.sum())
        # A micro-batch with nothing to predict adds nothing (its mean over no tokens is NaN).
        return loss * (n / normalizer) if n else torch.nan_to_num(loss) * 0.0

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
               start: int = 0) -> torch.Tensor:
        """The body's last hidden states from position ``start`` on, the first ``start``
        tokens (which every row has) computed once."""
        if start:
            return hidden_after_prefix(self.model.base_model, self.prefix_keyword, input_ids, attention_mask, start)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:  # packed rows
            inputs["position_ids"] = position_ids
        return self.model.base_model(**inputs, use_cache=False).last_hidden_state

    def may_share(self, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> bool:
        """Whether a batch's shared leading tokens may be computed once: not for packed rows,
        under activation checkpointing (recomputed blocks would append to the cache twice),
        nor where the prefix would come out otherwise alone (``computed_alike``)."""
        # transformers >= 5 renamed is_gradient_checkpointing (and warns on the old name)
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        return (self.prefix_keyword is not None and position_ids is None and attention_mask.dim() == 2
                and not checkpointing and computed_alike(self.model.config, attention_mask.shape[1]))


@torch.no_grad()
def evaluate_loss(loss_model: CausalLMLoss, examples: list[dict], batch_size: int, pad_id: int, device) -> float:
    """Mean loss per trained token over ``examples`` (in batches of similar length)."""
    was_training = loss_model.training
    loss_model.eval()
    total = count = 0.0
    for chunk in length_batches([len(e["input_ids"]) for e in examples], batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += loss_model(**batch).float().item() * n
        count += n
    loss_model.train(was_training)
    return total / max(count, 1)
