"""lorakit plan: the memory estimate against measured peaks, the run's numbers, the command."""

import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from lorakit.cli import app
from lorakit.config import Config
from lorakit.data import IGNORE, build_examples
from lorakit.memory import LiveTensorBytes, estimate_memory, measure_peak
from lorakit.model import load_tokenizer
from lorakit.plan import make_plan
from lorakit.train import train

runner = CliRunner()


def test_live_tensor_bytes_counts_live_storages_once():
    with LiveTensorBytes() as counter:
        a = torch.zeros(1000)  # 4,000 bytes
        view = a[:10]  # a view shares the storage: not counted again
        b = a + 1
        assert counter.current == 8000
        del a, view, b
        assert counter.current == 0
        c = torch.ones(250, dtype=torch.float64)  # 2,000 bytes
    assert counter.peak == 8000 and counter.current == 2000 and c.numel() == 250


@pytest.mark.parametrize("setting", ["lora", "bfloat16", "checkpointing", "full", "qlora", "qlora-bfloat16",
                                     "shared-prefix"])
def test_estimate_is_within_15_percent_of_the_measured_peak(tmp_path, tiny_model_dir, setting):
    raw = tiny_config(tmp_path, tiny_model_dir)
    if setting == "shared-prefix":  # 46 leading tokens in every row, computed once per batch (lorakit.prefix)
        raw["data"].update(prompt_template="Add the two digits below and write their sum.\n{question}", max_length=96)
    if setting in ("checkpointing", "qlora"):
        raw["model"]["gradient_checkpointing"] = True
    if setting == "qlora":  # loading passes through full precision: not counted as training memory
        raw["model"]["quantization"] = {"bits": 4}
    if setting == "bfloat16":  # on the CPU: lorakit's attention backward, estimated on shapes alone as well
        raw["model"]["dtype"] = "bfloat16"
    if setting == "qlora-bfloat16":  # bfloat16 matmuls, float32 activations around them
        raw["model"]["quantization"] = {"bits": 4, "compute_dtype": "bfloat16"}
    if setting == "full":
        raw["method"] = "full"
    cfg = Config(**raw)
    estimate = make_plan(cfg).memory
    assert (estimate.shared_prefix >= 46) == (setting == "shared-prefix")  # the others share too little to pay
    measured = measure_peak(cfg, 2)
    assert 0.85 < estimate.total() / measured < 1.15, (estimate, measured)


def test_estimate_splits_memory_as_configured(tmp_path, tiny_model_dir):
    raw = tiny_config(tmp_path, tiny_model_dir)
    cfg = Config(**raw)
    lora = estimate_memory(cfg, 4, 32, 40)
    assert lora.adapters == lora.gradients == 4 * lora.trainable_params
    assert lora.optimizer == 2 * lora.adapters  # AdamW: two float32 states per parameter
    assert lora.activations_checkpointed < lora.activations
    assert estimate_memory(cfg, 8, 32, 40).activations > 1.5 * lora.activations  # twice the batch
    raw["model"]["quantization"] = {"bits": 4}
    raw["training"]["optimizer"] = "adamw_8bit"
    qlora = estimate_memory(Config(**raw), 4, 32, 40)
    assert qlora.weights < lora.weights / 2 and qlora.optimizer < lora.optimizer / 3
    raw["method"] = "full"
    raw["model"]["quantization"] = None
    full = estimate_memory(Config(**raw), 4, 32, 40)
    assert full.weights == 0 and full.adapters == lora.weights + lora.adapters - 4 * lora.trainable_params


def test_plan_numbers_match_what_training_does(tmp_path, tiny_model_dir):
    cfg = Config(**tiny_config(tmp_path, tiny_model_dir, max_steps=None, epochs=2, grad_accum=2))
    plan = make_plan(cfg)
    examples = build_examples(cfg.data, load_tokenizer(cfg.model))
    assert plan.examples == len(examples)
    assert plan.tokens_per_epoch == sum(len(e["input_ids"]) for e in examples)
    assert plan.trained_tokens_per_epoch == sum(sum(x != IGNORE for x in e["labels"][1:]) for e in examples)
    assert plan.effective_batch == 8 and plan.steps_per_epoch == len(examples) // 8
    run = train(cfg)
    assert plan.steps == run.steps == 2 * plan.steps_per_epoch
    assert plan.memory.trainable_params == run.trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # r=4, q and v


def test_plan_command_prints_estimate_and_measurement(tmp_path, tiny_model_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tiny_model_dir)))
    result = runner.invoke(app, ["plan", str(path), "--measure", "1", "--num-processes", "2"])
    assert result.exit_code == 0, result.output
    for text in ("trainable of", "tokens per epoch", "8 = 4 × 1 accumulation × 2", "activations",
                 "estimated peak", "measured peak", "estimate/measured"):
        assert text in result.output
    assert not (tmp_path / "run").exists()  # measuring writes nothing into the run's output_dir
    shared = runner.invoke(app, ["plan", str(path), "--set", "data.max_length=96", "--set",
                                 "data.prompt_template=Add the two digits below and write their sum.\\n{question}"])
    assert shared.exit_code == 0, shared.output
    assert re.search(r"× \d+ tokens \(shared prefix: 4[67]\)", shared.output)
    bad = runner.invoke(app, ["plan", str(path), "--set", "training.batch_size=0"])
    assert bad.exit_code == 2 and "training.batch_size" in bad.output
    (tmp_path / "odd.jsonl").write_text('{"text": "no question field"}\n')
    unusable = runner.invoke(app, ["plan", str(path), "--set", f"data.train={tmp_path}/odd.jsonl"])
    assert unusable.exit_code == 2 and "odd.jsonl" in unusable.output and "question" in unusable.output


def test_plan_estimates_and_measures_runs_with_dropout(tmp_path, tiny_model_dir):
    """lorakit's dropout draws its masks from real data; the estimate traces shapes only."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tiny_model_dir)))
    result = runner.invoke(app, ["plan", str(path), "--set", "lora.dropout=0.1", "--measure", "1"])
    assert result.exit_code == 0, result.output
    assert "estimated peak" in result.output and "measured peak" in result.output
    raw = tiny_config(tmp_path, tiny_model_dir)
    without = estimate_memory(Config(**raw), 4, 32, 40)
    raw["lora"]["dropout"] = 0.1
    dropped = estimate_memory(Config(**raw), 4, 32, 40)
    # the adapter keeps its input and the mask's seed, not a dropped copy and a mask
    assert without.activations <= dropped.activations <= 1.05 * without.activations
