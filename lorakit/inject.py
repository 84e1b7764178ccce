"""Choosing which layers get LoRA, wrapping them in place, and the trainable state.

Wrappers replace ``parent.<child>`` without renaming anything, so a LoRA parameter
named ``model.layers.0.self_attn.q_proj.lora_A.weight`` in memory is PEFT's
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` on disk.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, field
from typing import Literal

import torch
from pydantic import ConfigDict, field_validator
from pydantic.dataclasses import dataclass
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.lora import LoraError, LoRALinear, SharedInput, is_4bit

logger = logging.getLogger("lorakit")

ROLES = ("q", "k", "v", "o")
# Output projection names, tried in order (Llama/Qwen/Phi-3, OPT, GPT-2, GPT-NeoX).
_OUTPUT_SUFFIXES = ("o_proj", "out_proj", "attn.c_proj", "attention.dense")


@dataclass(config=ConfigDict(extra="forbid"))
class LoraConfig:
    """What to adapt and how.

    Args:
        r: rank of each update; higher = more capacity and more memory.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter input during training; 0 costs nothing.
        target_modules: a list of module names (exact, or a ``.suffix`` of the path) and
            attention roles ``q``/``k``/``v``/``o`` resolved per architecture (slices of
            fused qkv layers included), or one string: ``all-linear`` (every linear layer
            but the output head) or a regular expression matched against full paths.
        bias: ``none``, ``all`` (train every bias) or ``lora_only`` (biases of adapted layers).
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``kaiming`` (uniform, PEFT's default) or ``gaussian`` for A; B is always zero.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``lm_head``).
        layers: only adapt modules of these block indices (``model.layers.<i>``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q", "v"])
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    modules_to_save: list[str] | None = None
    layers: list[int] | None = None

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, r: int) -> int:
        if r <= 0:
            raise ValueError("must be > 0")
        return r

    @field_validator("alpha")
    @classmethod
    def _positive_alpha(cls, alpha: float) -> float:
        if alpha <= 0:
            raise ValueError("must be > 0")
        return alpha

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, p: float) -> float:
        if not 0 <= p < 1:
            raise ValueError("must be in [0, 1)")
        return p

    @field_validator("target_modules")
    @classmethod
    def _valid_targets(cls, spec: list[str] | str) -> list[str] | str:
        if not spec:
            raise ValueError("must name at least one module")
        if isinstance(spec, str) and spec != "all-linear":
            try:
                re.compile(spec)
            except re.error as e:
                raise ValueError(f"{spec!r} is not a valid regular expression: {e}") from e
        return spec

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of the fields."""
        return asdict(self)


def is_linear_like(module: nn.Module) -> bool:
    """Layers LoRA can wrap: ``nn.Linear`` (bitsandbytes' too) and GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, LoRALinear)


def linear_names(model: nn.Module) -> list[str]:
    """Full paths of every wrappable layer, the LoRA factors themselves excluded."""
    names = []
    for name, module in model.named_modules():
        if is_linear_like(module) and not re.search(r"\.lora_[AB]$", name):
            names.append(name)
    return names


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first integer in its path."""
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _fused_rows(model: nn.Module, name: str, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Output rows of q, k and v inside a fused qkv layer, per the architecture's layout."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    out = module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "c_attn" and model_type == "gpt2":  # [q | k | v]
        d = out // 3
        return {role: torch.arange(i * d, (i + 1) * d) for i, role in enumerate("qkv")}
    if leaf == "qkv_proj" and model_type == "phi3":  # [q (heads) | k (kv heads) | v (kv heads)]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        return {"q": torch.arange(q), "k": torch.arange(q, q + kv), "v": torch.arange(q + kv, out)}
    if leaf == "query_key_value" and model_type == "gpt_neox":  # per head [q_h | k_h | v_h]
        heads = config.num_attention_heads
        head_dim = out // (3 * heads)
        starts = torch.arange(heads)[:, None] * 3 * head_dim
        return {
            role: (starts + i * head_dim + torch.arange(head_dim)).flatten()
            for i, role in enumerate("qkv")
        }
    return None


def _resolve_role(model: nn.Module, role: str, names: list[str]) -> dict[str, list[str]]:
    """Map an attention role to ``{module path: [roles]}``; an empty role list = whole layer."""
    if role == "o":
        for suffix in _OUTPUT_SUFFIXES:
            hits = [n for n in names if _matches(n, suffix)]
            if hits:
                return {n: [] for n in hits}
        return {}
    hits = [n for n in names if _matches(n, f"{role}_proj")]
    if hits:
        return {n: [] for n in hits}
    modules = dict(model.named_modules())
    return {n: [role] for n in names if _fused_rows(model, n, modules[n]) is not None}


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """The layers ``config`` adapts, as ``{module path: fused slices}``.

    The slice list is empty for a whole layer, or names the roles (``q``/``k``/``v``)
    adapted inside a fused qkv layer.

    Raises:
        LoraError: when the spec, or one entry of it, matches nothing; the message lists
            the model's linear layers.
    """
    names = linear_names(model)
    spec = config.target_modules
    found: dict[str, list[str]] = {}
    if spec == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        modules = dict(model.named_modules())
        found = {n: [] for n in names if modules[n] is not head}
    elif isinstance(spec, str):
        found = {n: [] for n in names if re.fullmatch(spec, n)}
    else:
        for entry in spec:
            hits = _resolve_role(model, entry, names) if entry in ROLES else {}
            hits = hits or {n: [] for n in names if _matches(n, entry)}
            if not hits:
                raise LoraError(_no_match_message(model, repr(entry), names))
            for n, roles in hits.items():
                found[n] = sorted(set(found.get(n, [])) | set(roles), key="qkv".index)
    if config.layers is not None:
        found = {n: s for n, s in found.items() if block_index(n) in config.layers}
    if not found:
        raise LoraError(_no_match_message(model, repr(spec), names, config.layers))
    return found


def _no_match_message(model: nn.Module, what: str, names: list[str], layers=None) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    where = f" in layers {layers}" if layers is not None else ""
    return (
        f"target_modules {what} matched no layer{where} of {type(model).__name__}. "
        f"Its linear layers are named: {', '.join(leaves)} "
        f"(or use roles q/k/v/o, 'all-linear', or a regex over full paths)"
    )


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA wrapper in the model, by path, found by type rather than by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(
    model: nn.Module, config: LoraConfig, _ranks: dict[str, tuple[int, float]] | None = None
) -> nn.Module:
    """Wrap the targeted layers with LoRA in place and freeze everything else.

    Args:
        model: a transformers causal LM (or any module with the same naming).
        config: what to adapt.
        _ranks: per-module ``(r, alpha)`` overrides, used when loading PEFT adapters
            that carry ``rank_pattern``/``alpha_pattern``.

    Returns:
        The same model, with ``model.lorakit_config`` set.

    Raises:
        LoraError: when the model already has LoRA layers or nothing matches.
    """
    if lora_modules(model):
        raise LoraError("the model already has LoRA layers; unload_lora(model) them first")
    targets = find_targets(model, config)
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for name, roles in targets.items():
        base = modules[name]
        r, alpha = (_ranks or {}).get(name, (config.r, config.alpha))
        rows = _fused_rows(model, name, base) if roles else None
        wrapper = LoRALinear(
            base,
            r=r,
            alpha=alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            fan_in_fan_out=isinstance(base, Conv1D),
            out_slices=[rows[role] for role in roles] if rows else None,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, wrapper)
    _group_shared_inputs(model)
    _unfreeze_extras(model, config)
    model.lorakit_config = config
    model.lorakit_slices = {n: roles for n, roles in targets.items() if roles}
    trainable, total = count_parameters(model)
    logger.info(
        "LoRA on %d layers: %s trainable of %s parameters (%.3f%%)",
        len(targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )
    return model


# Sibling projections that transformers' decoders call on the same tensor.
_SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _group_shared_inputs(model: nn.Module) -> None:
    """Let adapted sibling projections share one dropout and one A matmul (``SharedInput``).

    Without dropout the saving is within noise while the stacked A factors cost memory
    in backward, so only adapters with dropout are grouped.
    """
    groups: dict[tuple[str, int], list[LoRALinear]] = {}
    for name, module in lora_modules(model).items():
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, names in enumerate(_SHARED_INPUT) if leaf in names), None)
        if family is not None and not module.sliced and module.dropout:
            groups.setdefault((parent, family), []).append(module)
    for members in groups.values():
        if len(members) > 1 and len({(m.dropout, m.lora_A.weight.dtype, m.in_features) for m in members}) == 1:
            shared = SharedInput(members)
            for member in members:
                member.shared_input = shared


def _unfreeze_extras(model: nn.Module, config: LoraConfig) -> None:
    """Biases and ``modules_to_save`` that train beside the adapters."""
    for module in lora_modules(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    if config.bias != "none":
        owners = model.named_modules() if config.bias == "all" else lora_modules(model).items()
        for _, module in owners:
            target = module.base_layer if isinstance(module, LoRALinear) else module
            if isinstance(getattr(target, "bias", None), nn.Parameter):
                target.bias.requires_grad_(True)
    for entry in config.modules_to_save or []:
        hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, entry)]
        if not hits:
            raise LoraError(f"modules_to_save entry {entry!r} matched no module")
        for _, module in hits:
            for pname, param in list(module.named_parameters(recurse=False)):
                # A private copy, as PEFT makes: training must not move a tied twin.
                setattr(module, pname, nn.Parameter(param.detach().clone()))
            module.requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a LoRA model by its in-memory name (adapters, biases, extras)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; packed 4-bit weights count as unpacked."""
    trainable = total = 0
    for param in model.parameters():
        n = param.quant_state.shape.numel() if hasattr(param, "quant_state") else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (idempotent); LoRA layers stay in place."""
    for module in lora_modules(model).values():
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight (idempotent)."""
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def _replace_wrappers(model: nn.Module, merge: bool) -> nn.Module:
    modules = dict(model.named_modules())
    for name, module in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        plain = module.merged_linear() if merge else module.base_layer
        if not merge and module.merged:
            module.unmerge()
        setattr(modules[parent_name] if parent_name else model, child, plain)
    for attr in ("lorakit_config", "lorakit_slices"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain layers back: the model transformers knows.

    4-bit layers come back as dense layers holding the dequantized weight plus the update.
    """
    return _replace_wrappers(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Take the adapters out without merging: the base model as it was."""
    return _replace_wrappers(model, merge=False)
