"""How often a model prefers the chosen answer: log π(chosen) > log π(rejected) on held-out pairs.

The pairs are rendered as a preference config renders them (default: the quickstart's
DPO config and its validation split); each adapter is loaded on the config's base in turn.

    python scripts/preference_accuracy.py runs/quickstart/adapter runs/quickstart-dpo/adapter
"""

from __future__ import annotations

import argparse
import json

import torch

from lorakit import load_adapter
from lorakit.config import load_config
from lorakit.model import load_model, load_tokenizer
from lorakit.pairs import build_pairs, collate_pairs
from lorakit.preference import sequence_logps


@torch.no_grad()
def preference(model, pairs: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Preference accuracy and the mean log-probability margin (chosen − rejected)."""
    margins = []
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i : i + batch_size], pad_id)
        chosen, rejected = sequence_logps(model, batch)[0].float().chunk(2)
        margins += (chosen - rejected).tolist()
    return {"pairs": len(margins), "accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--config", default="configs/quickstart-dpo.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config)
    tokenizer = load_tokenizer(cfg.model)
    pairs = build_pairs(cfg.data, tokenizer, "validation")
    for adapter in args.adapters:
        model = load_adapter(load_model(cfg.model), adapter).eval()
        print(json.dumps({"adapter": adapter, **preference(model, pairs, tokenizer.pad_token_id)}))


if __name__ == "__main__":
    main()
