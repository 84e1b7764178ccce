"""Preference training on adapters: DPO and ORPO losses, and the reference model for free.

DPO (Rafailov et al., 2023, "Direct Preference Optimization") trains the policy π to
prefer the chosen answer y_w over the rejected y_l more than a frozen reference π_ref
does::

    z    = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
    loss = −log σ(β·z)                                    (dpo.loss: sigmoid)
    loss = (z̄ − 1/(2β))²,  z̄ with each log-ratio per token  (dpo.loss: ipo; Azar et al., 2023)

log π(y|x) sums the answer's token log-probabilities. The reference is the model as it
was at step 0 (``ReferenceWeights``): with a fresh adapter (B = 0) that is the base model
itself, with ``lora.init_from`` the supervised adapter it starts from; either way no
second model lives in memory, only a copy of the adapter.

ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference
Model") needs no reference: the chosen answer's NLL plus an odds-ratio term on the
answers' mean token log-probabilities p̄::

    loss = NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)),   odds(y) = p̄(y) / (1 − p̄(y))

The metrics follow TRL's names: rewards of chosen and rejected (β times the log-ratio for
DPO, β·p̄ for ORPO), their margin, and the preference accuracy (chosen reward higher).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.batching import length_batches
from lorakit.config import Config
from lorakit.data import IGNORE
from lorakit.loss import supports_sparse_head

# The per-pair statistics a step sums over its micro-batches and processes, in this order.
STATS = ("rewards_chosen", "rewards_rejected", "correct", "pairs")


class ReferenceWeights:
    """A copy of the trainable parameters as they are now: the reference policy.

    ``active()`` puts the copy in place for a no-grad pass and the trained values back
    after it; it must not run between a forward and its backward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.params]

    @contextmanager
    def active(self) -> Iterator[None]:
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, ref in zip(self.params, self.saved):
                p.copy_(ref)
            try:
                yield
            finally:
                for p, value in zip(self.params, current):
                    p.copy_(value)


@contextmanager
def _without_dropout(model: nn.Module) -> Iterator[None]:
    """Every dropout probability of ``model`` at 0 inside the block: ``nn.Dropout`` modules,
    and float ``dropout`` / ``attention_dropout`` attributes (LoRA layers, transformers' attention)."""
    saved = []
    for module in model.modules():
        for name in ("p", "dropout", "attention_dropout"):
            value = module.__dict__.get(name)
            if (name != "p" or isinstance(module, nn.Dropout)) and isinstance(value, float) and value > 0:
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens, and how many there are.

    Only the labelled positions' logits are computed (float32), as in ``lorakit.loss``.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    if supports_sparse_head(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
        logits = model.get_output_embeddings()(hidden).float()
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep].float()
    token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = token_logps.new_zeros(len(targets)).index_add(0, rows, token_logps)
    return sums, keep.sum(1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
             kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen and rejected rewards.

    Args:
        policy, reference: summed log-probs of the batch's rows, chosen rows first.
        counts: labelled tokens per row (IPO compares per-token log-ratios).
    """
    ratios = policy - reference
    chosen, rejected = ratios.chunk(2)
    if kind == "ipo":
        n_chosen, n_rejected = counts.clamp(min=1).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x < 0, accurate on both sides of −log 2 (Mächler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: torch.Tensor, counts: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor, torch.Tensor]:
    """The batch's ORPO loss (chosen NLL per token plus the mean odds-ratio term) and the
    per-pair odds-ratio terms and rewards."""
    mean = policy / counts.clamp(min=1)
    chosen, rejected = mean.chunk(2)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    chosen_sum, chosen_counts = policy.chunk(2)[0], counts.chunk(2)[0]
    nll = -chosen_sum.sum() / chosen_counts.sum().clamp(min=1)
    return nll - weight * ratio.mean(), -weight * ratio, weight * chosen.detach(), weight * rejected.detach()


class PreferenceLoss(nn.Module):
    """Wraps a causal LM so that ``forward(batch)`` returns the DPO or ORPO loss of a batch
    of pairs (chosen rows first, then rejected, as ``lorakit.pairs.collate_pairs`` builds
    it) and keeps the batch's summed ``STATS`` in ``self.stats``.

    Wrapping keeps DDP's gradient hooks in the path, as ``CausalLMLoss`` does.
    """

    def __init__(self, model: nn.Module, config: Config) -> None:
        super().__init__()
        self.model = model
        self.objective = config.training.objective
        self.dpo, self.orpo = config.dpo, config.orpo
        self.reference: ReferenceWeights | None = None  # set by freeze_reference()
        self.stats = torch.zeros(len(STATS))
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def freeze_reference(self) -> None:
        """Take the model as it is now as DPO's reference: call it once the parameters are
        final objects (after Accelerate's prepare) and before any training or resuming."""
        self.reference = ReferenceWeights(self.model)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's summed log-probs of the batch's rows (no dropout, no gradient).

        The pass keeps the model's mode and only switches dropout off: a mode switch can
        change the arithmetic itself (bitsandbytes' CPU 4-bit layers use another kernel in
        eval mode), and the reference must differ from the policy only by its weights."""
        with torch.no_grad(), self.reference.active(), _without_dropout(self.model):
            return sequence_logps(self.model, batch)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                reference_logps: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
        """The mean loss over this batch's pairs or, with ``normalizer``, their sum divided
        by it (the batch's share of a mean over a whole step)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.objective == "dpo" and reference_logps is None:
            reference_logps = self.reference_logps(batch)
        policy, counts = sequence_logps(self.model, batch)
        pairs = len(policy) // 2
        if self.objective == "dpo":
            losses, chosen, rejected = dpo_loss(policy, reference_logps, counts, self.dpo.beta, self.dpo.loss)
            loss = losses.mean()
        else:
            loss, _, chosen, rejected = orpo_loss(policy, counts, self.orpo.weight)
        self.stats = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum().float(),
                                  torch.tensor(float(pairs), device=chosen.device)]).detach()
        return loss if normalizer is None else loss * (pairs / normalizer)


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """Mean rewards, margin and accuracy from summed ``STATS``."""
    chosen, rejected, correct, pairs = (float(v) for v in stats)
    pairs = max(pairs, 1.0)
    return {"rewards_chosen": chosen / pairs, "rewards_rejected": rejected / pairs,
            "margin": (chosen - rejected) / pairs, "accuracy": correct / pairs}


@torch.no_grad()
def evaluate_pairs(loss_model: PreferenceLoss, pairs: list[dict], batch_size: int, pad_id: int, device) -> dict:
    """Mean loss, rewards, margin and preference accuracy over held-out ``pairs``."""
    from lorakit.pairs import collate_pairs, pair_length

    was_training = loss_model.training
    loss_model.eval()
    total, stats = 0.0, torch.zeros(len(STATS))
    for indices in length_batches([pair_length(pair) for pair in pairs], batch_size):
        chunk = [pairs[i] for i in indices]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        total += loss_model(**batch).float().item() * len(chunk)
        stats += getattr(loss_model, "module", loss_model).stats.cpu()  # DDP wraps the module that keeps them
    loss_model.train(was_training)
    return {"val_loss": total / max(len(pairs), 1), **{f"val_{k}": v for k, v in summarize(stats).items()}}
