"""Tiny random-init models built from configs (no downloads) and shared helpers."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Tests never reach a hub: a name that is not found locally fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=VOCAB, max_position_embeddings=64, **_IDS)

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **_DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **_DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_key_value_heads=2, **_DECODER)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, **_DECODER)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**_DECODER)),
    "opt": lambda: OPTForCausalLM(OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=32, **_IDS)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, **_IDS)),
}
ARCHS = list(BUILDERS)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` in eval mode, the same for the same seed."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every B factor random values so the adapter actually changes the output."""
    from lorakit.inject import lora_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.1)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(16)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def clone(model):
    return copy.deepcopy(model)


# --- tiny on-disk models with a byte-level tokenizer, for end-to-end runs -------------

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A fast byte-level tokenizer (256 bytes + 3 specials) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<pad>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(path, hidden: int = 64) -> str:
    """A tiny random Llama and the byte tokenizer, saved as a local checkpoint."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=2 * hidden, vocab_size=len(tok), max_position_embeddings=256,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Tiny prompt/completion rows with a learnable pattern."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"question": f"{a}+{b}=", "answer": str(a + b)})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def tiny_config(tmp_path, model_dir: str, **training) -> dict:
    """A complete raw config for a few-second CPU run on the tiny model."""
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(64))
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_rows(16, seed=1))
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32"},  # exact comparisons; auto may pick bf16
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q", "v"]},
        "data": {"train": train, "validation": val, "prompt_template": "{question}",
                 "completion_field": "answer", "max_length": 32},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 4,
                     "lr": 1e-2, "log_every": 1, "seed": 0, **training},
    }
