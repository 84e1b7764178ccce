"""Choosing which layers get LoRA, wrapping them in place, and the trainable state.

Wrappers replace ``parent.<child>`` without renaming anything, so a LoRA parameter
named ``model.layers.0.self_attn.q_proj.lora_A.weight`` in memory is PEFT's
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` on disk.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.lora import LoRALinear, SharedInput, is_4bit

logger = logging.getLogger("lorakit")

ROLES = ("q", "k", "v", "o")
# Output projection names, tried in order (Llama/Qwen/Phi-3, OPT, GPT-2, GPT-NeoX).
_OUTPUT_SUFFIXES = ("o_proj", "out_proj", "attn.c_proj", "attention.dense")


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


def block_index(name: str, layers_pattern: list[str] | str | None = None) -> int | None:
    """The transformer block a module belongs to, by PEFT's rule: the number after
    ``<layers_pattern>.`` or, without a pattern, the first numbered part of the path."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns or [None]:
        regex = r".*?\.[^.]*\.(\d+)\." if pattern is None else rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)\."
        match = re.match(regex, name + ".")
        if match:
            return int(match.group(1))
    return None


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


def find_targets(model: nn.Module, config: LoraConfig, strict: bool = True) -> dict[str, list[str]]:
    """The layers ``config`` adapts, as ``{module path: fused slices}``.

    The slice list is empty for a whole layer, or names the roles (``q``/``k``/``v``)
    adapted inside a fused qkv layer.

    Args:
        strict: lorakit's rules for configs: roles ``q``/``k``/``v``/``o`` are resolved,
            and a ``target_modules`` entry that matches nothing is an error (a typo would
            otherwise silently adapt fewer layers). ``False`` applies PEFT's rules, used
            for adapter files: entries are module names only, and something must match.

    Raises:
        LoraError: when the spec, or one entry of it, matches nothing, or ``layers``
            names blocks the model does not have; the message lists what exists.
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
            hits = _resolve_role(model, entry, names) if strict and entry in ROLES else {}
            hits = hits or {n: [] for n in names if _matches(n, entry)}
            if not hits and strict:
                raise LoraError(_no_match_message(model, repr(entry), names))
            for n, roles in hits.items():
                found[n] = sorted(set(found.get(n, [])) | set(roles), key="qkv".index)
    regex = isinstance(spec, str) and spec != "all-linear"
    if config.layers is not None and (strict or not regex):  # PEFT ignores layers_to_transform for a regex
        present = {block_index(n, config.layers_pattern) for n in names} - {None}
        missing = sorted(set(config.layers) - present)
        if missing:
            shown = f"0-{max(present)}" if present and present == set(range(max(present) + 1)) else sorted(present)
            raise LoraError(f"lora.layers {missing} do not exist in {type(model).__name__}: its blocks are {shown}")
        found = {n: s for n, s in found.items() if block_index(n, config.layers_pattern) in config.layers}
    # PEFT never puts an adapter on a module that is trained whole (modules_to_save).
    whole = config.modules_to_save or []
    trained_whole = [n for n in found if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in whole)]
    if trained_whole and strict and isinstance(spec, list):  # a list named it: the config says two things
        raise LoraError(f"lora.target_modules adapts {trained_whole[0]}, which lora.modules_to_save trains whole; "
                        "a layer is either adapted or trained whole: drop it from one of them")
    found = {n: s for n, s in found.items() if n not in trained_whole}
    excluded = config.exclude_modules
    if excluded:
        found = {n: s for n, s in found.items()
                 if not (re.fullmatch(excluded, n) if isinstance(excluded, str) else any(_matches(n, e) for e in excluded))}
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


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key matching the end of ``name``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(frozen=True)
class Target:
    """One layer the injection will adapt, with everything its tensors depend on."""

    name: str
    d_in: int
    d_out: int
    r: int  # per slice
    alpha: float
    roles: tuple[str, ...] = ()  # q/k/v slices of a fused layer; () = the whole layer
    slice_sizes: tuple[int, ...] = ()
    dora: bool = False  # also a trained magnitude per output row

    @property
    def rank(self) -> int:
        """Rows of A: ``r`` per slice."""
        return self.r * max(1, len(self.roles))

    @property
    def params(self) -> int:
        """Trainable parameters this layer adds (A and B, and DoRA's magnitudes)."""
        return self.rank * self.d_in + self.r * (sum(self.slice_sizes) if self.roles else self.d_out) \
            + (self.d_out if self.dora else 0)


def _shape(module: nn.Module) -> tuple[int, int]:
    base = module.base_layer if isinstance(module, LoRALinear) else module
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out)
    return int(base.in_features), int(base.out_features)


