"""``lorakit targets``: what a model's linear layers are, and what a target spec would adapt.

The module tree is built from the model's config on the meta device, so no weights are
read (a GGUF file is converted once, like for training, to get its config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import Target, count_parameters, linear_names, plan_injection
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


@dataclass
class TargetsReport:
    """``lorakit targets``: the model's linear layers, and what a spec would adapt."""

    model_class: str
    layers: list[Layer]
    total: int  # the model's parameters
    spec: list[str] | str | None = None
    r: int = 8
    plan: dict[str, Target] | None = None


def describe_targets(model: str, spec: str | None = None, r: int = 8) -> TargetsReport:
    """Read ``model``'s config (no weights) and, with ``spec``, plan what it adapts at rank ``r``."""
    tree = skeleton(model)
    _, total = count_parameters(tree)
    report = TargetsReport(type(tree).__name__, layers(tree), total)
    if spec:
        try:
            config = LoraConfig(r=r, target_modules=parse_spec(spec))
        except ValidationError as e:
            raise LoraError(f"--target-modules {spec!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        report.spec, report.r, report.plan = config.target_modules, r, plan_injection(tree, config)
    return report
