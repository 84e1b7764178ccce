"""Text metrics as ``evaluate`` modules shipped in the package, so scoring never
fetches anything from the Hub.

``rouge``: ROUGE-1/2/L F-measure with Porter stemming, the mean over examples of the
``rouge-score`` package's per-example scores. ``bleu``: corpus BLEU-4 (Papineni et al.,
no smoothing) over lower-cased word/punctuation tokens. ``exact_match``: the share of
predictions equal to their reference after stripping and lower-casing.

Both split text into words the same way (``words``): runs of letters and digits in any
script, and each Chinese or Japanese character on its own (those scripts put no spaces
between words). ``rouge-score``'s own tokenizer keeps only ``a-z0-9``: it scored two
identical Russian or Chinese sentences 0. On English text the two split alike.

The names are here, and the word splitting; the ``evaluate`` modules that compute the
scores are in ``lorakit.metric_modules``, imported on first use (``evaluate`` and
``datasets`` take seconds to import, which ``lorakit generate`` and the CLI's start never need).
"""

from __future__ import annotations

import re

GENERATION_METRICS = ("rouge", "bleu", "exact_match")
METRICS = (*GENERATION_METRICS, "perplexity")

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and CJK ideographs
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits (any script), each CJK character alone."""
    return _WORD.findall(text.lower())


def bleu_tokens(text: str) -> list[str]:
    """BLEU's tokens: ``words`` and each punctuation mark."""
    return re.findall(rf"{_WORD.pattern}|[^\w\s]|_", text.lower())


def score(name: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """Scores of the generation metric ``name`` (one of ``GENERATION_METRICS``)."""
    from lorakit.metric_modules import MODULES

    return MODULES[name]().compute(predictions=predictions, references=references)
