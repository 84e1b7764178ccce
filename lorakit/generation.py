"""Greedy decoding of many prompts at once on the KV cache, for ``eval`` and ``generate``.

Prompts rendered from one template start with the same tokens (the chat template's
system turn, the instruction): that prefix is computed once and its cache shared by every
row (41 of the quickstart's 97–288 prompt tokens). The rest of each prompt is computed in
batches of similar length, to bound padding, and the batches' caches are joined to decode
together, since a decoding step streams the whole model whatever its number of rows. A row
leaves the batch when it ends.

A row's cache reads ``[shared prefix][padding][its own tokens][generated]``: padding is
masked and every token is given its true position, so each row computes what it would
alone, up to float rounding.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable

import torch
from transformers import DynamicCache

from lorakit.batching import length_batches
from lorakit.prefix import cache_keyword, computed_alike, expanded, takes_positions

logger = logging.getLogger("lorakit")

# A prompt pass's tokens, padding included, past its first row. Decoding joins the passes,
# so they can be small: a pass computes every padding token, and from 512 tokens up it runs
# at the same tokens/s. The quickstart's 60 evaluation prompts pad to 1.31× their own tokens
# in passes of 4096 tokens, 1.09× in passes of 1024 (SmolLM2, bfloat16, 2 CPU cores).
PROMPT_TOKENS = 1024

# generation_config.json settings greedy decoding has no use for (ids, output switches, sampling).
_NEUTRAL = {"use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
            "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
            "_from_model_config", "transformers_version", "do_sample", "temperature", "top_k", "top_p", "min_p",
            "typical_p", "max_length", "max_new_tokens", "num_beams", "num_return_sequences", "cache_implementation"}


def stop_ids(tokenizer) -> list[int]:
    """EOS and, for chat templates, the end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _stepper(model) -> tuple[Callable[..., torch.Tensor], bool]:
    """A forward pass that extends a cache in place and returns the greedy token of each
    row's last position; and whether the model takes ``position_ids``."""
    name = cache_keyword(model) or "past_key_values"
    positioned = takes_positions(model)

    def step(cache: DynamicCache, ids: torch.Tensor, mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions if positioned else None}
        out = model(**{k: v.to(model.device) for k, v in inputs.items() if v is not None}, **{name: cache},
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1).cpu()

    return step, positioned


def _shared_prefix(prompts: list[list[int]], config, max_new_tokens: int) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (its last
    position gives its first token). None where computing them apart could change them
    (``computed_alike``)."""
    if len(prompts) < 2 or not computed_alike(config, max(map(len, prompts)) + max_new_tokens):
        return 0
    return min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)


def _prompt_pass(step: Callable[..., torch.Tensor], prefix: DynamicCache, rows: list[list[int]], start: int,
                 pad_id: int):
    """One batch of prompt tails, left-padded, after the shared prefix's cache ``prefix``
    (batch 1). Returns the cache, the attention mask and the first generated tokens."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    own = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        own[i, width - len(row):] = 1
    cache = expanded(prefix, len(rows))
    mask = torch.cat([torch.ones((len(rows), start), dtype=torch.long), own], 1)
    positions = start + (own.cumsum(1) - 1).clamp(min=0)
    return cache, mask, step(cache, ids, mask, positions)


def _joined(parts: list[tuple], start: int):
    """Prompt passes' caches and masks as one batch: each row's padding widened after the
    shared prefix to the longest row's."""
    width = max(mask.shape[1] for _, mask, _ in parts)
    layers = []
    for layer in range(len(parts[0][0].layers)):
        for name in ("keys", "values"):
            tensors = []
            for cache, mask, _ in parts:
                t = getattr(cache.layers[layer], name)
                gap = t.new_zeros((*t.shape[:2], width - mask.shape[1], t.shape[3]))
                tensors.append(torch.cat([t[:, :, :start], gap, t[:, :, start:]], 2))
            layers.append(torch.cat(tensors))
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(zip(layers[::2], layers[1::2])):
        cache.update(keys, values, layer)
    masks = [torch.cat([mask[:, :start], mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask[:, start:]], 1)
             for _, mask, _ in parts]
    return cache, torch.cat(masks), torch.cat([first for _, _, first in parts])


# once per model and settings: eval --compare-base and interactive generate call greedy again and again
_warned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, stops: list[int], batch_size: int,
           pad_id: int) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), up to ``max_new_tokens`` and
    without the stop token that ended it.

    At most ``batch_size`` rows decode together; their prompts run in passes of at most
    ``PROMPT_TOKENS`` padded tokens. A model whose forward takes no ``position_ids``
    cannot place padded rows, so its rows run one at a time.
    """
    model.eval()
    ignored = tuple(sorted(set(model.generation_config.to_diff_dict()) - _NEUTRAL))  # those not at their defaults
    if ignored and ignored not in _warned.setdefault(model, set()):
        _warned[model].add(ignored)
        logger.warning("the model's generation config sets %s: lorakit decodes greedily and applies none of it",
                       ", ".join(ignored))
    step, positioned = _stepper(model)
    if not positioned:
        batch_size = 1
    start = _shared_prefix(prompts, model.config, max_new_tokens)
    prefix = DynamicCache()
    if start:
        step(prefix, torch.tensor([prompts[0][:start]]))
    tails = [p[start:] for p in prompts]
    outputs: dict[int, list[int]] = {}
    # With logits_to_keep, the head gets the last position's slice of the hidden states, a
    # non-contiguous 3-D tensor; torch's CPU linear then copies the head's weight once per
    # row (SmolLM2 in bfloat16: 0.6 s per batch instead of 9 ms), so the head gets a copy.
    contiguous = model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: (args[0].contiguous(), *args[1:]), prepend=True)
    try:
        for group in length_batches([len(t) for t in tails], batch_size):
            passes = length_batches([len(tails[i]) for i in group], batch_size, PROMPT_TOKENS)
            parts = [_prompt_pass(step, prefix, [tails[group[i]] for i in rows], start, pad_id) for rows in passes]
            order = [group[i] for rows in passes for i in rows]
            cache, mask, tokens = _joined(parts, start) if len(parts) > 1 else parts[0]
            outputs.update(_decode(step, model.device, cache, mask, tokens, order, max_new_tokens, stops))
    finally:
        contiguous.remove()
    return [outputs[i] for i in range(len(prompts))]


def _decode(step: Callable[..., torch.Tensor], device: torch.device, cache: DynamicCache, mask: torch.Tensor,
            tokens: torch.Tensor, rows: list[int], max_new_tokens: int, stops: list[int]) -> dict[int, list[int]]:
    """Greedy steps from each row's first generated token; a row that ends leaves the batch."""
    generated: dict[int, list[int]] = {row: [] for row in rows}
    stop = torch.tensor(stops, dtype=tokens.dtype)
    for n in range(max_new_tokens):
        ended = torch.isin(tokens, stop)
        for row, token, end in zip(rows, tokens.tolist(), ended.tolist()):
            if not end:
                generated[row].append(token)
        if n + 1 == max_new_tokens or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep.to(device))
            mask, tokens, rows = mask[keep], tokens[keep], [rows[i] for i in keep.tolist()]
        positions = mask.sum(1, keepdim=True)  # real tokens so far: the next one's position
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
        tokens = step(cache, tokens[:, None], mask, positions)
    return generated
