"""Rendered rows → token ids with loss labels, and the report of what training will see.

Each example is rendered as segments of text, each marked trained or not
(``lorakit.render``); after tokenizing the whole text, a token carries loss when it
starts inside a trained segment (the completion, the assistant turns, and the EOS that
teaches the model to stop). Everything else is labelled -100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lorakit.config import DataConfig
from lorakit.errors import DataError
from lorakit.render import blank_answer, render, special_token_in, special_tokens
from lorakit.rows import load_rows

logger = logging.getLogger("lorakit")

IGNORE = -100


def bos_of(tokenizer) -> list[int]:
    """``[BOS]`` when the tokenizer starts every text with it (Llama, Mistral, Gemma), else ``[]``.

    Rendered text is tokenized without the tokenizer's automatic special tokens (a chat
    template writes its own, and an EOS the tokenizer appended would be trained twice);
    this BOS is then put back where the text lacks it, so that training, eval and the
    serving engines (which add it) all see the same tokens.
    """
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a")["input_ids"][:1] != [bos]:
        return []
    return [] if tokenizer("a", add_special_tokens=False)["input_ids"][:1] == [bos] else [bos]


def _check_ids(ids: list[int], tokenizer, where: str) -> None:
    """Refuse a token past the model's embedding rows (``embedding_rows``, recorded by
    ``lorakit.model.load_tokenizer`` when the tokenizer has more tokens than the model)."""
    rows = getattr(tokenizer, "embedding_rows", None)
    if rows is not None and ids and max(ids) >= rows:
        token = max(ids)
        raise DataError(f"{where}: its text holds the token {tokenizer.decode([token])!r} (id {token}), past the "
                        f"model's {rows} embedding rows (the tokenizer has {len(tokenizer)} tokens): the model has "
                        "no embedding for it; leave that text out or use the tokenizer the model was trained with")


def encode(tokenizer, text: str, where: str = "prompt") -> list[int]:
    """The token ids of a rendered prompt, as training sees them (``bos_of``).

    Raises:
        DataError: a token the model has no embedding for, naming ``where``.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _check_ids(ids, tokenizer, where)
    bos = bos_of(tokenizer)
    return ids if ids[: len(bos)] == bos else bos + ids


_TOKENIZER_BATCH = 1024  # rows per tokenizer call in tokenize_many


def tokenize(segments: list[tuple[str, bool]], tokenizer, max_length: int, train_on_prompt: bool,
             where: str = "data") -> dict:
    """Token ids and labels of one rendered row (``tokenize_many``)."""
    return tokenize_many([segments], tokenizer, max_length, train_on_prompt, [where])[0]


