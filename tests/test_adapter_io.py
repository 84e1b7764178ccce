"""Adapters on disk in PEFT's format: real PEFT and transformers load ours, we load theirs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ARCHS, build, logits, randomize_lora
from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.inject import lora_modules

peft = pytest.importorskip("peft")

# Specs that exercise plain layers and fused slices on each architecture.
SPECS = {arch: ["q", "v", "o"] for arch in ARCHS}


def _trained(arch, tmp_path, **kw):
    model = build(arch)
    add_lora(model, LoraConfig(target_modules=SPECS[arch], r=4, alpha=8, **kw))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    return model


def test_files_and_keys_follow_peft(tmp_path):
    _trained("llama", tmp_path)
    out = tmp_path / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    state = load_file(out / "adapter_model.safetensors")
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert len(state) == 2 * 3 * 2
    assert not any("base_layer" in k for k in state)


def test_peft_loads_lorakit_adapters_with_same_logits(arch, ids, tmp_path):
    ours = _trained(arch, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path / "adapter").eval()
    diff = (logits(theirs, ids) - logits(ours, ids)).abs().max()
    assert diff <= 1e-5
    assert (logits(ours, ids) - logits(build(arch), ids)).abs().max() > 1e-3  # the adapter does something


def test_lorakit_loads_peft_adapters_with_same_logits(arch, ids, tmp_path):
    theirs = peft.get_peft_model(
        build(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build(arch), tmp_path / "peft")
    assert len(lora_modules(ours)) == sum(1 for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5


def test_transformers_load_adapter(ids, tmp_path):
    ours = _trained("llama", tmp_path)
    hf = build("llama")
    hf.load_adapter(str(tmp_path / "adapter"))
    assert (logits(hf, ids) - logits(ours, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gpt_neox"])
def test_slice_adapters_export_as_block_lora(arch, ids, tmp_path):
    ours = _trained(arch, tmp_path, use_rslora=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {8}  # two slices of rank 4
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path / "adapter").eval()
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= 1e-5
    # Read back as adapter_config.json describes it (the one description every tool reads):
    # one rank-8 layer per fused projection, computing exactly what the slices computed.
    back = load_adapter(build(arch), tmp_path / "adapter")
    fused = [m for m in lora_modules(back).values() if m.r == 8]
    assert fused and not any(m.sliced for m in lora_modules(back).values())
    assert (logits(back, ids) - logits(ours, ids)).abs().max() <= 1e-6


def test_roundtrip_with_bias_and_modules_to_save(ids, tmp_path):
    ours = build("qwen2")
    add_lora(ours, LoraConfig(bias="lora_only", modules_to_save=["lm_head"]))
    randomize_lora(ours)
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_proj.base_layer.bias.add_(0.5)
        ours.lm_head.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "a")
    assert (logits(load_adapter(build("qwen2"), tmp_path / "a"), ids) - logits(ours, ids)).abs().max() <= 1e-6
    theirs = peft.PeftModel.from_pretrained(build("qwen2"), tmp_path / "a").eval()
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= 1e-5


def test_load_into_model_with_lora_replaces_weights(ids, tmp_path):
    ours = _trained("llama", tmp_path)
    fresh = add_lora(build("llama"), LoraConfig(target_modules=SPECS["llama"], r=4, alpha=8))
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, ids), logits(ours, ids))


def test_wrong_base_fails_naming_module_and_changes_nothing(tmp_path):
    _trained("llama", tmp_path)
    other = build("qwen2")  # same names, but qwen2 v_proj etc. have biases: shapes still fit
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=128))
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(LoraError, match=r"layers\.0\.self_attn\.\w+_proj\.lora_A\.weight has shape \(4, 32\), the model needs \(4, 48\)"):
        load_adapter(bigger, tmp_path / "adapter")
    assert not lora_modules(bigger)
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    with pytest.raises(LoraError, match=r"does not fit this model: target_modules \['o_proj', 'q_proj', 'v_proj'\] matched no layer of GPT2LMHeadModel"):
        load_adapter(build("gpt2"), tmp_path / "adapter")
    with pytest.raises(LoraError, match="trained on another base than this model"):  # the shapes fit, the weights differ
        load_adapter(other, tmp_path / "adapter")
    from lorakit.adapter_io import any_base

    with any_base():
        assert load_adapter(other, tmp_path / "adapter") is other


def test_missing_and_unexpected_keys_fail(tmp_path):
    _trained("llama", tmp_path)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(path)
    missing = dict(state)
    del missing["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(missing, path)
    with pytest.raises(LoraError, match=r"no tensor for .*layers\.1\.self_attn\.q_proj\.lora_B"):
        load_adapter(build("llama"), tmp_path / "adapter")
    extra = dict(state, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)})
    save_file(extra, path)
    with pytest.raises(LoraError, match="adapter has .*up_proj.*, which is no LoRA target"):
        load_adapter(build("llama"), tmp_path / "adapter")


def test_bad_directories_fail_clearly(tmp_path):
    with pytest.raises(LoraError, match="no adapter_config.json"):
        load_adapter(build("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoraError, match="only LORA"):
        load_adapter(build("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_bias": True}))
    with pytest.raises(LoraError, match="lora_bias"):
        load_adapter(build("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoraError, match="never loads"):
        load_adapter(build("llama"), tmp_path)


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(LoraError, match="no LoRA layers"):
        save_adapter(build("llama"), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_adapter_on_another_base_of_the_same_shapes_is_refused(arch, tmp_path, caplog):
    """Shapes cannot tell two bases of one architecture apart; the input embeddings sampled
    into the adapter's metadata can, across dtypes. Another base is refused, unless the
    caller says it means it (``any_base``, the command line's --any-base): then warned."""
    from lorakit.adapter_io import any_base

    _trained(arch, tmp_path)
    with caplog.at_level("WARNING", logger="lorakit"):
        load_adapter(build(arch), tmp_path / "adapter")
        load_adapter(build(arch).to(torch.bfloat16), tmp_path / "adapter")
        assert "trained on another base" not in caplog.text
        other = build(arch, seed=7)
        with pytest.raises(LoraError, match="trained on another base .*--any-base"):
            load_adapter(other, tmp_path / "adapter")
        assert not lora_modules(other)  # refused before the model was touched
        with any_base():
            load_adapter(other, tmp_path / "adapter")
    assert caplog.text.count("trained on another base") == 1 and "loaded anyway" in caplog.text


@pytest.mark.parametrize("hint", ['{"shape": [1, 2], "values": [1, 2]}', "[1, 2]", "not json",
                                  '{"shape": [96, 32], "values": ' + json.dumps([True] * 64) + "}"])
def test_a_malformed_base_hint_is_ignored(hint, tmp_path, caplog):
    _trained("llama", tmp_path)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "lorakit_base_embeddings": hint})
    with caplog.at_level("WARNING", logger="lorakit"):
        load_adapter(build("llama", seed=7), tmp_path / "adapter")  # another base, but no usable hint
    assert "another base" not in caplog.text
