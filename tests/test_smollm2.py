"""The real embedded model: the quickstart config runs, and PEFT reads its adapter."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def test_quickstart_runs_a_few_steps_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(app, [
        "train", "configs/quickstart.yaml", "--set", "training.max_steps=2", "--set", "training.eval_every=2",
        "--set", "data.validation_limit=8", "--set", "training.batch_size=4", "--set", f"training.output_dir={out}",
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    peft = pytest.importorskip("peft")
    from lorakit import load_adapter
    from lorakit.config import ModelConfig
    from lorakit.model import load_model

    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    ours = load_adapter(load_model(ModelConfig(dtype="float32")), out / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(load_model(ModelConfig(dtype="float32")), out / "adapter").eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-4


def test_quickstart_chain_train_merge_eval(tmp_path, monkeypatch):
    """The README's first command, shortened: train → merge → eval with the base's scores."""
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    out = tmp_path / "chain"
    trained = runner.invoke(app, ["train", "configs/quickstart.yaml", "--set", "training.max_steps=1",
                                  "--set", "data.validation=null", "--set", "training.batch_size=2",
                                  "--set", f"training.output_dir={out}"])
    assert trained.exit_code == 0, trained.output
    merged = runner.invoke(app, ["merge", str(out / "adapter"), "--output", str(out / "merged")])
    assert merged.exit_code == 0 and "verified" in merged.output, merged.output
    scored = runner.invoke(app, ["eval", str(out / "merged"), "--data", "configs/data/debian-synopsis/validation.jsonl",
                                 "--limit", "2", "--max-new-tokens", "8", "--metric", "rouge", "--metric", "perplexity"])
    assert scored.exit_code == 0, scored.output
    metrics = json.loads((out / "merged" / "eval" / "metrics.json").read_text())
    assert metrics["rows"] == 2 and 0 <= metrics["model"]["rouge1"] <= 1 and metrics["model"]["perplexity"] > 1


def test_quickstart_dpo_starts_from_the_sft_adapter(tmp_path, monkeypatch):
    """configs/quickstart-dpo.yaml on its shipped pairs, from a (1-step) quickstart adapter:
    the start-up loss is log 2 (the reference is that adapter) and the adapter keeps its shape."""
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    sft = tmp_path / "sft"
    result = runner.invoke(app, ["train", "configs/quickstart.yaml", "--set", "training.max_steps=1", "--set",
                                 "data.validation=null", "--set", "training.batch_size=2", "--set",
                                 f"training.output_dir={sft}"])
    assert result.exit_code == 0, result.output
    dpo = tmp_path / "dpo"
    result = runner.invoke(app, ["train", "configs/quickstart-dpo.yaml", "--set", f"lora.init_from={sft / 'adapter'}",
                                 "--set", "training.max_steps=2", "--set", "training.batch_size=2", "--set",
                                 "data.validation_limit=4", "--set", "training.eval_every=2", "--set",
                                 f"training.output_dir={dpo}"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.6931, abs=2e-3) and "val_accuracy" in records[-1]
    sft_config = json.loads((sft / "adapter" / "adapter_config.json").read_text())
    dpo_config = json.loads((dpo / "adapter" / "adapter_config.json").read_text())
    assert (dpo_config["r"], dpo_config["target_modules"]) == (sft_config["r"], sft_config["target_modules"])


def test_the_readme_plan_command_runs_on_the_quickstart(monkeypatch):
    """``lorakit plan configs/quickstart.yaml --measure 1``, as the README gives it."""
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["plan", "configs/quickstart.yaml", "--measure", "1"])
    assert result.exit_code == 0, result.output
    assert "estimated peak" in result.output and "measured peak" in result.output
