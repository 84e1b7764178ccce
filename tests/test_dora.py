"""DoRA against PEFT's implementation, both ways: logits, gradients, files, merge."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from conftest import build, clone, logits
from lorakit import LoraConfig, LoRALinear, add_lora, load_adapter, save_adapter
from lorakit.errors import LoraError
from lorakit.inject import lora_modules, unload_lora

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "o_proj", "up_proj"],
           "gpt2": ["c_attn", "c_proj"], "phi3": ["qkv_proj", "gate_up_proj"]}


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Random B and magnitudes away from their initial norms, in lorakit or PEFT naming."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("arch", list(TARGETS))
def test_peft_dora_adapter_loads_exactly(arch, tmp_path, ids):
    base = build(arch)
    peft = get_peft_model(clone(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True))
    _perturb(peft)
    peft.eval()
    peft.save_pretrained(tmp_path)
    mine = load_adapter(clone(base), tmp_path).eval()
    assert all(m.use_dora for m in lora_modules(mine).values())
    torch.testing.assert_close(logits(mine, ids), logits(peft, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lorakit_dora_adapter_loads_in_peft(arch, tmp_path, ids):
    base = build(arch)
    mine = add_lora(clone(base), LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True))
    _perturb(mine)
    save_adapter(mine, tmp_path)
    peft = PeftModel.from_pretrained(clone(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft, ids), logits(mine.eval(), ids), atol=1e-5, rtol=1e-5)


def test_gradients_equal_peft(tmp_path, ids):
    """Same loss and same gradients for A, B and the magnitudes (the norm is a constant in backward)."""
    base = build("llama")
    peft = get_peft_model(clone(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                      use_dora=True))
    _perturb(peft)
    peft.save_pretrained(tmp_path)
    mine = load_adapter(clone(base), tmp_path)
    grads = []
    for model in (mine, peft):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n.replace(".default", "").replace("base_model.model.", "")
                      .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad.clone()
                      for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and any("lora_magnitude_vector" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_path_is_peft_formula():
    """With dropout active the base term is recomputed on the dropped input, as PEFT does."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 12), r=4, alpha=8, dropout=0.5, use_dora=True).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    from lorakit.fastpath import dropout

    xd = dropout(x, 0.5)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    scale = layer.lora_magnitude_vector / (W + delta).norm(dim=1)
    expected = x @ W.T + b + (scale - 1) * (xd @ W.T) + scale * (xd @ delta.T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact_and_unmerge_restores(arch, ids):
    model = add_lora(build(arch), LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True))
    _perturb(model)
    model.eval()
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    reference = logits(model, ids)
    for module in lora_modules(model).values():
        module.merge()
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)
    for module in lora_modules(model).values():
        module.unmerge()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-5)
    unload_lora(model)
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)


def test_dora_refusals():
    with pytest.raises(LoraError, match="whole layers"):
        add_lora(build("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], use_dora=True))
    model = add_lora(build("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LoraError, match="weight other than 1"):
        next(iter(lora_modules(model).values())).merge(0.5)


def test_train_merge_export_a_dora_run(tmp_path, tiny_model_dir):
    """`lora.use_dora: true` through the CLI: it trains its magnitudes, saves PEFT's format,
    merges (verified), merges only alone at weight 1, and exports where an engine can run it."""
    import json

    import yaml
    from typer.testing import CliRunner

    from conftest import tiny_config
    from lorakit.cli import app

    runner = CliRunner()
    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=4)
    raw["lora"].update(use_dora=True, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    from safetensors.torch import load_file

    magnitudes = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "magnitude" in k]
    assert len(magnitudes) == 6
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0 and "verified" in result.output, result.output
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "half"), "--weights", "0.5"])
    assert result.exit_code == 2 and "DoRA" in result.output
    result = runner.invoke(app, ["export", str(adapter), "--to", "gguf"])
    assert result.exit_code == 2 and "--merged" in result.output
