"""End-to-end training on a tiny on-disk model: loss, outputs, determinism, resume, guards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from lorakit import load_adapter
from lorakit.config import validate_config
from lorakit.errors import DataError, InputError, ResumeError
from lorakit.train import TrainingError, TrainingInterrupted, train

ADAPTER = "adapter_model.safetensors"


def _run(raw, resume=False):
    return train(validate_config(raw, "test"), resume=resume)


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "adapter", ADAPTER))


def test_loss_falls_and_outputs_are_written(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=12, eval_every=6, save_every=6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    result = _run(raw)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    out = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/" + ADAPTER, "adapter/training_config.yaml",
                 "metrics.jsonl", "loss.png", "checkpoints/step-6/optimizer.safetensors", "checkpoints/step-12/state.json"):
        assert (out / name).is_file(), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [6, 12]
    saved = yaml.safe_load((out / "adapter/training_config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["data"]["completion_field"] == "answer"
    # The frozen base is untouched: loading the adapter onto a fresh base equals training's result.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    load_adapter(model, out / "adapter")
    assert any(v.abs().sum() > 0 for k, v in _adapter(out).items() if "lora_B" in k)


def test_same_config_twice_gives_the_same_adapter_bit_for_bit(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, grad_accum=2)
    raw["lora"]["dropout"] = 0.1
    _run(raw)
    first = _adapter(tmp_path / "run")
    raw["training"]["output_dir"] = str(tmp_path / "again")
    _run(raw)
    second = _adapter(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_after_kill_9_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=300, save_every=5, grad_accum=2)
    raw["lora"]["dropout"] = 0.1  # resume must restore the RNG too
    _run(raw)
    reference = _adapter(tmp_path / "run")

    raw["training"]["output_dir"] = str(tmp_path / "killed")
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"

    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming at" in done.stderr
    resumed = _adapter(tmp_path / "killed")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 301))  # no step logged twice


def test_resume_refuses_a_changed_config(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_every=2)
    _run(raw)
    raw["lora"]["r"] = 8
    raw["training"]["max_steps"] = 4
    with pytest.raises(ResumeError, match=r"config changed \(lora\.r: 4 in the checkpoint, 8 now\)"):
        _run(raw, resume=True)
    raw["training"]["output_dir"] = str(tmp_path / "empty")
    with pytest.raises(InputError, match="no complete checkpoint"):
        _run(raw, resume=True)


def _poison(monkeypatch, after: int, action):
    """Make the model's forward misbehave from its ``after``-th training call on."""
    import lorakit.train as train_module

    real = train_module.load_model

    def load(cfg, device):
        model = real(cfg, device)
        calls = {"n": 0}

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > after:
                    return action(output)
            return output

        model.lm_head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "load_model", load)


def test_nan_loss_stops_naming_the_step(tiny_model_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, after=3, action=lambda out: out * float("nan"))
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=6, save_every=2)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4; the last good checkpoint is .*step-2"):
        _run(raw)
    assert not (tmp_path / "run" / "adapter").exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_model_dir, tmp_path, monkeypatch):
    def interrupt(_):
        raise KeyboardInterrupt

    _poison(monkeypatch, after=3, action=interrupt)
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=6)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3; checkpoint saved"):
        _run(raw)
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "state.json").is_file()
    monkeypatch.undo()
    result = _run(raw, resume=True)
    assert result.steps == 6


def test_an_earlier_run_is_never_silently_replaced(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_every=1)
    _run(raw)
    before = _adapter(tmp_path / "run")
    with pytest.raises(InputError, match="already holds a run; continue it with --resume"):
        _run(raw)
    assert all(torch.equal(before[k], v) for k, v in _adapter(tmp_path / "run").items())
    raw["training"]["max_steps"] = 1
    train(validate_config(raw, "test"), overwrite=True)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-1"]


def test_too_little_data_is_an_error(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, batch_size=1000)
    with pytest.raises(DataError, match="fewer than one batch"):
        _run(raw)


