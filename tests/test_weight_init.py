"""PiSSA and OLoRA initialisation against PEFT, both ways: the initial factors and residual
base, the trained model's logits, the converted (plain LoRA) files, unconverted PEFT files,
resuming, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from conftest import build, clone, logits
from lorakit import LoraConfig, add_lora, load_adapter, save_adapter
from lorakit.adapter_io import read_adapter
from lorakit.errors import LoraError
from lorakit.inject import lora_modules, remove_lora, unload_lora

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "o_proj", "up_proj"],
           "gpt2": ["c_attn", "c_proj"]}
INITS = ["pissa", "olora"]


def _peft(base, init: str, arch: str, **extra):
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=init,
                            fan_in_fan_out=arch == "gpt2", **extra)
    return get_peft_model(clone(base), config)


def _train_step(model, seed: int = 3) -> None:
    """The same 'training' for lorakit and PEFT models: a fixed random change to every A and B."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                g = torch.Generator().manual_seed(seed + p.numel())
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _factors(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", "").replace("base_model.model.", ""): p.detach()
            for n, p in model.named_parameters() if "lora_" in n or "base_layer.weight" in n}


# PEFT's OLoRA ignores fan_in_fan_out (it factors Conv1D's (d_in, d_out) weight and gets B of the
# wrong shape), so OLoRA on GPT-2 is checked on its own in test_olora_on_conv1d.
@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("llama", "olora"), ("qwen2", "pissa"),
                                       ("qwen2", "olora"), ("gpt2", "pissa")])
def test_init_equals_peft_and_changes_nothing(arch, init, ids):
    """A, B and the residual base weight are PEFT's; the model's output is the base's."""
    base = build(arch)
    mine = add_lora(clone(base), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS[arch], init=init))
    peft = _peft(base, init, arch)
    theirs = _factors(peft)
    for name, tensor in _factors(mine).items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(logits(mine, ids), logits(base, ids), atol=1e-5, rtol=1e-5)


def test_olora_on_conv1d(ids):
    """GPT-2's Conv1D stores (d_in, d_out): OLoRA factors W0 = Q·R in the (d_out, d_in) layout."""
    base = build("gpt2")
    mine = add_lora(clone(base), LoraConfig(r=4, alpha=8, target_modules=["c_attn"], init="olora"))
    layer = next(iter(lora_modules(mine).values()))
    B = layer.lora_B.weight
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal columns: Q_r
    torch.testing.assert_close(logits(mine, ids), logits(base, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trained_model_equals_peft_and_saves_converted(arch, init, ids, tmp_path):
    """After the same change to A and B the two models agree; lorakit's file is a plain LoRA
    (rank 2r) that PEFT loads on the original base with the same logits, and so is PEFT's
    own converted save in lorakit."""
    base = build(arch)
    mine = add_lora(clone(base), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS[arch], init=init))
    peft = _peft(base, init, arch)
    peft.save_pretrained(tmp_path / "initial")
    _train_step(mine)
    _train_step(peft)
    expected = logits(peft, ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)
    torch.testing.assert_close(logits(mine, ids), expected, atol=1e-5, rtol=1e-5)

    save_adapter(mine, tmp_path / "mine")
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    loaded_in_peft = PeftModel.from_pretrained(clone(base), tmp_path / "mine").eval()
    torch.testing.assert_close(logits(loaded_in_peft, ids), expected, atol=1e-5, rtol=1e-5)

    peft.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    theirs = load_adapter(clone(base), tmp_path / "theirs")
    assert all(m.initial is None and m.r == 8 for m in lora_modules(theirs).values())
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=1e-5)


