"""Rows → rendered text → token ids with loss labels → padded batches.

Each example is rendered as segments of text, each marked trained or not; after
tokenizing the whole text, a token carries loss when it starts inside a trained
segment (the completion, the assistant turns, and the EOS that teaches the model to
stop). Everything else is labelled -100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from lorakit.config import DataConfig

logger = logging.getLogger("lorakit")

IGNORE = -100
ALPACA = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be turned into training examples."""


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """A local json/jsonl/csv/parquet file, or a hub dataset's ``split`` for users online."""
    path = Path(source).expanduser()
    if path.suffix in _LOADERS:
        if not path.is_file():
            raise DataError(f"data file {source} not found")
        return datasets.load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
    return datasets.load_dataset(source, split=split)


def _present(row: dict) -> str:
    # datasets fills a column missing from some rows with None
    return ", ".join(k for k, v in row.items() if v is not None)


def _field(row: dict, name: str, index: int, source: str) -> str:
    if row.get(name) is None:
        raise DataError(f"{source}, row {index}: no field {name!r} (the row has {_present(row)})")
    return str(row[name])


def _chat(tokenizer, messages: list[dict], **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Chat-template text split so that each assistant turn (with its end token) is trained."""
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            prefix = _chat(tokenizer, messages[:i], add_generation_prompt=True)
            segments.append((prefix[len(done):], False))
            done = prefix
        upto = _chat(tokenizer, messages[: i + 1])
        segments.append((upto[len(done):], message.get("role") == "assistant"))
        done = upto
    return [s for s in segments if s[0]]


def render(row: dict, cfg: DataConfig, tokenizer, index: int = 0, source: str = "data") -> list[tuple[str, bool]]:
    """One row as ``(text, trained)`` segments, per ``cfg.format``.

    Raises:
        DataError: naming the row and the missing field.
    """
    eos = tokenizer.eos_token or ""
    if cfg.format == "text":
        return [(_field(row, cfg.text_field, index, source) + eos, True)]
    if cfg.format == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{source}, row {index}: format 'chat' needs a non-empty 'messages' list")
        return _chat_segments(tokenizer, messages)
    if cfg.format == "alpaca":
        extra = row.get("input") or ""
        prompt = ALPACA.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=_field(row, "instruction", index, source),
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        completion = _field(row, "output", index, source)
    else:
        try:
            prompt = cfg.prompt_template.format(**{k: v for k, v in row.items() if v is not None})
        except KeyError as e:
            raise DataError(
                f"{source}, row {index}: prompt_template uses field {e.args[0]!r}, "
                f"which the row lacks (it has {_present(row)})"
            ) from None
        completion = _field(row, cfg.completion_field, index, source)
    if cfg.chat_template:
        return _chat_segments(tokenizer, [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": completion}])
    return [(prompt, False), (completion + eos, True)]


def tokenize(segments: list[tuple[str, bool]], tokenizer, max_length: int, train_on_prompt: bool) -> dict:
    """Token ids and labels; a token is trained when it starts inside a trained segment."""
    text = "".join(s for s, _ in segments)
    spans, start = [], 0
    for segment, trained in segments:
        if trained or train_on_prompt:
            spans.append((start, start + len(segment)))
        start += len(segment)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [
        tok if any(a <= begin < b for a, b in spans) else IGNORE
        for tok, (begin, _) in zip(ids, enc["offset_mapping"])
    ]
    return {"input_ids": ids, "labels": labels}


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
    rows = load_rows(source, split)
    limit = cfg.validation_limit if split == "validation" else None
    examples, lengths = [], []
    over = trained = total = 0
    eos_trained = False
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        full = tokenize(render(row, cfg, tokenizer, index, source), tokenizer, 10**9, cfg.train_on_prompt)
        lengths.append(len(full["input_ids"]))
        over += len(full["input_ids"]) > cfg.max_length
        example = {k: v[: cfg.max_length] for k, v in full.items()}
        labels = [label for label in example["labels"] if label != IGNORE]
        trained, total = trained + len(labels), total + len(example["labels"])
        eos_trained = eos_trained or tokenizer.eos_token_id in labels
        if labels:
            examples.append(example)
    report = DataReport(examples, len(lengths), lengths, over, trained / max(total, 1))
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


def _packed_row(group: list[dict]) -> dict:
    labels = [label for e in group for label in e["labels"]]
    start = 0
    for e in group[:-1]:  # a later example's first token is not predicted from the one before
        start += len(e["input_ids"])
        labels[start] = IGNORE
    return {"input_ids": [t for e in group for t in e["input_ids"]], "labels": labels,
            "segments": [len(e["input_ids"]) for e in group]}


def pack(examples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Fill rows of up to ``max_length`` tokens with whole examples, in a seeded order.

    Each row keeps its examples' lengths (``segments``), so that ``collate`` can keep
    attention and positions inside each example: the loss equals the unpacked one.
    """
    groups, current, used = [], [], 0
    for i in epoch_order(len(examples), seed, epoch=-1):
        n = len(examples[i]["input_ids"])
        if current and used + n > max_length:
            groups.append(current)
            current, used = [], 0
        current.append(examples[i])
        used += n
    if current:
        groups.append(current)
    return [_packed_row(g) for g in groups]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding has attention 0 and label -100 (EOS labels are kept).

    Packed rows get per-example ``position_ids`` and a block-diagonal causal attention
    mask of shape (batch, 1, length, length).
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    if "segments" not in examples[0]:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    segment = torch.full((len(examples), width), -1, dtype=torch.long)  # -1: padding
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        start = 0
        for k, n in enumerate(e["segments"]):
            segment[i, start : start + n] = k
            positions[i, start : start + n] = torch.arange(n)
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    # Padding rows attend to themselves so that no softmax row is empty.
    blocks = (same & causal) | torch.eye(width, dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": blocks[:, None], "labels": labels, "position_ids": positions}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a shuffle that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def group_by_length(order: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                    longest_first: bool = False) -> list[int]:
    """Reorder so each run of ``batch_size`` holds examples of similar length (less padding).

    Sorting happens within windows of 64 batches of the shuffled order, and the batches
    are shuffled again, so batch contents stay random while padding nearly vanishes.
    ``longest_first`` moves the batch with the longest example to the front, so that a
    few steps meet the heaviest batch (``lorakit plan --measure``). Training keeps the
    shuffled order: on the quickstart, leading with the longest batch lowered ROUGE-1 in
    two of three seeds.
    """
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if longest_first and shuffled:
        longest = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
        shuffled.insert(0, shuffled.pop(longest))
    return [i for batch in shuffled for i in batch] + [i for b in batches if len(b) < batch_size for i in b]


class BatchOrder:
    """Which examples make up each micro-batch, for any position in training.

    Global micro-batch ``index`` is ``world`` consecutive runs of ``batch_size`` in that
    epoch's order, one per process; the order depends only on (seed, epoch, batch_size),
    so 2 processes × batch b see exactly what 1 process sees with 2 accumulation steps,
    and a resumed run picks up where it stopped without replaying data.
    """

    def __init__(self, lengths: list[int], batch_size: int, world: int, seed: int, grouped: bool,
                 longest_first: bool = False) -> None:
        self.lengths, self.batch_size, self.world, self.seed, self.grouped = lengths, batch_size, world, seed, grouped
        self.longest_first = longest_first
        self.per_epoch = len(lengths) // (batch_size * world)
        self._epoch, self._order = -1, []

    def indices(self, index: int, rank: int) -> list[int]:
        """This process's examples in global micro-batch ``index``."""
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            order = epoch_order(len(self.lengths), self.seed, epoch)
            if self.grouped:
                order = group_by_length(order, self.lengths, self.batch_size, self.seed, epoch, self.longest_first)
            self._epoch, self._order = epoch, order
        start = (within * self.world + rank) * self.batch_size
        return self._order[start : start + self.batch_size]
