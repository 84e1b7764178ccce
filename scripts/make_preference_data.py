"""Build the quickstart's preference data: the maintainer's synopsis against the SFT model's own.

For the first rows of each split, the supervised quickstart adapter writes a synopsis
greedily (``lorakit eval``'s generation, so prompts render exactly as in training). A row
becomes a pair when that synopsis differs from the maintainer's: ``chosen`` is the
maintainer's, ``rejected`` the model's, and the pair records the model's ROUGE-1 against
the maintainer's. DPO on these pairs moves the model from what it writes now towards what
maintainers write.

    python scripts/make_preference_data.py runs/quickstart/adapter \\
        --train-rows 600 --validation-rows 100 --out configs/data/debian-synopsis-preference
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lorakit.evaluation import resolve_target, run_eval
from lorakit.metrics import score

SOURCE = Path("configs/data/debian-synopsis")


def pairs_for(adapter: str, split: str, rows: int, scratch: Path) -> tuple[list[dict], int]:
    """The split's first ``rows`` rows as preference pairs, and how many rows were kept."""
    source = SOURCE / f"{split}.jsonl"
    run_eval(resolve_target(adapter), ["rouge"], data_file=str(source), limit=rows, max_new_tokens=48,
             batch_size=16, output=scratch / split)
    originals = [json.loads(line) for line in source.read_text().splitlines()[:rows]]
    predictions = [json.loads(line) for line in (scratch / split / "predictions.jsonl").read_text().splitlines()]
    pairs = []
    for row, predicted in zip(originals, predictions):
        mine, theirs = predicted["prediction"].strip(), row["synopsis"]
        if not mine or mine == theirs:
            continue
        rouge1 = score("rouge", [mine], [theirs])["rouge1"]
        # The row's own fields stay, so supervised configs (completion_field: synopsis) read it too.
        pairs.append({**row, "chosen": theirs, "rejected": mine, "rejected_rouge1": round(rouge1, 4)})
    return pairs, len(originals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="the supervised quickstart adapter (runs/quickstart/adapter)")
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--validation-rows", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("configs/data/debian-synopsis-preference"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for split, rows in (("train", args.train_rows), ("validation", args.validation_rows)):
            pairs, seen = pairs_for(args.adapter, split, rows, Path(scratch))
            (args.out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            mean = sum(p["rejected_rouge1"] for p in pairs) / max(len(pairs), 1)
            print(f"{split}: {len(pairs)} pairs from {seen} rows; the model's ROUGE-1 on them {mean:.3f}")


if __name__ == "__main__":
    main()
