"""``lorakit export``, verified by the engines themselves where one runs here.

llama.cpp (through llama-cpp-python, built from source by ``make install``) loads the
exported GGUF files; its logits are compared with lorakit's adapter-on-base model,
beside the engine's own base-only gap. vLLM and SGLang do not run on these CPUs: their
engine-ready copies are checked with PEFT (same update) and against the engines'
documented rules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType
from llama_cpp import Llama
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import BUILDERS, randomize_lora
from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import app
from lorakit.gguf_export import tokenizer_metadata, write_model

runner = CliRunner()
NO_VOCAB = [("tokenizer.ggml.model", "no_vocab", GGUFValueType.STRING, None)]
IDS = [5, 17, 100, 33, 64, 12, 99, 120, 7, 3]
F32 = 0  # GGML_TYPE_F32: llama.cpp's default F16 KV cache would dominate the comparison

CASES = {
    "plain q,v": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora, patterns, all-linear": dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True,
                                         rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                         alpha_pattern={"k_proj": 3.0}),
}


def llama_cpp_logits(model_file, ids, lora=None) -> np.ndarray:
    llm = Llama(str(model_file), lora_path=str(lora) if lora else None, n_ctx=0, logits_all=True,
                verbose=False, type_k=F32, type_v=F32, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_cpp_greedy(model_file, ids, n, lora=None) -> list[int]:
    llm = Llama(str(model_file), lora_path=str(lora) if lora else None, n_ctx=0, verbose=False,
                type_k=F32, type_v=F32, n_threads=2)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, n) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def tiny(tmp_path, arch):
    BUILDERS[arch]().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # records where its base lies
    base_gguf = tmp_path / "base.gguf"
    write_model(base_gguf, model.state_dict(), model.config, "f32", NO_VOCAB)
    return model, base_gguf


def tiny_adapter(tmp_path, arch: str, case: str):
    """A tiny base (and its F32 GGUF) with a random adapter of ``CASES[case]`` saved in tmp_path/adapter."""
    model, base_gguf = tiny(tmp_path, arch)
    add_lora(model, LoraConfig(**CASES[case]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    return model, base_gguf


def export(*args) -> str:
    result = runner.invoke(app, ["export", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_adapter_matches_lorakit_in_llama_cpp(tmp_path, arch, case):
    model, base_gguf = tiny(tmp_path, arch)
    base_gap = np.abs(llama_cpp_logits(base_gguf, IDS) - hf_logits(model, IDS)).max()
    add_lora(model, LoraConfig(**CASES[case]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    output = export(tmp_path / "adapter", "--to", "gguf", "-o", tmp_path / "out")
    assert "--lora" in output

    mine = hf_logits(model, IDS)
    theirs = llama_cpp_logits(base_gguf, IDS, tmp_path / "out" / "adapter.gguf")
    assert np.abs(mine - hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), IDS)).max() > 0.05  # the adapter changes the output
    assert np.abs(theirs - mine).max() <= 10 * base_gap + 1e-5
    assert llama_cpp_greedy(base_gguf, IDS, 6, tmp_path / "out" / "adapter.gguf") == hf_greedy(model, IDS, 6)


def test_gguf_adapter_folds_per_layer_scales_into_one_alpha(tmp_path):
    model, _ = tiny_adapter(tmp_path, "llama", "rslora, patterns, all-linear")
    output = export(tmp_path / "adapter", "--to", "gguf", "-o", tmp_path / "out")
    assert "folded" in output
    reader = GGUFReader(tmp_path / "out" / "adapter.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    layer = model.model.layers[1].mlp.down_proj  # rank 6 from rank_pattern, rsLoRA scale 8/sqrt(6)
    a, b = tensors["blk.1.ffn_down.weight.lora_a"], tensors["blk.1.ffn_down.weight.lora_b"]
    assert a.shape == (6, 64) and b.shape == (32, 6)
    np.testing.assert_allclose(alpha / 6 * b @ a, layer.delta_weight().detach().numpy(), atol=1e-6)


def test_merged_outtypes_stay_close_to_float32(tmp_path):
    model, base_gguf = tiny(tmp_path, "llama")
    reference = llama_cpp_logits(base_gguf, IDS)
    gaps = {}
    for outtype in ("f16", "bf16", "q8_0"):
        path = tmp_path / f"{outtype}.gguf"
        write_model(path, model.state_dict(), model.config, outtype, NO_VOCAB)
        gaps[outtype] = np.abs(llama_cpp_logits(path, IDS) - reference).max()
    scale = np.abs(reference).max()
    assert gaps["f16"] < 1e-2 * scale and gaps["bf16"] < 5e-2 * scale and gaps["q8_0"] < 5e-2 * scale, gaps


def test_vllm_copy_is_the_same_adapter_for_peft(tmp_path):
    from peft import PeftModel

    model, _ = tiny_adapter(tmp_path, "llama", "rslora, patterns, all-linear")
    output = export(tmp_path / "adapter", "--to", "vllm", "-o", tmp_path / "vllm")
    assert "vllm serve" in output and "--max-lora-rank 8" in output
    copy = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert copy["lora_alpha"] == copy["r"] and copy["use_rslora"] is False  # one global scale of 1, as vLLM computes
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "vllm").eval()
    np.testing.assert_allclose(hf_logits(peft, IDS), hf_logits(model, IDS), atol=1e-5)


@pytest.mark.parametrize("what, args, says", [
    ("modules_to_save", dict(modules_to_save=["lm_head"]), "--merged"),
    ("bias", dict(bias="all"), "biases"),
])
def test_gguf_refuses_what_llama_cpp_adapters_cannot_carry(tmp_path, what, args, says):
    model, _ = tiny(tmp_path, "llama")
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj"], **args))
    save_adapter(model, tmp_path / "adapter")
    for target in ("gguf", "vllm"):
        result = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--to", target, "-o", str(tmp_path / target)])
        assert result.exit_code == 2 and says in result.output, result.output
        assert not (tmp_path / target).exists()


@pytest.mark.parametrize("args, says", [
    (["--to", "gguf"], "gpt2"),
    (["--to", "gguf", "--merged"], "gpt2"),
    (["--to", "ollama"], "GGUF"),
    (["--to", "vllm", "--merged"], "--merged applies to"),
    (["--to", "vllm"], "c_attn"),
    (["--to", "gguf", "-o", "{adapter}/inside"], "destroy"),
    (["--to", "gguf", "--outtype", "q4"], "q4"),
])
def test_export_refusals_name_the_reason(tmp_path, args, says):
    BUILDERS["gpt2"]().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    add_lora(model, LoraConfig(r=4, target_modules=["c_attn"]))
    save_adapter(model, tmp_path / "adapter")
    args = [a.format(adapter=tmp_path / "adapter") for a in args]
    result = runner.invoke(app, ["export", str(tmp_path / "adapter"), *args])
    assert result.exit_code == 2 and says in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
def test_smollm2_exports_run_in_llama_cpp(tmp_path):
    """The embedded default end to end: adapter GGUF on an F32 base, merged GGUF, Ollama."""
    from lorakit.config import ModelConfig
    from lorakit.model import default_gguf, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="default", dtype="float32")
    model, tokenizer = load_model(cfg).eval(), load_tokenizer(cfg)
    base_gguf = tmp_path / "base-f32.gguf"
    write_model(base_gguf, model.state_dict(), model.config, "f32", tokenizer_metadata(default_gguf()))
    text = "<|im_start|>user\nWrite the synopsis of the Debian package curl.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    engine = Llama(str(base_gguf), n_ctx=256, verbose=False, vocab_only=True)
    assert engine.tokenize(text.encode(), add_bos=False, special=True) == ids  # same tokens in both engines
    base_gap = np.abs(llama_cpp_logits(base_gguf, ids) - hf_logits(model, ids)).max()

    add_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 4}))
    randomize_lora(model, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a trained-sized update: it moves logits, it does not swamp them
    (tmp_path / "run").mkdir()
    save_adapter(model, tmp_path / "run" / "adapter")
    shutil.copy(Path(__file__).parent.parent / "configs" / "quickstart.yaml",
                tmp_path / "run" / "adapter" / "training_config.yaml")  # as a quickstart run saves it
    mine = hf_logits(model, ids)
    assert np.abs(mine - hf_logits(load_model(cfg).eval(), ids)).max() > 0.1

    export(tmp_path / "run" / "adapter", "--to", "gguf", "-o", tmp_path / "gguf")
    theirs = llama_cpp_logits(base_gguf, ids, tmp_path / "gguf" / "adapter.gguf")
    assert np.abs(theirs - mine).max() <= 10 * base_gap + 1e-4
    assert llama_cpp_greedy(base_gguf, ids, 8, tmp_path / "gguf" / "adapter.gguf") == hf_greedy(model, ids, 8)

    export(tmp_path / "run" / "adapter", "--to", "gguf", "--merged", "--outtype", "f32", "-o", tmp_path / "merged")
    merged = llama_cpp_logits(tmp_path / "merged" / "model-f32.gguf", ids)
    assert np.abs(merged - mine).max() <= 10 * base_gap + 1e-4

    output = export(tmp_path / "run" / "adapter", "--to", "ollama", "-o", tmp_path / "ollama")
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert f"FROM {default_gguf()}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "ollama create" in output
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                             add_generation_prompt=True)
    assert template.replace("{{ .Prompt }}", "hello") == rendered  # Ollama renders prompts as training did


@pytest.mark.parametrize("template, stops, says", [
    ('a """ b {{ .Prompt }}', ["<|im_end|>"], '"""'),
    ("{{ .Prompt }}", ['say "stop"'], "stop string"),
])
def test_modelfile_refuses_what_its_quoting_cannot_hold(template, stops, says):
    from lorakit.errors import InputError
    from lorakit.export import _modelfile

    with pytest.raises(InputError, match=says):
        _modelfile("/base.gguf", "./adapter.gguf", template, stops)
    assert _modelfile("/base.gguf", None, "{{ .Prompt }}", ["<|im_end|>"]).startswith("FROM /base.gguf\nTEMPLATE")
