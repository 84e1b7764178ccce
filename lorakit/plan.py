"""``lorakit plan``: what a config will cost, before any training.

The data is tokenized exactly as training will see it (the steps and tokens are
exact); memory comes from ``lorakit.memory``'s estimate at the longest batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.batching import collate, epoch_steps, pack, total_steps
from lorakit.config import Config
from lorakit.data import build_examples, labelled_targets
from lorakit.memory import MemoryEstimate, estimate_memory
from lorakit.model import load_tokenizer
from lorakit.pairs import build_pairs
from lorakit.peft_config import with_init_from
from lorakit.prefix import shared_length
from lorakit.preflight import preflight


@dataclass
class Plan:
    """The numbers of a run that can be known before it starts."""

    examples: int  # training rows (packed rows when data.packing is on; pairs for DPO / ORPO)
    tokens_per_epoch: int
    trained_tokens_per_epoch: int  # tokens that carry loss
    longest: int  # tokens in the longest row
    effective_batch: int
    steps_per_epoch: int
    steps: int
    epochs: float
    memory: MemoryEstimate


def make_plan(cfg: Config, processes: int = 1) -> Plan:
    """Tokenize the training data and estimate the run's memory (per process)."""
    cfg = with_init_from(cfg)
    t = cfg.training
    preflight(cfg)
    tokenizer = load_tokenizer(cfg.model)
    if t.objective != "sft":  # a batch of pairs puts both answers of each through the model
        pairs = build_pairs(cfg.data, tokenizer, "train")
        units, examples, rows_per_unit = len(pairs), [p[k] for p in pairs for k in ("chosen", "rejected")], 2
    else:
        examples = build_examples(cfg.data, tokenizer, "train")
        if cfg.data.packing:
            examples = pack(examples, cfg.data.max_length, t.seed)
        units, rows_per_unit = len(examples), 1
    lengths = [len(e["input_ids"]) for e in examples]
    trained = [labelled_targets(e) for e in examples]
    per_epoch = epoch_steps(units, t, processes)
    steps = total_steps(t, per_epoch)
    # The heaviest micro-batch: the longest rows padded to the longest length, with the
    # most trained tokens (DPO's reference pass keeps no activations for backward).
    batch = min(t.batch_size, units) * rows_per_unit
    shared = 0  # the leading tokens its rows share, computed once (supervised rows, unpacked)
    if t.objective == "sft" and not cfg.data.packing and batch > 1:
        longest = sorted(range(units), key=lengths.__getitem__)[-batch:]
        shared = shared_length(**collate([examples[i] for i in longest], tokenizer.pad_token_id))
    memory = estimate_memory(cfg, batch, max(lengths), sum(sorted(trained)[-batch:]), shared)
    return Plan(
        examples=units,
        tokens_per_epoch=sum(lengths),
        trained_tokens_per_epoch=sum(trained),
        longest=max(lengths),
        effective_batch=t.batch_size * t.grad_accum * processes,
        steps_per_epoch=per_epoch,
        steps=steps,
        epochs=steps / per_epoch,
        memory=memory,
    )
