"""Preference rows → pairs of tokenized examples → batches of chosen rows then rejected rows.

A row of ``format: preference`` holds ``prompt``, ``chosen`` and ``rejected``; each answer is
rendered with the prompt exactly as a supervised row would be (``data.render_preference``)
and only the answer's tokens are labelled, so the log-probabilities DPO and ORPO compare
are those of the answers alone.
"""

from __future__ import annotations

import logging

import torch

from lorakit.batching import collate
from lorakit.config import DataConfig
from lorakit.data import IGNORE, answer_warnings, tokenize
from lorakit.errors import DataError
from lorakit.render import blank_answer, render_preference, special_token_in, special_tokens
from lorakit.rows import load_rows

logger = logging.getLogger("lorakit")


def build_pairs(cfg: DataConfig, tokenizer, split: str = "train") -> list[dict]:
    """The split's pairs, ``{"chosen": example, "rejected": example}``, tokenized.

    A pair whose answers are cut away entirely by ``max_length`` is dropped; one whose
    answers are cut short, or are the same text, is kept and counted in a warning.

    Raises:
        DataError: a row without its fields (named with its place), or no usable pair.
    """
    source = cfg.train if split == "train" else cfg.validation
    rows = load_rows(source, split).head(cfg.validation_limit if split == "validation" else None)
    pairs, splits, specials, blanks, dropped, truncated, identical = [], [], [], [], 0, 0, 0
    special = special_tokens(tokenizer)
    for row, where in zip(rows.rows, rows.where):
        pair, shared = {}, []
        if token := special_token_in(row, cfg, special):
            specials.append((where, token))
        if blank_answer(row, cfg):
            blanks.append(where)
        for key in ("chosen", "rejected"):
            full = tokenize(render_preference(row, cfg, tokenizer, where, key), tokenizer, 10**9, False, where)
            if "split" in full:
                shared.append((f"{where} ({key})", full.pop("split")))
            truncated += len(full["input_ids"]) > cfg.max_length
            pair[key] = {k: v[: cfg.max_length] for k, v in full.items()}
        splits += shared[:1]  # counted once per row
        identical += pair["chosen"]["input_ids"] == pair["rejected"]["input_ids"]
        if all(any(label != IGNORE for label in pair[k]["labels"][1:]) for k in pair):
            pairs.append(pair)
        else:
            dropped += 1
    for warning in answer_warnings(len(rows), splits, 0, cfg.max_length, specials, blanks):
        logger.warning("%s: %s", source, warning)
    if dropped:
        logger.warning("%s: %d of %d pairs have an answer with no token left within max_length=%d and are "
                       "dropped; raise data.max_length to keep them", source, dropped, len(rows), cfg.max_length)
    if truncated:
        logger.warning("%s: %d answers are cut short by max_length=%d: their log-probabilities compare only "
                       "the part that fits", source, truncated, cfg.max_length)
    if identical:
        logger.warning("%s: %d pairs have the same chosen and rejected text: they teach nothing", source, identical)
    if not pairs:
        raise DataError(f"{source}: no usable preference pair within max_length={cfg.max_length}")
    return pairs


def pair_length(pair: dict) -> int:
    """The longer answer's token count: what the pair costs in a padded batch."""
    return max(len(pair["chosen"]["input_ids"]), len(pair["rejected"]["input_ids"]))


def pair_tokens(pair: dict) -> int:
    """Real tokens the pair puts through the model."""
    return len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: the chosen rows, then the rejected rows in the same order (and
    ``reference_logps`` in that order when every pair carries precomputed ones)."""
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    if all("reference" in p for p in pairs):
        batch["reference_logps"] = torch.tensor([p["reference"][0] for p in pairs] + [p["reference"][1] for p in pairs])
    return batch


@torch.no_grad()
def precompute_reference(loss_model, pairs: list[dict], batch_size: int, pad_id: int, device) -> None:
    """Store the reference's log-probs of each pair's answers in the pair (``"reference"``),
    so that training needs no reference pass (``dpo.precompute_reference``)."""
    was_training = loss_model.training
    loss_model.train()  # the mode the policy trains in (see PreferenceLoss.reference_logps)
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = loss_model.reference_logps(batch).float().cpu()
        for pair, chosen, rejected in zip(chunk, *logps.chunk(2)):
            pair["reference"] = (float(chosen), float(rejected))
    loss_model.train(was_training)
