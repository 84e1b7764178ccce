"""Adapters on disk in PEFT's format, both ways, all or nothing.

Files: ``adapter_config.json`` (PEFT's LoRA config: the one description of the adapter,
read by PEFT, lorakit and every serving engine) and ``adapter_model.safetensors`` (keys
``base_model.model.<path>.lora_A.weight`` of shape ``(r, d_in)`` and ``lora_B.weight`` of
shape ``(d_out, r)``). Slice adapters on fused qkv layers have no PEFT form, so they are
written losslessly as a block-structured rank ``k·r`` LoRA on the fused layer (A stacked,
B block-placed) with an explicit per-module ``rank_pattern``/``alpha_pattern`` keeping
the scaling.

Reading accepts an adapter only when lorakit implements every setting in its
``adapter_config.json`` (an allowlist checked against PEFT's defaults), and checks every
tensor (names, shapes, dtypes, finite values) before the model is touched.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from lorakit.config import Config, LoraConfig
from lorakit.errors import LoraError
from lorakit.files import atomic_file
from lorakit.inputs import DuplicateKey, strict_json
from lorakit.inject import Target, add_lora, is_extra, lora_modules, plan_injection
from lorakit.fastpath import is_4bit
from lorakit.lora import LoRALinear

logger = logging.getLogger("lorakit")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

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


@dataclass
class Adapter:
    """An adapter directory, read and checked: its config and its tensors under PEFT's keys."""

    path: Path
    config: LoraConfig
    base_model: str | None
    tensors: dict[str, torch.Tensor]
    base_sample: dict | None = None  # of the base it was trained on (lorakit's adapters)


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


# Safetensors metadata (which PEFT ignores): a sample of the input embeddings of the base
# an adapter was trained on.
_BASE_KEY = "lorakit_base_embeddings"


