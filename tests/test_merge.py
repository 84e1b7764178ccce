"""lorakit merge: a plain checkpoint, verified against the adapter, written atomically."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from lorakit import load_adapter
from lorakit.config import validate_config
from lorakit.inject import lora_modules
from lorakit.errors import InputError
from lorakit.merge import MergeError, merge_adapters, nf4_roundtrip
from lorakit.train import train

IDS = torch.tensor([[5, 17, 42, 99, 3, 8], [7, 7, 120, 64, 31, 2]])


def _trained(tmp_path, model_dir, name="run", quantization=None, seed=0):
    raw = tiny_config(tmp_path, model_dir, max_steps=4, output_dir=str(tmp_path / name), seed=seed)
    raw["model"]["quantization"] = quantization
    return train(validate_config(raw, "test")).adapter_dir


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merged_checkpoint_loads_in_plain_transformers(tiny_model_dir, tmp_path):
    adapter = _trained(tmp_path, tiny_model_dir)
    report = merge_adapters([adapter], tmp_path / "merged")
    assert report.max_abs_diff <= report.tolerance and report.dtype == "float32"
    out = tmp_path / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training_config.yaml"):
        assert (out / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    with_adapter = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    assert (_logits(merged) - _logits(with_adapter)).abs().max() <= 1e-5
    assert (_logits(merged) - _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().max() > 1e-4


def test_refuses_non_empty_output_without_force(tiny_model_dir, tmp_path):
    adapter = _trained(tmp_path, tiny_model_dir)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty; pass --force"):
        merge_adapters([adapter], out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="precious.txt, which lorakit did not write"):
        merge_adapters([adapter], out, force=True)  # --force replaces lorakit's outputs, nothing else
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    merge_adapters([adapter], out)
    merge_adapters([adapter], out, force=True, dtype="bfloat16")  # its own earlier merge is replaced
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_weighted_combination_is_exact(tiny_model_dir, tmp_path):
    a = _trained(tmp_path, tiny_model_dir, "a", seed=1)
    b = _trained(tmp_path, tiny_model_dir, "b", seed=2)
    merge_adapters([a, b], tmp_path / "merged", weights=[0.7, 0.3])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.1.self_attn.q_proj"
    expected = base.get_submodule(name).weight.clone()
    for adapter, w in ((a, 0.7), (b, 0.3)):
        layer = lora_modules(load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter))[name]
        expected += w * layer.delta_weight()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").get_submodule(name).weight
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="2 values for 1 adapters"):
        merge_adapters([a], tmp_path / "other", weights=[0.5, 0.5])


def test_failed_verification_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    adapter = _trained(tmp_path, tiny_model_dir)
    from lorakit.lora import LoRALinear

    real = LoRALinear.delta_weight
    monkeypatch.setattr(LoRALinear, "delta_weight", lambda self: 2 * real(self))  # a wrong fold
    with pytest.raises(MergeError, match="verification failed"):
        merge_adapters([adapter], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged.tmp*"))


def test_nf4_roundtrip_matches_bitsandbytes_layer(tiny_model_dir):
    from lorakit.config import ModelConfig
    from lorakit.fastpath import dequantized_weight
    from lorakit.model import load_model

    quantized = load_model(ModelConfig(name_or_path=tiny_model_dir, quantization={"bits": 4}))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.mlp.down_proj"
    expected = dequantized_weight(quantized.get_submodule(name)).float()
    assert torch.equal(nf4_roundtrip(original.get_submodule(name).weight.data), expected)


def test_qlora_adapter_merges_into_dequantized_weights_by_default(tiny_model_dir, tmp_path):
    adapter = _trained(tmp_path, tiny_model_dir, quantization={"bits": 4})
    report = merge_adapters([adapter], tmp_path / "dq")
    assert report.into == "dequantized" and report.into_other_diff > 0
    full = merge_adapters([adapter], tmp_path / "fp", into="full-precision")
    assert full.into == "full-precision"
    dq = AutoModelForCausalLM.from_pretrained(tmp_path / "dq")
    fp = AutoModelForCausalLM.from_pretrained(tmp_path / "fp")
    name = "model.layers.0.self_attn.k_proj"  # not adapted: exactly the NF4 weights vs the originals
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_submodule(name).weight
    assert torch.equal(fp.get_submodule(name).weight, original)
    assert torch.equal(dq.get_submodule(name).weight, nf4_roundtrip(original.data))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3"])
def test_conv1d_and_fused_slice_adapters_merge(arch, tmp_path):
    """Adapters from elsewhere (no training config): the base comes from adapter_config.json."""
    from conftest import BUILDERS, byte_tokenizer, randomize_lora
    from lorakit import LoraConfig, add_lora, save_adapter

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    tok = byte_tokenizer()
    built = BUILDERS[arch]()
    built.resize_token_embeddings(len(tok))  # merge verifies on text, so the vocab must cover it
    built.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    add_lora(model, LoraConfig(target_modules=["q", "v", "o"], r=2))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    merge_adapters([tmp_path / "adapter"], tmp_path / "merged")
    ids = IDS % 100
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - model.eval()(input_ids=ids).logits).abs().max() <= 1e-5
