"""QLoRA: LoRA next to bitsandbytes 4-bit (NF4) layers, on the CPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, logits, randomize_lora
from lorakit import LoraConfig, LoraError, add_lora, count_parameters, load_adapter, save_adapter, unload_lora
from lorakit.inject import lora_modules
from lorakit.lora import is_4bit


def _llama64():
    """bitsandbytes' CPU kernels need in_features >= its 64-wide quantization block."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)).eval()


@pytest.fixture
def quantized(tmp_path):
    def load():
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base",
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32),
            device_map="cpu",
        ).eval()

    _llama64().save_pretrained(tmp_path / "base")
    return load


def test_lora_wraps_4bit_layers_and_trains(quantized, ids):
    model = quantized()
    assert is_4bit(model.model.layers[0].self_attn.q_proj)
    before = logits(model, ids)
    _, total = count_parameters(model)
    assert total == count_parameters(_llama64())[1]  # packed NF4 counts as unpacked
    add_lora(model, LoraConfig(target_modules="all-linear", dropout=0.0))
    assert all(is_4bit(m.base_layer) for m in lora_modules(model).values())
    assert torch.equal(logits(model, ids), before)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [m.lora_B.weight.grad for m in lora_modules(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), [None if g is None else float(g.abs().sum()) for g in grads]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_4bit_merge_in_place_is_refused_and_unload_dequantizes(quantized, ids):
    model = add_lora(quantized(), LoraConfig(dropout=0.0))
    randomize_lora(model)
    logits(model, ids)  # an eval forward repacks weights on some CPUs: merging must undo it
    expected = logits(model.train(), ids)  # train mode runs the exact (unpacked) 4-bit kernel
    with pytest.raises(LoraError, match="4-bit"):
        model.model.layers[0].self_attn.q_proj.merge()
    plain = unload_lora(model)
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-4, rtol=1e-4)


def test_4bit_adapter_roundtrip(quantized, ids, tmp_path):
    model = add_lora(quantized(), LoraConfig(target_modules=["q", "k", "v", "o"]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(quantized(), tmp_path / "adapter")
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_dora_on_4bit_trains_and_unloads_to_what_it_computed(quantized, ids):
    """QLoRA + DoRA: the norms are taken of the dequantized weights the kernel multiplies by."""
    model = add_lora(quantized(), LoraConfig(target_modules=["q_proj", "down_proj"], dropout=0.0, use_dora=True))
    randomize_lora(model)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_magnitude_vector.mul_(1.1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.lora_magnitude_vector.grad.abs().sum() > 0 for m in lora_modules(model).values())
    expected = logits(model, ids)  # train mode: the exact (unpacked) 4-bit kernel
    plain = unload_lora(model)
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-4, rtol=1e-4)


def test_weight_inits_refuse_a_4bit_base(quantized, tmp_path):
    """PiSSA/OLoRA would have to re-quantize the residual base: refused, for a new adapter and
    for a PEFT adapter saved without conversion, before the model is touched."""
    model = quantized()
    with pytest.raises(LoraError, match="quantized base"):
        add_lora(model, LoraConfig(r=4, target_modules=["q_proj"], init="pissa"))
    assert not lora_modules(model)
    import json

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft = get_peft_model(_llama64(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                     init_lora_weights="olora"))
    peft.save_pretrained(tmp_path / "olora")
    assert json.loads((tmp_path / "olora" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    with pytest.raises(LoraError, match="is quantized.*'olora'"):
        load_adapter(model, tmp_path / "olora")
    assert not lora_modules(model)


def test_dpo_on_a_4bit_base(quantized):
    """The reference swap touches only the adapter: on a 4-bit base the step-0 loss is log 2,
    B gets gradients, and after a change to B the reference pass still gives the start's log-probs."""
    from lorakit.config import Config
    from lorakit.preference import PreferenceLoss, sequence_logps

    model = add_lora(quantized(), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])).train()
    config = Config.model_validate({"data": {"train": "unused", "format": "preference"},
                                    "training": {"max_steps": 1, "objective": "dpo"}})
    loss_model = PreferenceLoss(model, config)
    loss_model.freeze_reference()
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    start = sequence_logps(model, batch)[0].detach()
    loss = loss_model(**batch)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5)
    loss.backward()
    grads = [m.lora_B.weight.grad for m in lora_modules(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), [None if g is None else float(g.abs().sum()) for g in grads]
    randomize_lora(model)
    assert not torch.allclose(sequence_logps(model, batch)[0], start, atol=1e-3)
    torch.testing.assert_close(loss_model.reference_logps(batch), start, atol=1e-5, rtol=1e-5)