def tokenize_many(rows: list[list[tuple[str, bool]]], tokenizer, max_length: int, train_on_prompt: bool,
                  places: list[str]) -> list[dict]:
    """Token ids and labels of rendered rows, tokenized in batches of rows; a token is
    trained when it starts inside a trained segment.

    The tokenizer's BOS is put first when the text lacks it (``bos_of``), as context.
    When one token holds both the end of the context and the start of a trained segment
    (a prompt ending in a space: ``" yes"``), that token stays context and the example
    gets ``"split"``, the token's text, so that callers can warn: the answer's start is
    not trained, and generation from the prompt alone sees other tokens.

    Raises:
        DataError: a token the model has no embedding for, naming the row's place.
    """
    texts, trained_spans = [], []
    for segments in rows:
        spans, start = [], 0
        for segment, trained in segments:
            end = start + len(segment)
            if (trained or train_on_prompt) and spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            elif trained or train_on_prompt:
                spans.append((start, end))
            start = end
        texts.append("".join(s for s, _ in segments))
        trained_spans.append(spans)
    bos = bos_of(tokenizer)
    examples = []
    for i, (spans, where) in enumerate(zip(trained_spans, places)):
        if i % _TOKENIZER_BATCH == 0:  # in batches: a whole dataset's offsets at once could fill memory
            encoded = tokenizer(texts[i : i + _TOKENIZER_BATCH], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"][i % _TOKENIZER_BATCH], encoded["offset_mapping"][i % _TOKENIZER_BATCH]
        _check_ids(ids, tokenizer, where)
        begins = torch.tensor([b for b, _ in offsets], dtype=torch.long)
        ends = torch.tensor([e for _, e in offsets], dtype=torch.long)
        inside = torch.zeros(len(ids), dtype=torch.bool)
        straddles = torch.zeros(len(ids), dtype=torch.bool)
        for a, b in spans:
            inside |= (begins >= a) & (begins < b)
            straddles |= (begins < a) & (ends > a)
        labels = [tok if keep else IGNORE for tok, keep in zip(ids, inside.tolist())]
        split = int(straddles.int().argmax()) if bool(straddles.any()) else None  # the first such token
        shift = len(bos) if bos and ids[:1] != bos else 0
        example = {"input_ids": (bos[:shift] + ids)[:max_length], "labels": ([IGNORE] * shift + labels)[:max_length]}
        if split is not None and split + shift < max_length:
            example["split"] = tokenizer.decode([ids[split]])
        examples.append(example)
    return examples


@dataclass
class DataReport:
    """A split tokenized as training sees it, and what can go wrong with it."""

    examples: list[dict]  # the usable ones: at least one trained token within max_length
    rows: int
    lengths: list[int]  # untruncated token counts
    over_max_length: int
    trained_share: float
    warnings: list[str] = field(default_factory=list)


def data_report(cfg: DataConfig, tokenizer, split: str = "train") -> DataReport:
    """Tokenize a split and collect the problems that silently ruin runs: an EOS that
    never carries loss, completions cut away by ``max_length``, nothing or everything trained."""
    source = cfg.train if split == "train" else cfg.validation
    if (cfg.format == "chat" or cfg.chat_template) and not getattr(tokenizer, "chat_template", None):
        key = "data.format: chat" if cfg.format == "chat" else "data.chat_template: true"
        raise DataError(f"{key} needs the model's chat template, and this tokenizer has none; use "
                        "format prompt_completion without chat_template, or a model that ships a template")
    rows = load_rows(source, split).head(cfg.validation_limit if split == "validation" else None)
    examples, lengths, splits, specials, blanks = [], [], [], [], []
    over = cut = trained = total = 0
    eos_trained = False
    special = special_tokens(tokenizer)
    rendered = [render(row, cfg, tokenizer, where) for row, where in zip(rows.rows, rows.where)]
    tokenized = tokenize_many(rendered, tokenizer, 10**9, cfg.train_on_prompt, rows.where)
    for row, where, full in zip(rows.rows, rows.where, tokenized):
        if "split" in full:
            splits.append((where, full.pop("split")))
        if token := special_token_in(row, cfg, special):
            specials.append((where, token))
        if blank_answer(row, cfg):
            blanks.append(where)
        lengths.append(len(full["input_ids"]))
        over += len(full["input_ids"]) > cfg.max_length
        example = {k: v[: cfg.max_length] for k, v in full.items()}
        labels = [label for label in example["labels"] if label != IGNORE]
        trained, total = trained + len(labels), total + len(example["labels"])
        eos_trained = eos_trained or tokenizer.eos_token_id in labels
        if labels:
            examples.append(example)
            cut += len(full["input_ids"]) > cfg.max_length
    report = DataReport(examples, len(lengths), lengths, over, trained / max(total, 1))
    report.warnings += answer_warnings(len(lengths), splits, cut, cfg.max_length, specials, blanks)
    dropped = len(lengths) - len(examples)
    if dropped:
        report.warnings.append(f"{dropped} of {len(lengths)} examples had no trained token left within "
                               f"max_length={cfg.max_length} and are dropped; raise data.max_length to keep them")
    if not eos_trained:
        pad = " (and the pad token is the EOS token)" if tokenizer.pad_token_id == tokenizer.eos_token_id else ""
        report.warnings.append(f"the EOS token never carries loss{pad}: the model will not learn to stop")
    if report.trained_share == 1 and cfg.format != "text":
        report.warnings.append("100% of tokens carry loss: the prompt is trained too (train_on_prompt?)")
    return report


def answer_warnings(rows: int, splits: list[tuple[str, str]], cut: int, max_length: int,
                    specials: list[tuple[str, str]], blanks: list[str]) -> list[str]:
    """What keeps rows from being trained as written: tokens shared by prompt and answer
    (``splits``: place and token text), answers cut by ``max_length``, special tokens
    written in the rows' own text (``specials``: place and token), and empty answers
    (``blanks``: places)."""
    warnings = []
    if blanks:
        warnings.append(f"{len(blanks)} of {rows} examples have an empty answer (first: {blanks[0]}): it is "
                        "trained as the end of text alone, which teaches answering with nothing")
    if specials:
        where, token = specials[0]
        warnings.append(f"{len(specials)} of {rows} examples write a special token in their own text (first: "
                        f"{token!r} in {where}): the tokenizer reads it as that token, not as text (an end of "
                        "turn inside an answer teaches the model to stop there)")
    if splits:
        where, token = splits[0]
        warnings.append(f"{len(splits)} of {rows} examples share a token between the prompt and the answer "
                        f"(first: {token!r} in {where}): it stays context, so the answer's start is not trained; "
                        "end the prompt where a token ends, e.g. without a trailing space")
    if cut:
        warnings.append(f"{cut} of {rows} examples are cut short by max_length={max_length}: the end of their "
                        "answers (and EOS) is not trained; raise data.max_length to keep it")
    return warnings


def build_examples(cfg: DataConfig, tokenizer, split: str = "train") -> list[dict]:
    """Tokenized examples of the train or validation split, its warnings logged.

    Raises:
        DataError: when no example has anything to train.
    """
    report = data_report(cfg, tokenizer, split)
    source = cfg.train if split == "train" else cfg.validation
    for warning in report.warnings:
        logger.warning("%s: %s", source, warning)
    if not report.examples:
        raise DataError(f"{source}: no usable example: 0% of tokens carry loss within max_length={cfg.max_length}")
    return report.examples


def length_summary(lengths: list[int], max_length: int) -> str:
    """``min / median / p95 / max`` token lengths against ``max_length``."""
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"tokens per example: min {ordered[0]}, median {ordered[len(ordered) // 2]}, p95 {p95}, "
            f"max {ordered[-1]} (max_length {max_length})")


def labelled_targets(example: dict) -> int:
    """Tokens of ``example`` the loss predicts: labelled positions after the first."""
    return sum(label != IGNORE for label in example["labels"][1:])
