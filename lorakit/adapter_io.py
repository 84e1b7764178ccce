"""Adapters on disk in PEFT's format, both ways, with strict checks.

Files: ``adapter_config.json`` (PEFT's LoRA config), ``adapter_model.safetensors``
(keys ``base_model.model.<path>.lora_A.weight`` of shape ``(r, d_in)`` and
``lora_B.weight`` of shape ``(d_out, r)``) and ``lorakit_adapter.json`` (lorakit's own
config, which PEFT ignores). Slice adapters on fused qkv layers have no PEFT form, so
they are written losslessly as a block-structured rank ``k·r`` LoRA on the fused layer
(A stacked, B block-placed) with ``rank_pattern``/``alpha_pattern`` keeping the scaling.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.inject import LoraConfig, add_lora, find_targets, lora_modules, trainable_state
from lorakit.lora import LoraError, LoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAKIT_NAME = "lorakit_adapter.json"
PREFIX = "base_model.model."
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "lora_bias", "target_parameters": "target_parameters"}


def _place_blocks(module: LoRALinear, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Slice factors ``B_i`` placed in one ``(d_out, k·r)`` block matrix, zeros elsewhere."""
    r = module.r
    full = blocks[0].new_zeros(module.out_features, len(blocks) * r)
    for i, (b_i, rows_i) in enumerate(zip(blocks, module.out_index.split(module.slice_sizes))):
        full[rows_i, i * r : (i + 1) * r] = b_i
    return full


def _unblock_B(module: LoRALinear, full: torch.Tensor, name: str) -> torch.Tensor:
    """Inverse of ``_place_blocks``; refuses a matrix with weight outside the slice blocks."""
    rows = module.out_index.split(module.slice_sizes)
    blocks = [full[rows_i, i * module.r : (i + 1) * module.r] for i, rows_i in enumerate(rows)]
    if not torch.equal(_place_blocks(module, blocks), full):
        raise LoraError(f"{name}: lora_B is not block-structured for slices; cannot load as slices")
    return torch.cat(blocks)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything the adapter saves, under PEFT's key names."""
    state = {PREFIX + n: t.detach() for n, t in trainable_state(model).items()}
    for name, module in lora_modules(model).items():
        if module.sliced:
            blocks = module.lora_B.weight.detach().split(module.slice_sizes)
            state[f"{PREFIX}{name}.lora_B.weight"] = _place_blocks(module, list(blocks))
    return state


def _target_list(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted layers, else the full paths."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    by_leaf = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if by_leaf == set(targets) else sorted(targets)


def _peft_config(model: nn.Module, config: LoraConfig) -> dict:
    modules = lora_modules(model)
    rank_pattern, alpha_pattern = {}, {}
    for name, module in modules.items():
        k = len(module.slice_sizes)
        if module.sliced and k > 1:
            # Keep alpha/r (or alpha/sqrt(r)) unchanged at rank k·r.
            rank_pattern[re.escape(name)] = k * module.r
            alpha_pattern[re.escape(name)] = module.alpha * (math.sqrt(k) if config.use_rslora else k)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_list(model, list(modules)),
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules.values()),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "modules_to_save": config.modules_to_save,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_bias": False,
    }


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapter in PEFT's format (each file replaced atomically).

    Returns:
        The adapter directory.

    Raises:
        LoraError: when the model has no LoRA layers.
    """
    config = getattr(model, "lorakit_config", None)
    if config is None or not lora_modules(model):
        raise LoraError("the model has no LoRA layers to save; call add_lora(model, config) first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter_state(model).items()}
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    for name, payload in ((CONFIG_NAME, _peft_config(model, config)), (LORAKIT_NAME, config.to_dict())):
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
        _write_atomic(out / name, lambda p, t=text: p.write_text(t))
    return out


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """The adapter's ``LoraConfig`` (lorakit's own file when present, else PEFT's) and the
    per-module patterns (``rank_pattern``/``alpha_pattern``) it needs on top.

    Raises:
        LoraError: for a missing directory or file, a non-LoRA adapter, or PEFT features
            lorakit does not implement.
    """
    path = Path(directory)
    peft_file = path / CONFIG_NAME
    if not peft_file.is_file():
        raise LoraError(f"{path}: no {CONFIG_NAME} here; is this an adapter directory?")
    peft = json.loads(peft_file.read_text())
    if peft.get("peft_type") != "LORA":
        raise LoraError(f"{peft_file}: peft_type is {peft.get('peft_type')!r}; only LORA adapters load")
    for key, what in _UNSUPPORTED.items():
        if peft.get(key):
            raise LoraError(f"{peft_file}: the adapter uses {what}, which lorakit does not support")
    own = path / LORAKIT_NAME
    if own.is_file():
        # lorakit's file describes the slices directly; the patterns only encode them for PEFT.
        return LoraConfig(**json.loads(own.read_text())), {}
    layers = peft.get("layers_to_transform")
    config = LoraConfig(
        r=peft.get("r", 8),
        alpha=peft.get("lora_alpha", 8),
        dropout=peft.get("lora_dropout", 0.0),
        target_modules=peft["target_modules"],
        bias=peft.get("bias", "none"),
        use_rslora=peft.get("use_rslora", False),
        modules_to_save=peft.get("modules_to_save"),
        layers=[layers] if isinstance(layers, int) else layers,
    )
    return config, {k: peft.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key matching the end of ``name``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pattern_ranks(names: list[str], config: LoraConfig, patterns: dict) -> dict[str, tuple[int, float]]:
    """Per-module ``(r, alpha)`` from PEFT's ``rank_pattern``/``alpha_pattern``."""
    ranks = {}
    for name in names:
        r = pattern_value(patterns.get("rank_pattern"), name, config.r)
        alpha = pattern_value(patterns.get("alpha_pattern"), name, config.alpha)
        if (r, alpha) != (config.r, config.alpha):
            ranks[name] = (r, alpha)
    return ranks


