"""What lorakit guarantees beyond clean refusals: exact loading, exact resume, atomic
writes, the step's loss over all its tokens, and no silent change to what is not adapted."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import build, logits, randomize_lora, tiny_config
from lorakit import LoraConfig, add_lora, load_adapter, save_adapter, unload_lora
from lorakit.peft_config import _IMPLEMENTED, _METADATA, _NOT_IMPLEMENTED
from lorakit.cli import app
from lorakit.config import validate_config
from lorakit.errors import TrainingInterrupted
from lorakit.files import atomic_directory, recover_directory
from lorakit.inject import lora_modules, merge_lora
from lorakit.train import train

peft = pytest.importorskip("peft")
runner = CliRunner()


def _run(raw, **kw):
    return train(validate_config(raw, "test"), **kw)


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_every_peft_setting_is_classified():
    """A new PEFT key must be decided on (implemented, metadata, or refused unless off)."""
    known = _IMPLEMENTED | _METADATA | set(_NOT_IMPLEMENTED)
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - known == set(), "PEFT keys lorakit has not classified"


def test_exclude_modules_loads_exactly_as_peft(ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             exclude_modules=["model.layers.0.self_attn.q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(build("llama"), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "a")
    ours = load_adapter(build("llama"), tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj" not in lora_modules(ours) and len(lora_modules(ours)) == 3
    assert (logits(ours, ids) - logits(theirs.eval(), ids)).abs().max() <= 1e-5


def test_adapter_config_is_the_one_description(ids, tmp_path):
    """An edited lora_alpha in adapter_config.json is what loads and what inspect prints,
    whatever an old lorakit side file says."""
    model = add_lora(build("llama"), LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "lorakit_adapter.json").write_text(json.dumps({"r": 4, "alpha": 8.0}))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["lora_alpha"] = 16
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    ours = load_adapter(build("llama"), tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a").eval()
    assert all(m.scaling == 4.0 for m in lora_modules(ours).values())
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5
    shown = runner.invoke(app, ["inspect", str(tmp_path / "a")])
    assert shown.exit_code == 0 and "alpha=16, scaling=4" in shown.output


def test_refused_adapter_leaves_the_model_untouched(tmp_path):
    model = add_lora(build("gpt2"), LoraConfig(r=2, target_modules=["q", "v"]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("c_attn.lora_B.weight"))
    state[key] = torch.randn_like(state[key])  # retrained elsewhere: no longer block-structured
    from safetensors.torch import save_file

    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    target = add_lora(build("gpt2"), LoraConfig(r=2, target_modules=["q", "v"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(Exception, match="not block-structured"):
        load_adapter(target, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    # On a model without LoRA layers it loads as the plain rank-4 LoRA PEFT also sees.
    assert load_adapter(build("gpt2"), tmp_path / "a") is not None


def test_lora_on_a_tied_head_never_moves_the_embeddings(ids):
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    embeddings = model.transformer.wte.weight.detach().clone()
    add_lora(model, LoraConfig(r=4, target_modules=["lm_head"]))
    randomize_lora(model)
    expected = logits(model, ids)
    merge_lora(model)
    assert torch.equal(model.transformer.wte.weight, embeddings)
    assert (logits(model, ids) - expected).abs().max() <= 1e-5
    plain = unload_lora(model)
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.transformer.wte.weight, embeddings)


def test_merge_with_one_weighted_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    result = runner.invoke(app, ["merge", str(tmp_path / "a"), "-o", str(tmp_path / "m"), "--base", tiny_model_dir,
                                 "--weights", "0.5"])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.mul_(0.5)
    ids = torch.randint(3, 200, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (logits(merged, ids) - logits(model, ids)).abs().max() <= 1e-4


def test_atomic_directory_survives_a_kill_between_renames(tmp_path):
    final = tmp_path / "adapter"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    # A kill after the old version moved aside and before the new one arrived:
    os.replace(final, tmp_path / ".adapter.old")
    (tmp_path / ".adapter.tmp").mkdir()
    (tmp_path / ".adapter.tmp" / "v").write_text("half")
    recover_directory(final)
    assert (final / "v").read_text() == "1" and not (tmp_path / ".adapter.tmp").exists()
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (final / "v").read_text() == "1" and not list(tmp_path.glob(".adapter.*"))


def test_step_loss_is_the_mean_over_all_its_tokens(tiny_model_dir, tmp_path):
    """grad_accum micro-batches with unequal label counts train exactly like one batch."""
    rows = [{"question": f"{i}+{i}=", "answer": str(i * 7919)[: 1 + i % 4]} for i in range(64)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for name, batch, accum in (("whole", 8, 1), ("split", 4, 2)):
        raw = tiny_config(tmp_path, tiny_model_dir, max_steps=3, batch_size=batch, grad_accum=accum,
                          output_dir=str(tmp_path / name))
        raw["data"].update(train=str(data), group_by_length=False)
        runs[name] = _run(raw)
    whole, split = _adapter(tmp_path / "whole"), _adapter(tmp_path / "split")
    assert all(torch.allclose(whole[k], split[k], atol=1e-6) for k in whole)
    losses = [[r["loss"] for r in runs[n].history if "loss" in r] for n in ("whole", "split")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def _hooked_head(monkeypatch, interrupt_at: int | None) -> None:
    """Every run of a comparison gets the same hook on the head (a hooked head takes the
    direct loss formula); one of them also sends itself Ctrl-C at a given forward call."""
    import lorakit.train as train_module

    real = train_module.load_model
    calls = {"n": 0}

    def load(cfg, device):
        model = real(cfg, device)

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == interrupt_at:
                    os.kill(os.getpid(), signal.SIGINT)
            return output

        model.lm_head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "load_model", load)


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=8, grad_accum=2, output_dir=str(tmp_path / "whole"))
    raw["lora"]["dropout"] = 0.2  # masks drawn from the RNG: resume must restore it as the step began
    _hooked_head(monkeypatch, None)
    _run(raw)
    reference = _adapter(tmp_path / "whole")
    _hooked_head(monkeypatch, 7)  # mid-step 4 (micro-batches 7 and 8)
    raw["training"]["output_dir"] = str(tmp_path / "stopped")
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4"):
        _run(raw)
    _hooked_head(monkeypatch, None)
    assert _run(raw, resume=True).steps == 8
    resumed = _adapter(tmp_path / "stopped")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_resume_falls_back_past_a_damaged_checkpoint(tiny_model_dir, tmp_path, caplog):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=6, save_every=2, keep_checkpoints=3)
    _run(raw)
    reference = _adapter(tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step-6" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    raw["training"]["max_steps"] = 6
    result = _run(raw, resume=True)
    assert result.steps == 6 and "step-6 is damaged" in caplog.text and "optimizer.safetensors" in caplog.text
    resumed = _adapter(tmp_path / "run")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)  # redone from step 4, exactly


def test_recovery_settings_may_change_on_resume_and_are_recorded(tiny_model_dir, tmp_path, caplog):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_every=2)
    _run(raw)
    raw["training"].update(lr=1e-3, max_grad_norm=0.5, max_steps=6)
    (tmp_path / "run" / "adapter").rename(tmp_path / "first")
    result = _run(raw, resume=True)
    assert result.steps == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if "resumed_with" in r]
    assert resumed and resumed[0]["resumed_with"]["lr"] == [1e-2, 1e-3] and "max_steps" in resumed[0]["resumed_with"]
    assert "training.lr changed" in caplog.text and "schedule is now laid over the new length" in caplog.text
    lrs = [r["lr"] for r in records if "lr" in r and r["step"] > 4]
    assert lrs and max(lrs) <= 1e-3


def test_changed_training_data_is_reported_on_resume(tiny_model_dir, tmp_path, caplog):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_every=2)
    _run(raw)
    with open(raw["data"]["train"], "a") as f:
        f.write(json.dumps({"question": "9+9=", "answer": "18"}) + "\n")
    raw["training"]["max_steps"] = 4
    (tmp_path / "run" / "adapter").rename(tmp_path / "first")
    _run(raw, resume=True)
    assert "the training data changed since the checkpoint (64 examples" in caplog.text


def test_non_finite_weights_are_never_checkpointed(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.train as train_module

    class Poisoning(torch.optim.AdamW):
        def step(self, closure=None):
            super().step(closure)
            self.count = getattr(self, "count", 0) + 1
            if self.count == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("nan"))

    monkeypatch.setattr(train_module, "_build_optimizer",
                        lambda model, t: Poisoning([p for p in model.parameters() if p.requires_grad], lr=t.lr))
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=6, save_every=1)
    with pytest.raises(Exception, match="NaN or infinite|loss became nan"):
        _run(raw)
    from lorakit.checkpoint import list_checkpoints

    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and saved[-1].name == "step-2"


def test_a_planted_pickle_in_a_checkpoint_never_runs(tiny_model_dir, tmp_path):
    """Checkpoints hold no pickle (safetensors and JSON only), and a pickle planted in one,
    under the old optimizer.pt name or the new file's, is refused without running."""
    import hashlib
    import pickle

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_every=2)
    _run(raw)
    step = tmp_path / "run" / "checkpoints" / "step-2"
    assert {p.suffix for p in step.rglob("*") if p.is_file()} == {".safetensors", ".json"}
    marker = tmp_path / "pwned.marker"

    class Plant:
        def __reduce__(self):
            return (Path.touch, (marker,))

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    for name, says in [("optimizer.safetensors", "optimizer.safetensors: not lorakit's optimizer state"),
                       ("optimizer.pt", "optimizer.pt is a pickle, which lorakit no longer loads")]:
        (step / "optimizer.safetensors").unlink(missing_ok=True)
        (step / name).write_bytes(pickle.dumps(Plant()))
        state = json.loads((step / "state.json").read_text())  # a forger updates the checksum too
        state["files"].pop("optimizer.safetensors", None)
        state["files"][name] = hashlib.sha256((step / name).read_bytes()).hexdigest()
        (step / "state.json").write_text(json.dumps(state))
        result = runner.invoke(app, ["train", str(config), "--resume"])
        assert result.exit_code == 2 and says in result.output, result.output
        assert not marker.exists()


