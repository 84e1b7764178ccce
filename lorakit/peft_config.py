"""``adapter_config.json`` ↔ ``LoraConfig``: PEFT's LoRA settings, both ways.

Reading accepts a config only when lorakit implements every setting in it: an allowlist
of the keys it computes with, the keys that only describe the file, and every other key
accepted at its default (off) alone, or refused by name with what it would change.
Writing gives PEFT's own form of the adapter lorakit trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from lorakit.config import Config, LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import lora_modules
from lorakit.inputs import DuplicateKey, strict_json

CONFIG_NAME = "adapter_config.json"

# adapter_config.json keys lorakit reads and implements.
_IMPLEMENTED = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
    "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "init_lora_weights", "fan_in_fan_out", "use_dora",
}
# Keys that describe the file, not the function the adapter computes (or settings used only
# to initialise it, such as EVA's: after training, the saved A and B are all there is).
_METADATA = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "megatron_core", "qalora_group_size", "eva_config",
}
# PEFT settings lorakit does not implement: accepted only at their default (off), and
# what each one would change, for the refusal message.
_NOT_IMPLEMENTED = {
    "lora_bias": "a trained bias on lora_B",
    "target_parameters": "LoRA on raw parameters (e.g. mixture-of-experts weights)",
    "trainable_token_indices": "trained rows of the embedding matrix (trainable tokens)",
    "alora_invocation_tokens": "activated LoRA (the update applies only after the invocation tokens)",
    "use_qalora": "QA-LoRA (the adapter reads group-pooled inputs)",
    "layer_replication": "replicated base layers (the model's structure changes)",
    "megatron_config": "Megatron-LM tensor-parallel layers",
    "loftq_config": "LoftQ (the adapter expects a LoftQ-quantized base)",
    "corda_config": "CorDA initialisation (the adapter expects a modified base)",
    "lora_ga_config": "LoRA-GA initialisation (the adapter expects a modified base)",
    "arrow_config": "Arrow routing between several adapters",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
    "ensure_weight_tying": "tied modules_to_save",
}
# init_lora_weights values that leave the base model as it was (the saved A and B are all there is),
# and those whose change to the base lorakit rebuilds exactly from the base itself.
_PLAIN_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "eva": "kaiming"}
_REBUILT_INITS = {"pissa": "pissa", "olora": "olora"}
_CONVERTED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_off(value) -> bool:
    return value in (None, False, {}, [], "")


def _refusals(peft: dict) -> list[str]:
    """Every key of ``peft`` whose meaning lorakit would not reproduce exactly."""
    problems = []
    for key, value in peft.items():
        if key in _IMPLEMENTED or key in _METADATA:
            continue
        if _is_off(value):
            continue  # a feature switched off, whatever its name
        what = _NOT_IMPLEMENTED.get(key, "a setting unknown to lorakit (from a newer PEFT?)")
        problems.append(f"{key}={value!r}: {what}")
    init = peft.get("init_lora_weights", True)
    if init not in _PLAIN_INITS and init not in _REBUILT_INITS:
        if isinstance(init, str) and init.startswith(_CONVERTED_INITS):
            why = "a randomized SVD, so that base cannot be rebuilt" if "_niter_" in init else "not rebuildable here"
            problems.append(f"init_lora_weights={init!r}: saved without conversion, the adapter expects a base "
                            f"with its principal components taken out ({why}); save it in PEFT with "
                            "path_initial_model_for_weight_conversion to get a plain LoRA that lorakit loads")
        else:
            problems.append(f"init_lora_weights={init!r}: an initialisation lorakit does not know")
    return problems


# PEFT task types whose models are not causal language models (another head or architecture).
_OTHER_TASKS = {"SEQ_CLS": "sequence classifier", "TOKEN_CLS": "token classifier",
                "QUESTION_ANS": "question-answering model", "SEQ_2_SEQ_LM": "sequence-to-sequence model"}
# JSON types of the keys whose value lorakit computes with: PEFT uses them as Python reads
# them, so "false" would be true there and "8" an error; any other type is refused.
_JSON_TYPES = {"r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": bool,
               "use_dora": bool}


def _type_problems(peft: dict) -> list[str]:
    """Values of ``peft`` whose JSON type is not the one PEFT computes with."""
    def fits(value, types) -> bool:
        return isinstance(value, types) and (types is bool or not isinstance(value, bool))

    problems = [f"{key}: {peft[key]!r} is not a JSON {'true/false' if types is bool else 'number'}"
                for key, types in _JSON_TYPES.items() if peft.get(key) is not None and not fits(peft[key], types)]
    for key, types in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = peft.get(key)
        if isinstance(pattern, dict):
            problems += [f"{key}: {name!r}: {value!r} is not a JSON number" for name, value in pattern.items()
                         if not fits(value, types)]
    return problems


def config_from_peft(peft: dict, source: str = CONFIG_NAME) -> LoraConfig:
    """The ``LoraConfig`` an ``adapter_config.json`` describes.

    Raises:
        LoraError: a non-LoRA adapter, missing ``target_modules``, invalid values, or
            settings lorakit does not implement (each named, with what it means).
    """
    if not isinstance(peft, dict):
        raise LoraError(f"{source}: expected a JSON object, got {type(peft).__name__}")
    if peft.get("peft_type") != "LORA":
        raise LoraError(f"{source}: peft_type is {peft.get('peft_type')!r}; only LORA adapters load")
    if peft.get("task_type") in _OTHER_TASKS:
        raise LoraError(f"{source}: task_type {peft['task_type']} is an adapter for a {_OTHER_TASKS[peft['task_type']]}, "
                        "whose head and outputs a causal language model does not have; lorakit adapts causal LMs")
    problems = _refusals(peft)
    if problems:
        raise LoraError(f"{source}: lorakit cannot load this adapter exactly:\n  - " + "\n  - ".join(problems))
    problems = _type_problems(peft)
    if problems:
        raise LoraError(f"{source}: invalid values:\n  - " + "\n  - ".join(problems))
    if not peft.get("target_modules"):
        raise LoraError(f"{source}: no target_modules, so which layers the adapter belongs to is unknown")
    layers = peft.get("layers_to_transform")
    fields = {
        "r": peft.get("r", 8), "alpha": peft.get("lora_alpha", 8), "dropout": peft.get("lora_dropout", 0.0),
        "target_modules": peft["target_modules"], "bias": peft.get("bias", "none"),
        "use_rslora": peft.get("use_rslora", False), "modules_to_save": peft.get("modules_to_save"),
        "layers": [layers] if isinstance(layers, int) else layers, "layers_pattern": peft.get("layers_pattern"),
        "exclude_modules": peft.get("exclude_modules"), "rank_pattern": peft.get("rank_pattern") or None,
        "alpha_pattern": peft.get("alpha_pattern") or None,
        "init": {**_PLAIN_INITS, **_REBUILT_INITS}[peft.get("init_lora_weights", True)], "use_dora": peft.get("use_dora") or False,
    }
    try:
        return LoraConfig(**fields)
    except ValidationError as e:
        names = {"alpha": "lora_alpha", "dropout": "lora_dropout", "layers": "layers_to_transform"}
        lines = [f"{names.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else '?'}: "
                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise LoraError(f"{source}: invalid values:\n  - " + "\n  - ".join(lines)) from None


def with_init_from(config: Config) -> Config:
    """``config`` with the lora section of the adapter its ``lora.init_from`` names (r,
    alpha, targets...: that adapter's own), so that whatever plans, trains or saves the run
    sees what will train."""
    if config.method != "lora" or not config.lora.init_from:
        return config
    adapter, _ = read_adapter_config(config.lora.init_from)
    return config.model_copy(update={"lora": dataclasses.replace(adapter, init_from=config.lora.init_from)})


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraConfig, str | None]:
    """The adapter's ``LoraConfig`` and the base model it names (``None`` when it names none).

    Raises:
        LoraError: no adapter there, invalid JSON, or an adapter lorakit cannot load exactly.
    """
    path = Path(directory)
    if not path.is_dir():
        raise LoraError(f"{path}: no such adapter directory")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise LoraError(f"{path}: no {CONFIG_NAME} here; is this an adapter directory?")
    if file.stat().st_size > 10_000_000:
        raise LoraError(f"{file}: {file.stat().st_size:,} bytes; an adapter config is a few kilobytes")
    try:
        peft = strict_json(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{file}: not valid JSON ({e})") from None
    except DuplicateKey as e:
        raise LoraError(f"{file}: the key {e.args[0]!r} is given twice; tools disagree on which one counts") from None
    config = config_from_peft(peft, str(file))
    return config, peft.get("base_model_name_or_path") or None


def _target_list(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted layers, else the full paths."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    by_leaf = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if by_leaf == set(targets) else sorted(targets)


def config_to_peft(model: nn.Module, config: LoraConfig) -> dict:
    """The ``adapter_config.json`` of the model's adapter, as PEFT writes one (slice and
    PiSSA/OLoRA adapters at their saved rank, with per-module patterns keeping the scaling)."""
    modules = lora_modules(model)
    grow = (lambda k: math.sqrt(k)) if config.use_rslora else (lambda k: k)
    converted = any(m.initial is not None for m in modules.values())
    r, alpha = (2 * config.r, config.alpha * grow(2)) if converted else (config.r, config.alpha)
    rank_pattern, alpha_pattern = {}, {}
    for name, module in modules.items():
        # A slice adapter is saved at rank k·r, a PiSSA/OLoRA one at 2r: alpha grows with it
        # so that alpha/r (or alpha/sqrt(r)) is unchanged.
        k = len(module.slice_sizes) if module.sliced else 2 if module.initial is not None else 1
        rank, module_alpha = k * module.r, module.alpha * grow(k)
        if (rank, module_alpha) != (r, alpha):
            rank_pattern[re.escape(name)] = rank
            alpha_pattern[re.escape(name)] = module_alpha
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_list(model, list(modules)),
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules.values()),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": config.modules_to_save,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_bias": False,
    }
