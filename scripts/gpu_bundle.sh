#!/usr/bin/env bash
# For a GPU machine that has a CUDA build of torch but no network: everything else the GPU
# check needs (lorakit's dependencies at the versions this checkout is tested with, peft for
# the bench, the embedded SmolLM2), installed for that machine's Python into one folder,
# packed and cut into parts of at most 56 MB, so that each part can be copied on its own.
#     scripts/gpu_bundle.sh [OUT_DIR] [PYTHON_VERSION] [CUDA_MAJOR]   (default .gpu 3.12 13)
# On the GPU machine, in this checkout:
#     mkdir -p /tmp/lorakit-gpu && cat OUT_DIR/part-* | tar -xJ -C /tmp/lorakit-gpu
#     PYTHONPATH=/tmp/lorakit-gpu/site scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu}
PYV=${2:-3.12}
CUDA=${3:-13}
PY=${PY:-.venv/bin/python}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

# torch and what a CUDA image of it holds (numpy, pyarrow, tokenizers, huggingface_hub, ...)
# stay the machine's own.
NAMES='transformers|accelerate|peft|bitsandbytes|pydantic|pydantic.core|annotated.types'
NAMES+='|typing.inspection|defusedxml|datasets|dill|multiprocess|evaluate|gguf|nltk|typer|rich|llm.smollm2'
PINS=$($PY -m pip list --format=freeze | grep -i -E "^($NAMES)==")
# rouge-score publishes no wheel: build its (pure Python) one here
$PY -m pip wheel -q --no-deps -w "$STAGE/wheels" "$($PY -m pip list --format=freeze | grep -i '^rouge.score==')"
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086  # PINS is one requirement per word
$PY -m pip install -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${PLATFORMS[@]}" --target "$STAGE/site" $PINS "$STAGE"/wheels/*.whl
# bitsandbytes ships a kernel library per CUDA version (160 MB): keep the machine's and the CPU one
find "$STAGE/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda${CUDA}*" \
    ! -name 'libbitsandbytes_cpu.so' -delete
find "$STAGE/site" -name '__pycache__' -prune -exec rm -rf {} +
rm -rf "$OUT" && mkdir -p "$OUT"
tar -C "$STAGE" -c site | xz -T0 -6 | split -b 56m -d - "$OUT/part-"
ls -l "$OUT"