def test_lazy_cli_imports_neither_torch_nor_transformers():
    import subprocess

    code = ("import sys; from typer.testing import CliRunner; from lorakit.cli import app; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0; "
            "import lorakit; lorakit.__version__; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_show_imports_no_torch(tmp_path):
    import subprocess

    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"train": str(tmp_path / "t.jsonl")},
                                                     "training": {"max_steps": 1}}))
    code = ("import sys; from lorakit.cli import main\ntry:\n    main(['config', 'show', sys.argv[1]])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.yaml")], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_import_direction():
    """cli → orchestrators → components; config, errors and the math import no HF/Accelerate;
    nothing imports cli."""
    import ast

    root = Path(__file__).parent.parent / "lorakit"
    imports = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        imports[path.stem] = names
    assert not any("lorakit.cli" in names for stem, names in imports.items() if stem not in ("cli", "__main__"))
    heavy = ("transformers", "accelerate", "datasets", "peft")
    for light in ("config", "errors", "inputs", "lora", "fastpath", "files"):
        assert not any(n.split(".")[0] in heavy for n in imports[light]), light
    for light in ("config", "errors", "inputs", "files"):
        assert "torch" not in {n.split(".")[0] for n in imports[light]}, light
    assert not any(n.split(".")[0] == "peft" for names in imports.values() for n in names)  # a test peer only