def _expected_shapes(model: nn.Module, config: LoraConfig, patterns: dict) -> dict[str, tuple[int, ...]]:
    """PEFT keys and shapes the adapter must hold for this model, computed without changing it."""
    modules = dict(model.named_modules())
    existing = lora_modules(model)
    if existing:
        targets = {n: [None] * len(m.slice_sizes) if m.sliced else [] for n, m in existing.items()}
        ranks = {n: (m.r, m.alpha) for n, m in existing.items()}
    else:
        targets = find_targets(model, config)
        ranks = _pattern_ranks(list(targets), config, patterns)
    shapes = {}
    for name, roles in targets.items():
        module = modules[name]
        base = module.base_layer if isinstance(module, LoRALinear) else module
        d_in, d_out = base.weight.shape if isinstance(base, Conv1D) else (base.in_features, base.out_features)
        r = ranks.get(name, (config.r, config.alpha))[0] * max(1, len(roles))
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, d_in)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (d_out, r)
    for name, param in model.named_parameters(remove_duplicate=False):
        extra = _is_bias_target(name, config, targets) or _in_modules_to_save(name, config)
        if extra and not re.search(r"\.lora_[AB]\.", name):
            shapes[PREFIX + name if existing else PREFIX + _wrapped_name(name, targets)] = tuple(param.shape)
    return shapes


def _wrapped_name(name: str, targets: dict) -> str:
    """A parameter's name once its layer is wrapped (``q_proj.bias`` → ``q_proj.base_layer.bias``)."""
    owner, _, leaf = name.rpartition(".")
    return f"{owner}.base_layer.{leaf}" if owner in targets else name


def _is_bias_target(name: str, config: LoraConfig, targets: dict) -> bool:
    if config.bias == "none" or not name.endswith(".bias"):
        return False
    owner = name[: -len(".bias")].removesuffix(".base_layer")
    return config.bias == "all" or owner in targets


def _in_modules_to_save(name: str, config: LoraConfig) -> bool:
    owner = name.rpartition(".")[0]
    return any(owner == e or owner.endswith("." + e) for e in config.modules_to_save or [])


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = " (only the pickle-based adapter_model.bin is there, which lorakit never loads)"
        raise LoraError(f"{path}: no {WEIGHTS_NAME}{pickled if (path / 'adapter_model.bin').exists() else ''}")
    state = load_file(weights)
    return {k if k.startswith(PREFIX) else PREFIX + k.removeprefix("base_model."): v for k, v in state.items()}


def _problems(model: nn.Module, config: LoraConfig, patterns: dict, state: dict) -> list[str]:
    try:
        expected = _expected_shapes(model, config, patterns)
    except LoraError as e:
        return [str(e)]
    problems = [f"the adapter has {k}, which is no LoRA target of this {type(model).__name__}"
                for k in state if k not in expected]
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"it has no tensor for {key}")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, the model needs {shape}")
    return problems


def check_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Every way the adapter in ``directory`` does not fit ``model`` (empty when it fits).

    Only names and shapes are compared, so a weightless (meta-device) model will do.
    """
    path = Path(directory)
    config, patterns = read_adapter_config(path)
    return _problems(model, config, patterns, _load_state(path))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter (lorakit's or PEFT's) onto ``model``.

    A model without LoRA layers gets them injected as the adapter's config says; a model
    that has them gets their weights replaced. Every key and shape is checked before the
    model is touched, so a mismatch leaves it unchanged.

    Raises:
        LoraError: naming the first missing, unexpected or mis-shaped tensor.
    """
    path = Path(directory)
    config, patterns = read_adapter_config(path)
    state = _load_state(path)
    problems = _problems(model, config, patterns, state)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise LoraError(f"{path} does not fit this model: {problems[0]}{more}")
    if not lora_modules(model):
        add_lora(model, config, _pattern_ranks(list(find_targets(model, config)), config, patterns))
    modules = lora_modules(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            name = key[len(PREFIX) :]
            owner = name.removesuffix(".lora_B.weight")
            if owner in modules and modules[owner].sliced:
                tensor = _unblock_B(modules[owner], tensor, owner)
            params[name].copy_(tensor)
    return model