def plan_injection(model: nn.Module, config: LoraConfig, strict: bool = True) -> dict[str, Target]:
    """What ``add_lora(model, config)`` will adapt, computed without changing the model.

    The one place targets, fused slices, per-layer ranks and alphas and their limits are
    decided: ``add_lora`` applies this plan, adapter loading derives the tensors it
    expects from it, and ``lorakit targets``/``plan`` report it. A meta-device model
    (no weights) will do.

    Raises:
        LoraError: nothing matches, ``layers`` that do not exist, or a rank larger than
            a targeted layer's dimensions.
    """
    modules = dict(model.named_modules())
    plan, too_big = {}, []
    for name, roles in find_targets(model, config, strict).items():
        d_in, d_out = _shape(modules[name])
        r = int(pattern_value(config.rank_pattern, name, config.r))
        alpha = float(pattern_value(config.alpha_pattern, name, config.alpha))
        sizes = ()
        if roles:
            rows = _fused_rows(model, name, modules[name])
            sizes = tuple(len(rows[role]) for role in roles)
        if roles and config.use_dora:
            raise LoraError(f"lora.use_dora adapts whole layers, and {name} would get q/k/v slices: target it "
                            f"by name ({name.rsplit('.', 1)[-1]}) instead of by role")
        if roles and config.changes_base:
            raise LoraError(f"lora.init: {config.init} adapts whole layers, and {name} would get q/k/v slices: "
                            f"target it by name ({name.rsplit('.', 1)[-1]}) instead of by role")
        if strict and r > min(d_in, *(sizes or (d_out,))):  # PEFT allows it: adapters may carry it
            too_big.append(f"{name} r={r}, {d_in} → {d_out}{', slices ' + str(list(sizes)) if sizes else ''}")
        plan[name] = Target(name, d_in, d_out, r, alpha, tuple(roles), sizes, config.use_dora)
    for key in (config.rank_pattern or {}).keys() | (config.alpha_pattern or {}).keys():
        if strict and plan and not any(pattern_value({key: True}, name, False) for name in plan):
            which = "rank_pattern" if key in (config.rank_pattern or {}) else "alpha_pattern"
            raise LoraError(f"lora.{which}: {key!r} matches none of the adapted layers (e.g. {next(iter(plan))}); "
                            "a key is a regex matched against the end of a layer's path")
    for entry in config.modules_to_save or []:
        if not any(n and _matches(n, entry) for n in modules):
            raise LoraError(f"modules_to_save entry {entry!r} matched no module of {type(model).__name__}")
    if too_big:
        raise LoraError(f"lora.r is larger than the dimensions of {len(too_big)} targeted layer(s), e.g. "
                        f"{too_big[0]}: a rank above min(d_in, d_out) adds parameters and no capacity; lower lora.r")
    return plan