def test_peft_lora_on_embeddings_is_refused_by_name(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    peft.get_peft_model(build("llama"), config).save_pretrained(tmp_path / "a")
    model = build("llama")
    with pytest.raises(Exception, match="LoRA on embeddings is not supported"):
        load_adapter(model, tmp_path / "a")
    assert not lora_modules(model)


def test_resume_keeps_the_metrics_a_killed_run_left(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4, save_every=2)
    _run(raw)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "loss": 1.2')  # a half-written last line
    (tmp_path / "run" / "adapter").rename(tmp_path / "first")
    raw["training"]["max_steps"] = 6
    _run(raw, resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_loraplus_moves_b_ratio_times_faster(tiny_model_dir, tmp_path):
    """LoRA+: at the first step A has no gradient (B is zero) and B's AdamW step is lr·sign(g),
    so B ends exactly ratio times further than without LoRA+."""
    runs = {}
    for name, ratio in (("plain", None), ("plus", 4.0)):
        raw = tiny_config(tmp_path, tiny_model_dir, max_steps=1, scheduler="constant", output_dir=str(tmp_path / name),
                          loraplus_lr_ratio=ratio, max_grad_norm=None)
        result = _run(raw)
        runs[name] = _adapter(tmp_path / name)
    for key, plain in runs["plain"].items():
        plus = runs["plus"][key]
        if key.endswith("lora_A.weight"):
            assert torch.equal(plain, plus)
        else:
            moved = plain.abs() > 1e-6
            assert moved.any() and torch.allclose(plus[moved], 4 * plain[moved], rtol=1e-3)
    assert result.steps == 1


def test_loraplus_is_refused_for_full_fine_tuning(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir, loraplus_lr_ratio=8.0)
    raw["method"] = "full"
    del raw["lora"]
    with pytest.raises(Exception, match="training.loraplus_lr_ratio"):
        validate_config(raw, "test")


def test_rank_and_alpha_patterns_save_as_peft_reads_them(ids, tmp_path):
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\..*q_proj": 2},
                        alpha_pattern={"v_proj": 3.0})
    ours = add_lora(build("llama"), config)
    modules = lora_modules(ours)
    assert modules["model.layers.1.self_attn.q_proj"].r == 2 and modules["model.layers.0.self_attn.q_proj"].r == 4
    assert modules["model.layers.0.self_attn.v_proj"].alpha == 3.0
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a").eval()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5
    back = load_adapter(build("llama"), tmp_path / "a")
    assert (logits(ours, ids) - logits(back, ids)).abs().max() <= 1e-6
    shown = runner.invoke(app, ["inspect", str(tmp_path / "a")])
    assert shown.exit_code == 0 and "│ 2 " in shown.output


def test_dtype_auto_picks_bfloat16_only_where_it_is_fast(monkeypatch):
    import lorakit.model as model_module
    from lorakit.config import ModelConfig
    from lorakit.model import resolve_dtype

    monkeypatch.setattr(model_module, "bf16_is_fast", lambda: True)
    assert resolve_dtype(ModelConfig()) == torch.bfloat16
    assert resolve_dtype(ModelConfig(), trains_whole_weights=True) == torch.float32  # biases, full FT: float32
    assert resolve_dtype(ModelConfig(dtype="float32")) == torch.float32  # an explicit dtype is kept
    assert resolve_dtype(ModelConfig(quantization={"bits": 4})) == torch.float32  # quantized from the originals
    monkeypatch.setattr(model_module, "bf16_is_fast", lambda: False)
    assert resolve_dtype(ModelConfig()) == torch.float32


def test_qlora_compute_dtype_auto_follows_the_model_dtype(monkeypatch):
    import lorakit.model as model_module
    from lorakit.config import ModelConfig
    from lorakit.model import quantization_config, quantized_compute_dtype

    def compute(fast: bool, **model) -> torch.dtype:
        monkeypatch.setattr(model_module, "bf16_is_fast", lambda: fast)
        cfg = ModelConfig(**model)
        dtype = quantized_compute_dtype(cfg)
        assert quantization_config(cfg).bnb_4bit_compute_dtype == dtype  # what bitsandbytes is given
        return dtype

    four = {"bits": 4}
    assert compute(True, quantization=four) == torch.bfloat16
    assert compute(False, quantization=four) == torch.float32
    assert compute(True, quantization=four, dtype="float32") == torch.float32  # float32 turns it off
    assert compute(False, quantization=four, dtype="bfloat16") == torch.bfloat16
    assert compute(True, quantization={"bits": 4, "compute_dtype": "float32"}) == torch.float32  # explicit: kept
    assert compute(False, quantization={"bits": 4, "compute_dtype": "float16"}) == torch.float16


def test_auto_trains_a_bfloat16_base_with_float32_adapters(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.model as model_module

    import lorakit.train as train_module

    monkeypatch.setattr(model_module, "bf16_is_fast", lambda: True)
    loaded, real = [], train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda cfg, device: loaded.append(real(cfg, device)) or loaded[-1])
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=3)
    raw["model"]["dtype"] = "auto"
    result = _run(raw)
    assert loaded[0].get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(r["loss"] == r["loss"] for r in result.history if "loss" in r)  # finite
    assert all(t.dtype == torch.float32 for t in _adapter(tmp_path / "run").values())  # master weights
    raw["lora"]["bias"] = "all"
    raw["training"]["output_dir"] = str(tmp_path / "bias")
    cfg = validate_config(raw, "test")
    assert cfg.trains_whole_weights and model_module.resolve_dtype(cfg.model, True) == torch.float32


