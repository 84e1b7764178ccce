"""``lorakit targets``: what a model's linear layers are, and what a target spec would adapt.

The module tree is built from the model's config on the meta device, so no weights are
read (a GGUF file is converted once, like for training, to get its config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from lorakit.inject import LoraConfig, add_lora, count_parameters, find_targets, linear_names, lora_modules
from lorakit.model import load_model_config

# Role of a layer from the end of its path, first match wins.
ROLE_PATTERNS = [
    ("fused qkv", r"(c_attn|qkv_proj|query_key_value|W_pack)$"),
    ("attention q", r"q_proj$"),
    ("attention k", r"k_proj$"),
    ("attention v", r"v_proj$"),
    ("attention o", r"(o_proj|out_proj|attn\.c_proj|attention\.dense|self_attn\.dense)$"),
    ("mlp", r"(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|c_fc|mlp\.c_proj|dense_h_to_4h|dense_4h_to_h)$"),
]


@dataclass
class Layer:
    """One linear layer of the model."""

    name: str
    role: str
    d_in: int
    d_out: int

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


def skeleton(name_or_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree with no weights (meta tensors)."""
    config = load_model_config(name_or_path, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def role_of(name: str, is_head: bool) -> str:
    if is_head:
        return "head"
    for role, pattern in ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return "other"


def layers(model: torch.nn.Module) -> list[Layer]:
    """Every wrappable layer with its role and shape."""
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    out = []
    for name in linear_names(model):
        m = modules[name]
        d_in, d_out = (m.weight.shape if type(m).__name__ == "Conv1D" else (m.in_features, m.out_features))
        out.append(Layer(name, role_of(name, m is head), int(d_in), int(d_out)))
    return out


def parse_spec(text: str) -> list[str] | str:
    """CLI form of ``target_modules``: ``all-linear``, a regex, or names/roles separated by commas."""
    if text == "all-linear" or re.search(r"[*+?()\[\]|^$\\]", text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def plan_targets(model: torch.nn.Module, config: LoraConfig) -> tuple[dict[str, list[str]], int, int]:
    """What ``config`` adapts: ``(targets, added trainable parameters, base total)``."""
    targets = find_targets(model, config)
    _, total = count_parameters(model)
    add_lora(model, config)
    trainable = sum(p.numel() for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight))
    return targets, trainable, total