def add_lora(model: nn.Module, config: LoraConfig, strict: bool = True) -> nn.Module:
    """Wrap the targeted layers with LoRA in place and freeze everything else.

    Args:
        model: a transformers causal LM (or any module with the same naming).
        config: what to adapt (see ``plan_injection``).
        strict: see ``find_targets``.

    Returns:
        The same model, with ``model.lorakit_config`` set.

    Raises:
        LoraError: when the model already has LoRA layers or the plan is impossible.
    """
    if lora_modules(model):
        raise LoraError("the model already has LoRA layers; unload_lora(model) them first")
    plan = plan_injection(model, config, strict)
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for name, target in plan.items():
        base = modules[name]
        rows = _fused_rows(model, name, base) if target.roles else None
        wrapper = LoRALinear(
            base,
            r=target.r,
            alpha=target.alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            fan_in_fan_out=isinstance(base, Conv1D),
            out_slices=[rows[role] for role in target.roles] if rows else None,
            use_dora=config.use_dora,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, wrapper)
    _group_shared_inputs(model)
    _unfreeze_extras(model, config)
    model.lorakit_config = config
    trainable, total = count_parameters(model)
    logger.info(
        "LoRA on %d layers: %s trainable of %s parameters (%.3f%%)",
        len(plan), f"{trainable:,}", f"{total:,}", 100 * trainable / total,
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
        if family is not None and not module.sliced and module.dropout and not module.use_dora:
            groups.setdefault((parent, family), []).append(module)
    for members in groups.values():
        if len(members) > 1 and len({(m.dropout, m.lora_A.weight.dtype, m.in_features) for m in members}) == 1:
            shared = SharedInput(members)
            for member in members:
                member.shared_input = shared


def is_extra(name: str, config: LoraConfig, adapted: set[str]) -> bool:
    """Whether parameter ``name`` trains (and is saved) beside the LoRA factors: a bias the
    config trains, or a weight anywhere inside a ``modules_to_save`` module.

    Args:
        name: the parameter's path in a model with LoRA layers (``…q_proj.base_layer.bias``).
        adapted: the paths of the adapted layers.
    """
    owner, _, leaf = name.rpartition(".")
    if re.search(r"(^|\.)lora_[AB]$", owner):
        return False
    if config.bias != "none" and leaf == "bias":
        if config.bias == "all" or owner.removesuffix(".base_layer") in adapted:
            return True
    parts = owner.split(".")
    enclosing = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_matches(module, entry) for module in enclosing for entry in config.modules_to_save or [])


def _unfreeze_extras(model: nn.Module, config: LoraConfig) -> None:
    """The LoRA factors, and the biases and ``modules_to_save`` that train beside them."""
    for module in lora_modules(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for entry in config.modules_to_save or []:
        for module in [m for n, m in model.named_modules() if n and _matches(n, entry)]:
            for sub in module.modules():
                for pname, param in list(sub.named_parameters(recurse=False)):
                    # A private copy, as PEFT makes: training must not move a tied twin.
                    setattr(sub, pname, nn.Parameter(param.detach().clone()))
    adapted = set(lora_modules(model))
    for name, param in model.named_parameters():
        if is_extra(name, config, adapted):
            param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; packed 4-bit weights count as unpacked."""
    trainable = total = 0
    for param in model.parameters():
        n = param.quant_state.shape.numel() if hasattr(param, "quant_state") else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def untie_adapted(model: nn.Module) -> list[str]:
    """Give adapted layers that share their weight with another module (a tied output
    head and input embeddings) a private copy, so that merging changes only them.

    Returns:
        The layers untied; the model's config then says its embeddings are not tied.
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    untied = []
    for name, module in lora_modules(model).items():
        weight = module.base_layer.weight
        if owners.get(id(weight), 0) > 1 and not is_4bit(module.base_layer):
            module.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(name)
    if untied:
        for config in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        logger.warning("%s shares its weight with the input embeddings: it is untied so that merging the "
                       "adapter changes only it (the merged model stores both matrices)", ", ".join(untied))
    return untied


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (idempotent); LoRA layers stay in place.

    A tied output head is untied first (``untie_adapted``): merging must not move the
    input embeddings.
    """
    untie_adapted(model)
    for module in lora_modules(model).values():
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight (idempotent)."""
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def _replace_wrappers(model: nn.Module, merge: bool) -> nn.Module:
    if merge:
        untie_adapted(model)
    modules = dict(model.named_modules())
    for name, module in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        plain = module.merged_linear() if merge else module.base_layer
        if not merge:
            module.unmerge()
            module.restore_base()
        setattr(modules[parent_name] if parent_name else model, child, plain)
    if hasattr(model, "lorakit_config"):
        del model.lorakit_config
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain layers back: the model transformers knows.

    4-bit layers come back as dense layers holding the dequantized weight plus the update.
    """
    return _replace_wrappers(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Take the adapters out without merging: the base model as it was (for layers that a
    PiSSA/OLoRA init changed, up to the weight dtype's rounding)."""
    return _replace_wrappers(model, merge=False)