def test_modules_to_save_containers_train_and_save_every_weight_inside(ids, tmp_path):
    ours = add_lora(build("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["mlp"]))
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.gate_proj.weight" in trained and "model.layers.1.mlp.down_proj.weight" in trained
    randomize_lora(ours)
    with torch.no_grad():
        ours.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {f"base_model.model.{n}" for n in trained} == set(saved)  # everything that trains is saved
    back = load_adapter(build("llama"), tmp_path / "a")
    assert (logits(back, ids) - logits(ours, ids)).abs().max() <= 1e-6
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a").eval()
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= 1e-5


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    """eval's metrics.json and predictions.jsonl, sweep.json and a resumed run's metrics.jsonl
    are written this way: a failure (or a kill) mid-write leaves the previous file."""
    from lorakit.files import atomic_file

    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_a_second_run_into_the_same_output_dir_is_refused(tiny_model_dir, tmp_path):
    """Two runs in one output_dir would interleave checkpoints and adapters; the second is
    refused while the first holds the directory, and runs once it is free."""
    from lorakit.files import exclusive

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, tiny_model_dir, max_steps=1)))
    with exclusive(tmp_path / "run", "training.output_dir"):  # as a run in another process holds it
        result = runner.invoke(app, ["train", str(config)])
        assert result.exit_code == 2, result.output
        assert "training.output_dir: another lorakit process is writing to" in result.output
        assert not (tmp_path / "run" / "adapter").exists()
        sweep = runner.invoke(app, ["sweep", str(config), "--grid", "lora.r=2,4"])
        assert sweep.exit_code == 0, sweep.output  # a sweep writes elsewhere (output_dir/sweep)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0 and (tmp_path / "run" / "adapter").is_dir(), result.output