def test_qlora_end_to_end(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=12)
    raw["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    result = _run(raw)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    from lorakit.config import ModelConfig
    from lorakit.model import load_model

    ids = torch.randint(3, 200, (2, 12))
    quantized = load_model(ModelConfig(name_or_path=tiny_model_dir, quantization={"bits": 4}))
    load_adapter(quantized, tmp_path / "run" / "adapter")
    again = load_model(ModelConfig(name_or_path=tiny_model_dir, quantization={"bits": 4}))
    load_adapter(again, tmp_path / "run" / "adapter")
    with torch.no_grad():
        a, b = quantized(input_ids=ids).logits, again(input_ids=ids).logits
        plain = load_model(ModelConfig(name_or_path=tiny_model_dir, quantization={"bits": 4}))(input_ids=ids).logits
    assert torch.equal(a, b)
    assert (a - plain).abs().max() > 1e-4  # the adapter changes the 4-bit model's output


def test_gradient_checkpointing_still_trains_every_adapter(tiny_model_dir):
    from lorakit import LoraConfig, add_lora
    from lorakit.config import ModelConfig
    from lorakit.inject import lora_modules
    from lorakit.model import load_model

    model = load_model(ModelConfig(name_or_path=tiny_model_dir, gradient_checkpointing=True))
    assert model.is_activation_checkpointing
    add_lora(model, LoraConfig(dropout=0.0)).train()
    ids = torch.randint(3, 200, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [m.lora_B.weight.grad for m in lora_modules(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(tiny_model_dir):
    """The recomputed forward redraws the same dropout masks (their seeds come from torch's
    RNG, which checkpointing restores), so checkpointing changes memory, not gradients."""
    from lorakit import LoraConfig, add_lora
    from lorakit.config import ModelConfig
    from lorakit.inject import lora_modules
    from lorakit.model import load_model

    ids = torch.randint(3, 200, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = load_model(ModelConfig(name_or_path=tiny_model_dir, gradient_checkpointing=checkpointing))
        torch.manual_seed(0)
        add_lora(model, LoraConfig(dropout=0.3, target_modules="all-linear")).train()
        for module in lora_modules(model).values():
            torch.nn.init.normal_(module.lora_B.weight, std=0.1)
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_validation_rows_found_in_the_training_data_are_warned_about(tiny_model_dir, tmp_path, caplog):
    from conftest import write_jsonl

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=1)
    train_rows = [json.loads(line) for line in open(raw["data"]["train"])]
    raw["data"]["validation"] = write_jsonl(tmp_path / "v.jsonl", train_rows[:3] + [{"question": "9+9+9=", "answer": "x"}])
    with caplog.at_level("WARNING", logger="lorakit"):
        _run(raw)
    assert "data.validation: 3 of its 4 examples also appear in data.train" in caplog.text
    caplog.clear()
    raw["data"]["validation"] = write_jsonl(tmp_path / "w.jsonl", [{"question": "9+9+9=", "answer": "x"}])
    raw["training"]["output_dir"] = str(tmp_path / "run2")
    with caplog.at_level("WARNING", logger="lorakit"):
        _run(raw)
    assert "also appear in data.train" not in caplog.text


def test_tensorboard_mirror_when_installed(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    _run(tiny_config(tmp_path, tiny_model_dir, max_steps=2))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_full_fine_tuning_mode(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_every=2)
    raw["method"] = "full"
    del raw["lora"]  # full fine-tuning has no adapters: a lora section with it is refused
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    result = _run(raw)
    assert result.adapter_dir == tmp_path / "run" / "model"
    tuned = AutoModelForCausalLM.from_pretrained(result.adapter_dir)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base[k])]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert (result.adapter_dir / "training_config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-4" / "model.safetensors").is_file()
    raw["training"]["max_steps"] = 6
    assert _run(raw, resume=True).steps == 6  # full-model checkpoints resume too


def test_packing_trains_on_fewer_longer_rows(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4)
    raw["data"]["packing"] = True
    result = _run(raw)
    records = [r for r in result.history if "tokens" in r]
    # 64 arithmetic rows of ~6 tokens packed into rows of up to 32: each batch of 4 rows holds ~20 examples
    assert all(r["tokens"] > 4 * 6 * 3 for r in records)
    assert sum(r["loss"] for r in records[-2:]) < sum(r["loss"] for r in records[:2])


def test_eight_bit_adamw_runs_and_resumes_exactly_on_cpu(tiny_model_dir, tmp_path):
    """Its state nests dicts of tensors and shares quantization maps between parameters;
    checkpoints still store it as safetensors, and resuming from one is bit for bit."""
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_every=2, optimizer="adamw_8bit")
    assert _run(raw).steps == 4
    whole = _adapter(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    assert _run(raw, resume=True).steps == 4
    resumed = _adapter(tmp_path / "run")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_eight_bit_base_trains_and_refuses_in_place_merge(tiny_model_dir, tmp_path):
    from lorakit import LoraError, merge_lora
    from lorakit.config import ModelConfig
    from lorakit.model import load_model

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=3)
    raw["model"]["quantization"] = {"bits": 8}
    assert _run(raw).steps == 3
    model = load_adapter(load_model(ModelConfig(name_or_path=tiny_model_dir, quantization={"bits": 8})),
                         tmp_path / "run" / "adapter")
    with pytest.raises(LoraError, match="8-bit base"):
        merge_lora(model)


def test_compiled_run_matches_the_eager_run(tiny_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=3)
    raw["lora"]["target_modules"] = "all-linear"
    eager = _run(raw)
    raw["training"].update(compile=True, output_dir=str(tmp_path / "compiled"))
    counters.clear()
    compiled = _run(raw)
    # It compiled, without a graph break, and the blocks share their graphs (a block's input
    # with and without gradient, at a static and then a dynamic length) instead of one each.
    assert 1 <= counters["stats"]["unique_graphs"] <= 4 and not counters["graph_break"]
    losses = [[r["loss"] for r in result.history if "loss" in r] for result in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    first, second = _adapter(tmp_path / "run"), _adapter(tmp_path / "compiled")
    assert first.keys() == second.keys()
    # Adam turns float-rounding differences in near-zero gradients into lr-sized steps for a
    # few elements; the factors are ~0.1 in size.
    assert all(torch.allclose(first[k], second[k], atol=1e-4) for k in first)
    assert any(v.abs().sum() > 0 for k, v in second.items() if "lora_B" in k)


def test_compile_refuses_a_model_without_named_blocks(tiny_model_dir):
    from lorakit.config import ModelConfig
    from lorakit.errors import ModelLoadError
    from lorakit.model import compile_blocks, load_model

    model = load_model(ModelConfig(name_or_path=tiny_model_dir))
    model._no_split_modules = None
    with pytest.raises(ModelLoadError, match="training.compile: .*_no_split_modules"):
        compile_blocks(model)


def test_a_warmup_as_long_as_the_run_is_warned_about(tiny_model_dir, tmp_path, caplog):
    _run(tiny_config(tmp_path, tiny_model_dir, max_steps=2, warmup_steps=2))
    assert "warmup_steps (2) is not below the run's 2 steps" in caplog.text
    caplog.clear()
    _run(tiny_config(tmp_path, tiny_model_dir, max_steps=2, warmup_steps=1, output_dir=str(tmp_path / "b")))
    assert "warmup_steps" not in caplog.text


def test_whole_weights_trained_in_bfloat16_are_warned_about(tiny_model_dir, tmp_path, caplog):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=1)
    raw["model"]["dtype"], raw["lora"]["bias"] = "bfloat16", "all"
    _run(raw)
    assert "model.dtype: bfloat16 with whole weights to train" in caplog.text
    caplog.clear()
    raw["model"]["dtype"], raw["training"]["output_dir"] = "auto", str(tmp_path / "auto")
    _run(raw)  # auto keeps whole weights in float32
    assert "whole weights" not in caplog.text
