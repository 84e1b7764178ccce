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
"""

from __future__ import annotations

import math
import re
from collections import Counter

import datasets
import evaluate

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and CJK ideographs
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits (any script), each CJK character alone."""
    return _WORD.findall(text.lower())


class _RougeWords:
    """``rouge-score``'s tokenizer interface over ``words``, Porter-stemming English words
    longer than 3 characters as its default tokenizer does."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words(text)]


class Rouge(evaluate.Metric):
    """ROUGE-1/2/L F-measure (stemmed), averaged over examples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=__doc__, citation="Lin, 2004", inputs_description="", features=_FEATURES)

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        from rouge_score import rouge_scorer

        keys = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(keys, tokenizer=_RougeWords())
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        return {k: sum(s[k].fmeasure for s in scores) / max(len(scores), 1) for k in keys}


def _tokens(text: str) -> list[str]:
    """BLEU's tokens: ``words`` and each punctuation mark."""
    return re.findall(rf"{_WORD.pattern}|[^\w\s]|_", text.lower())


class Bleu(evaluate.Metric):
    """Corpus BLEU-4 with the brevity penalty, no smoothing."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=__doc__, citation="Papineni et al., 2002", inputs_description="",
                                   features=_FEATURES)

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        matches, totals = [0] * 4, [0] * 4
        pred_len = ref_len = 0
        for pred, ref in zip(predictions, references):
            p, r = _tokens(pred), _tokens(ref)
            pred_len, ref_len = pred_len + len(p), ref_len + len(r)
            for n in range(1, 5):
                p_grams = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
                r_grams = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
                matches[n - 1] += sum((p_grams & r_grams).values())
                totals[n - 1] += max(len(p) - n + 1, 0)
        if pred_len == 0 or min(matches) == 0:
            return {"bleu": 0.0}
        log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
        brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
        return {"bleu": brevity * math.exp(log_precision)}


class ExactMatch(evaluate.Metric):
    """Share of predictions equal to the reference (stripped, case-insensitive)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="", features=_FEATURES)

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references))
        return {"exact_match": hits / max(len(predictions), 1)}


GENERATION_METRICS = {"rouge": Rouge, "bleu": Bleu, "exact_match": ExactMatch}
METRICS = [*GENERATION_METRICS, "perplexity"]


def score(name: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """Scores of the generation metric ``name``."""
    return GENERATION_METRICS[name]().compute(predictions=predictions, references=references)
