"""The text metrics of ``lorakit.metrics`` as ``evaluate`` modules shipped in the package,
so scoring never fetches anything from the Hub."""

from __future__ import annotations

import math
from collections import Counter

import datasets
import evaluate

from lorakit import metrics

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


def _metric_info(citation: str) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(description=metrics.__doc__, citation=citation, inputs_description="", features=_FEATURES)


class _RougeWords:
    """``rouge-score``'s tokenizer interface over ``words``, Porter-stemming English words
    longer than 3 characters as its default tokenizer does."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in metrics.words(text)]


class Rouge(evaluate.Metric):
    """ROUGE-1/2/L F-measure (stemmed), averaged over examples."""

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Lin, 2004")

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        from rouge_score import rouge_scorer

        keys = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(keys, tokenizer=_RougeWords())
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        return {k: sum(s[k].fmeasure for s in scores) / max(len(scores), 1) for k in keys}


class Bleu(evaluate.Metric):
    """Corpus BLEU-4 with the brevity penalty, no smoothing."""

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Papineni et al., 2002")

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        matches, totals = [0] * 4, [0] * 4
        pred_len = ref_len = 0
        for pred, ref in zip(predictions, references):
            p, r = metrics.bleu_tokens(pred), metrics.bleu_tokens(ref)
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
        return _metric_info("")

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references))
        return {"exact_match": hits / max(len(predictions), 1)}


MODULES = {"rouge": Rouge, "bleu": Bleu, "exact_match": ExactMatch}
