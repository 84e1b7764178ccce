"""Tiny random-init models built from configs (no downloads) and shared helpers."""

from __future__ import annotations

import copy

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