def base_sample(model: nn.Module) -> dict | None:
    """64 values of the model's input embeddings at fixed places, with their shape: the part
    of a base that quantization, PiSSA and adapters leave alone. ``None`` when the
    embeddings are not one plain tensor (sharded, or wrapped to be trained)."""
    embeddings = model.get_input_embeddings()
    weight = embeddings._parameters.get("weight") if embeddings is not None else None
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dim() != 2:
        return None
    rows, cols = weight.shape
    picks = weight.detach()[torch.arange(64) * rows // 64, torch.arange(64) * 7 % cols]
    return {"shape": [rows, cols], "values": [float(f"{v:.6g}") for v in picks.float().tolist()]}


_ANY_BASE: contextvars.ContextVar[bool] = contextvars.ContextVar("any_base", default=False)


@contextmanager
def any_base() -> Iterator[None]:
    """Inside the block, an adapter loads onto a base other than the one it was trained on
    (same shapes, other weights: e.g. an adapter of a base model put on its instruct
    version), with a warning instead of an error (the command line's ``--any-base``)."""
    token = _ANY_BASE.set(True)
    try:
        yield
    finally:
        _ANY_BASE.reset(token)


def same_base(a: dict, b: dict) -> bool:
    """Whether two ``base_sample``s come from one base, loaded in any dtype: each value
    within 2% of itself plus 1% of the sample's RMS (bfloat16 rounds by at most 0.4%)."""
    if a["shape"] != b["shape"]:
        return False
    x, y = torch.tensor(a["values"]), torch.tensor(b["values"])
    return bool(((x - y).abs() <= 0.02 * y.abs() + 0.01 * y.square().mean().sqrt()).all())


def _parse_sample(text: str | None) -> dict | None:
    """A ``base_sample`` from metadata text; ``None`` for anything malformed (it is only a hint)."""
    try:
        sample = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    if not isinstance(sample, dict):
        return None
    shape, values = sample.get("shape"), sample.get("values")
    numbers = isinstance(values, list) and len(values) == 64 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    shaped = isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)
    return {"shape": shape, "values": values} if numbers and shaped else None


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors under PEFT's keys, and the file's metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = " (only the pickle-based adapter_model.bin is there, which lorakit never loads)"
        raise LoraError(f"{path}: no {WEIGHTS_NAME}{pickled if (path / 'adapter_model.bin').exists() else ''}")
    try:
        state = load_file(weights)
        with safe_open(weights, "pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"{weights}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    problems = [f"{k} holds {t.dtype} values; adapter tensors must be floating point"
                for k, t in state.items() if not t.dtype.is_floating_point]
    problems += [f"{k} holds NaN or infinite values" for k, t in state.items()
                 if t.dtype.is_floating_point and not torch.isfinite(t).all()]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LoraError(f"{weights}: {problems[0]}{more}; the adapter is broken")
    return {k if k.startswith(PREFIX) else PREFIX + k.removeprefix("base_model."): v for k, v in state.items()}, metadata


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """Read and check an adapter directory (config and tensors), touching no model."""
    config, base = read_adapter_config(directory)
    tensors, metadata = _read_tensors(Path(directory))
    sample = _parse_sample(metadata.get(_BASE_KEY))
    return Adapter(Path(directory), config, base, tensors, sample)


# --- from model to files -------------------------------------------------------------


def _place_blocks(module: LoRALinear, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Slice factors ``B_i`` placed in one ``(d_out, k·r)`` block matrix, zeros elsewhere."""
    r = module.r
    full = blocks[0].new_zeros(module.out_features, len(blocks) * r)
    for i, (b_i, rows_i) in enumerate(zip(blocks, module.out_index.split(module.slice_sizes))):
        full[rows_i, i * r : (i + 1) * r] = b_i
    return full


def _unblock_B(module: LoRALinear, full: torch.Tensor) -> torch.Tensor | None:
    """Inverse of ``_place_blocks``; ``None`` for a matrix with weight outside the slice blocks."""
    rows = module.out_index.split(module.slice_sizes)
    blocks = [full[rows_i, i * module.r : (i + 1) * module.r] for i, rows_i in enumerate(rows)]
    return torch.cat(blocks) if torch.equal(_place_blocks(module, blocks), full) else None


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the adapter saves, under PEFT's key names: the LoRA factors of every adapted
    layer and the extras the config trains (biases, ``modules_to_save``), by structure."""
    config: LoraConfig = model.lorakit_config
    modules = lora_modules(model)
    state = {}
    for name, module in modules.items():
        A, B = module.converted_factors()
        state[f"{PREFIX}{name}.lora_A.weight"] = A
        state[f"{PREFIX}{name}.lora_B.weight"] = _place_blocks(module, list(B.split(module.slice_sizes))) if module.sliced else B
        if module.use_dora:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
    for name, param in model.named_parameters(remove_duplicate=False):
        if is_extra(name, config, set(modules)):
            state[PREFIX + name] = param.detach()
    return state


def _target_list(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted layers, else the full paths."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    by_leaf = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if by_leaf == set(targets) else sorted(targets)


def _peft_config(model: nn.Module, config: LoraConfig) -> dict:
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


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapter in PEFT's format (each file replaced atomically).

    Returns:
        The adapter directory.

    Raises:
        LoraError: when the model has no LoRA layers.
    """
    from safetensors.torch import save_file

    config = getattr(model, "lorakit_config", None)
    if config is None or not lora_modules(model):
        raise LoraError("the model has no LoRA layers to save; call add_lora(model, config) first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter_state(model).items()}
    metadata = {"format": "pt"}
    sample = None if config.modules_to_save else base_sample(model)
    if sample:
        metadata[_BASE_KEY] = json.dumps(sample)
    if any(m.initial is not None for m in lora_modules(model).values()):
        metadata["lorakit"] = (f"trained from init {config.init} at r={config.r}; saved converted to a plain LoRA "
                               "on the original base (rank doubled)")
    with atomic_file(out / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata=metadata)
    with atomic_file(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(_peft_config(model, config), indent=2, sort_keys=True) + "\n")
    return out


# --- from files to model -------------------------------------------------------------


def _existing_plan(model: nn.Module) -> dict[str, Target]:
    """The plan a model with LoRA layers was built from (r per slice, slices as PEFT saves them)."""
    return {n: Target(n, m.in_features, m.out_features, m.r * (2 if m.initial is not None else 1), m.alpha, tuple(str(i) for i in range(len(m.slice_sizes)))
                      if m.sliced else (), tuple(m.slice_sizes) if m.sliced else (), m.use_dora)
            for n, m in lora_modules(model).items()}


def expected_tensors(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT keys and shapes an adapter with ``config`` must hold for ``model``.

    A model that already has LoRA layers is described by them; otherwise by the
    injection plan of ``config``. Nothing is changed; a meta-device model will do.
    """
    existing = bool(lora_modules(model))
    plan = _existing_plan(model) if existing else plan_injection(model, config, strict=False)
    shapes = {}
    for name, target in plan.items():
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (target.rank, target.d_in)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (target.d_out, target.rank)
        if target.dora:
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (target.d_out,)
    for name, param in model.named_parameters(remove_duplicate=False):
        wrapped = name if existing else _wrapped_name(name, plan)
        if is_extra(wrapped, config, set(plan)):
            shapes[PREFIX + wrapped] = tuple(param.shape)
    return shapes


def _wrapped_name(name: str, plan: dict) -> str:
    """A parameter's name once its layer is wrapped (``q_proj.bias`` → ``q_proj.base_layer.bias``)."""
    owner, _, leaf = name.rpartition(".")
    return f"{owner}.base_layer.{leaf}" if owner in plan else name


def adapter_problems(model: nn.Module, adapter: Adapter) -> list[str]:
    """Every way ``adapter`` does not fit ``model`` (empty when it fits): unexpected,
    missing and mis-shaped tensors, and slice factors that are not block-structured."""
    try:
        expected = expected_tensors(model, adapter.config)
    except LoraError as e:
        return [str(e)]
    state = adapter.tensors
    unsupported = {"lora_embedding_": "LoRA on embeddings is not supported"}
    if not adapter.config.use_dora:
        unsupported["lora_magnitude_vector"] = "DoRA magnitudes, yet its config does not set use_dora"
    problems = [f"the adapter has {k}: {what}" for part, what in unsupported.items()
                for k in state if part in k][:1]
    problems += [f"the adapter has {k}, which is no LoRA target of this {type(model).__name__}"
                 for k in state if k not in expected and not any(part in k for part in unsupported)]
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"it has no tensor for {key}")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, the model needs {shape}")
    if adapter.config.changes_base and not lora_modules(model):
        problems += _rebuild_problems(model, adapter.config)
    if not problems:
        for name, module in lora_modules(model).items():
            if module.sliced and _unblock_B(module, state[f"{PREFIX}{name}.lora_B.weight"]) is None:
                problems.append(f"{PREFIX}{name}.lora_B.weight is not block-structured for this model's slices "
                                "(was it retrained outside lorakit?); load it onto a model without LoRA layers")
    return problems


def _rebuild_problems(model: nn.Module, config: LoraConfig) -> list[str]:
    """Why the base an unconverted PiSSA/OLoRA adapter expects cannot be rebuilt from ``model``."""
    modules = dict(model.named_modules())
    problems = []
    for name, target in plan_injection(model, config, strict=False).items():
        weight = getattr(modules[name], "weight", None)
        if weight is None or not weight.dtype.is_floating_point or is_4bit(modules[name]):
            problems.append(f"{name} is quantized: the init_lora_weights={config.init!r} adapter expects the "
                            "full-precision base with its principal part taken out")
        elif target.r > min(target.d_in, target.d_out):
            problems.append(f"{name}: r={target.r} is above min(d_in, d_out) = {min(target.d_in, target.d_out)}, "
                            f"so init_lora_weights={config.init!r} cannot rebuild its base")
    return problems[:1]


def check_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Every way the adapter in ``directory`` does not fit ``model`` (empty when it fits)."""
    return adapter_problems(model, read_adapter(directory))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter (lorakit's or PEFT's) onto ``model``.

    A model without LoRA layers gets them injected as the adapter's config says; a model
    that has them gets their weights replaced. The config, every tensor and its fit are
    checked before the model is touched, so a refused adapter leaves it unchanged.

    Raises:
        LoraError: naming the first problem (and how many more there are), or an adapter
            whose base was another model of the same shapes (unless inside ``any_base``).
    """
    adapter = read_adapter(directory)
    problems = adapter_problems(model, adapter)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise LoraError(f"{adapter.path} does not fit this model: {problems[0]}{more}")
    here = base_sample(model) if adapter.base_sample else None
    if here and not same_base(adapter.base_sample, here):
        problem = (f"{adapter.path} was trained on another base than {getattr(model, 'name_or_path', '') or 'this model'}: "
                   "the shapes fit, but this model's input embeddings differ from those of the base it was trained "
                   "on, so the adapter would not do what its training measured")
        if not _ANY_BASE.get():
            raise LoraError(f"{problem}. Pass the base it was trained on (--base), or --any-base if this is the "
                            "base you mean")
        logger.warning("%s (loaded anyway: --any-base)", problem)
    tensors = dict(adapter.tensors)
    if lora_modules(model):
        # Layers initialised from their base weight (a run being resumed) read the plain LoRA
        # they were saved as back into trained and initial factors.
        for name, module in lora_modules(model).items():
            if module.initial is not None:
                module.load_converted(tensors.pop(f"{PREFIX}{name}.lora_A.weight"),
                                      tensors.pop(f"{PREFIX}{name}.lora_B.weight"))
    else:
        add_lora(model, adapter.config, strict=False)
    modules = lora_modules(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = key[len(PREFIX) :]
            owner = name.removesuffix(".lora_B.weight")
            if owner in modules and modules[owner].sliced:
                tensor = _unblock_B(modules[owner], tensor)
            params[name].copy_(tensor)
    return model