def test_a_run_names_its_base_and_data_by_absolute_path(tiny_model_dir, tmp_path, monkeypatch):
    """A run configured with relative paths records them absolute (adapter_config.json and
    the saved config): eval from another directory, where the same relative names hold
    another model and other data, still uses the run's own."""
    import shutil

    from lorakit.evaluation import resolve_target

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    shutil.copytree(tiny_model_dir, here / "m")
    raw = tiny_config(here, "m", max_steps=1)
    for key in ("train", "validation"):
        raw["data"][key] = Path(raw["data"][key]).name
        (elsewhere / raw["data"][key]).write_text('{"question": "other", "answer": "data"}\n')
    monkeypatch.chdir(here)
    _run(raw)
    adapter = here / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(here / "m")
    monkeypatch.chdir(elsewhere)
    (elsewhere / "m").mkdir()  # another "m" here
    target = resolve_target(str(adapter))
    assert target.model.name_or_path == str(here / "m")
    assert target.data.validation == str(here / raw["data"]["validation"])


def test_overwrite_and_force_replace_what_lorakit_wrote_and_nothing_else(tiny_model_dir, tmp_path):
    """Rerunning train → eval → merge → eval (the demo) replaces lorakit's own outputs,
    eval's scores inside the adapter and merged model included; a file of the user's
    inside them stops the replacement, by name."""
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    eval_args = ["--limit", "1", "--max-new-tokens", "1"]
    for command in (["train", str(config), "--overwrite"], ["eval", str(run / "adapter"), *eval_args],
                    ["merge", str(run / "adapter"), "-o", str(run / "merged"), "--force"],
                    ["eval", str(run / "merged"), *eval_args]) * 2:
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
    assert (run / "adapter" / "eval" / "metrics.json").is_file() and (run / "merged" / "eval" / "metrics.json").is_file()
    (run / "merged" / "eval" / "mine.txt").write_text("keep")
    result = runner.invoke(app, ["merge", str(run / "adapter"), "-o", str(run / "merged"), "--force"])
    assert result.exit_code == 2 and "lorakit did not write" in result.output
    assert (run / "merged" / "eval" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("edit, says", [
    ({"step": 10**15}, "step 1000000000000000 in a directory named step-2"),
    ({"step": -5}, "step -5 in a directory named step-2"),
    ({"processes": 0}, "processes 0"),
    ({"scheduler": {"x": 1}}, "schedule does not stand at its step"),
])
def test_a_checkpoint_state_that_contradicts_itself_is_refused(tiny_model_dir, tmp_path, edit, says):
    """state.json is not covered by its own checksums: a step that is not its directory's
    (a run 'resumed' past its end and finished silently) or a schedule elsewhere is refused."""
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_every=2)
    _run(raw)
    state_file = tmp_path / "run" / "checkpoints" / "step-2" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), **edit}))
    raw["training"]["max_steps"] = 4
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(config), "--resume"])
    assert result.exit_code == 2 and says in result.output and "unexpected" not in result.output, result.output


@pytest.mark.parametrize("manifest", ['"thesis.txt"', '{"thesis.txt": 1}', "[1, 2]", "not json"])
def test_a_malformed_file_list_protects_nothing_less(tmp_path, manifest):
    """A directory's .lorakit-files.json that is not a list of names counts as absent: only
    lorakit's own file names may then be replaced (a string must not list its letters)."""
    from lorakit.files import MANIFEST, foreign_entries

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "thesis.txt").write_text("mine")
    (tmp_path / MANIFEST).write_text(manifest)
    assert foreign_entries(tmp_path) == ["thesis.txt"]