def test_rslora_and_rank_pattern_keep_their_scaling_when_converted(ids, tmp_path):
    base = build("llama")
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa", use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    mine = add_lora(clone(base), config)
    _train_step(mine)
    save_adapter(mine, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    assert set(saved["rank_pattern"].values()) == {4}
    for loaded in (load_adapter(clone(base), tmp_path), PeftModel.from_pretrained(clone(base), tmp_path)):
        torch.testing.assert_close(logits(loaded.eval(), ids), logits(mine, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_unconverted_peft_adapter_rebuilds_its_base(init, ids, tmp_path):
    """PEFT's plain save of a PiSSA/OLoRA model (rank r, relative to the residual base): lorakit
    rebuilds that residual from the original base, exactly as PEFT does when it loads it."""
    base = build("llama")
    peft = _peft(base, init, "llama")
    _train_step(peft)
    peft.save_pretrained(tmp_path)
    assert read_adapter(tmp_path).config.init == init
    mine = load_adapter(clone(base), tmp_path)
    torch.testing.assert_close(logits(mine, ids), logits(peft, ids), atol=1e-5, rtol=1e-5)
    save_adapter(mine, tmp_path / "converted")  # and lorakit's save of it is the plain LoRA
    plain = load_adapter(clone(base), tmp_path / "converted")
    assert all(m.initial is None for m in lora_modules(plain).values())
    torch.testing.assert_close(logits(plain, ids), logits(peft, ids), atol=1e-5, rtol=1e-5)
    remove_lora(mine)  # the base comes back
    torch.testing.assert_close(logits(mine, ids), logits(base, ids), atol=1e-5, rtol=1e-5)


def test_randomized_svd_adapter_saved_unconverted_is_refused(tmp_path):
    peft = _peft(build("llama"), "pissa_niter_4", "llama")
    peft.save_pretrained(tmp_path)
    with pytest.raises(LoraError, match="randomized SVD.*path_initial_model_for_weight_conversion"):
        load_adapter(build("llama"), tmp_path)


def test_pissa_niter_is_deterministic_and_close_to_exact(ids):
    base = build("llama")
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="pissa_niter_8")
    first, second = (add_lora(clone(base), config) for _ in range(2))
    for a, b in zip(_factors(first).values(), _factors(second).values()):
        assert torch.equal(a, b)
    exact = add_lora(clone(base), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="pissa"))
    # A random weight has no spectral gap, so the subspaces differ; the energy captured is close.
    for m, e in zip(lora_modules(first).values(), lora_modules(exact).values()):
        captured = (m.lora_B.weight @ m.lora_A.weight).norm() / (e.lora_B.weight @ e.lora_A.weight).norm()
        assert 0.9 < captured <= 1 + 1e-5
    torch.testing.assert_close(logits(first, ids), logits(base, ids), atol=1e-5, rtol=1e-5)


def test_resume_reads_the_converted_file_back(ids, tmp_path):
    """A run being resumed has PiSSA layers already: the rank-2r file splits back into the
    trained and initial factors; initial factors from another SVD move the base with them."""
    base = build("llama")
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa")
    trained = add_lora(clone(base), config)
    _train_step(trained)
    save_adapter(trained, tmp_path)
    resumed = add_lora(clone(base), config)
    load_adapter(resumed, tmp_path)
    torch.testing.assert_close(logits(resumed, ids), logits(trained, ids), atol=1e-6, rtol=1e-6)
    other = add_lora(clone(base), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="olora"))
    load_adapter(other, tmp_path)  # same shapes, other initial factors: rebased onto the saved ones
    torch.testing.assert_close(logits(other, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)
    for m in lora_modules(other).values():
        m.lora_B.weight.data.zero_()
        m.lora_A.weight.data.zero_()
    unload_lora(other)  # A = B = 0: what is left is the saved residual, W0 − s·B0·A0
    assert not torch.allclose(logits(other, ids), logits(base, ids), atol=1e-3)


def test_merge_in_memory_is_the_finetuned_weight(ids):
    base = build("qwen2")
    model = add_lora(clone(base), LoraConfig(r=4, alpha=8, target_modules=TARGETS["qwen2"], init="olora"))
    _train_step(model)
    reference = logits(model, ids)
    unload_lora(model)
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)


def test_refusals(tmp_path):
    from lorakit.config import validate_config

    with pytest.raises(LoraError, match="whole layers"):
        add_lora(build("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], init="pissa"))
    with pytest.raises(LoraError, match="r ≤ min"):
        add_lora(build("llama"), LoraConfig(r=40, target_modules=["k_proj"], init="olora"), strict=False)
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="pissa_niter_N"):
        LoraConfig(init="pissa_niter_x")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    raw = {"model": {"quantization": {"bits": 4}}, "lora": {"init": "pissa"}, "data": {"train": str(data)},
           "training": {"max_steps": 1, "output_dir": str(tmp_path / "o")}}
    with pytest.raises(Exception, match="lora.init: pissa .*quantized base"):
        validate_config(raw, "c.yaml")


def test_a_pissa_run_resumes_bit_for_bit_and_merges(tiny_model_dir, tmp_path):
    """`lora.init: pissa` through training: a run stopped at step 3 and resumed ends with the
    uninterrupted run's adapter; the adapter is a plain rank-2r LoRA that merges (verified)."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from conftest import tiny_config
    from lorakit.cli import app
    from lorakit.config import validate_config
    from lorakit.train import train

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=6, save_every=3, scheduler="constant")
    raw["lora"].update(init="pissa", dropout=0.1)
    train(validate_config(raw, "test"))
    reference = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    raw["training"].update(output_dir=str(tmp_path / "stopped"), max_steps=3)
    train(validate_config(raw, "test"))
    raw["training"]["max_steps"] = 6
    train(validate_config(raw, "test"), resume=True)
    resumed = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert {tuple(t.shape) for k, t in reference.items() if "lora_A" in k} == {(8, 64)}

    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run" / "adapter"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0 and "verified" in result.output, result.output


def test_inspect_says_how_the_adapter_was_initialised(tmp_path):
    from lorakit.adapter_report import inspect_adapter

    model = add_lora(build("llama"), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="olora"))
    save_adapter(model, tmp_path / "mine")
    assert any("init olora at r=4" in n and "rank doubled" in n for n in inspect_adapter(tmp_path / "mine").notes)
    peft = _peft(build("llama"), "pissa", "llama")
    peft.save_pretrained(tmp_path / "theirs")
    assert any("without conversion" in n for n in inspect_adapter(tmp_path / "theirs").notes)
