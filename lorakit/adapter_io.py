"""Adapters on disk in PEFT's format, both ways, all or nothing.

Files: ``adapter_config.json`` (PEFT's LoRA config: the one description of the adapter,
read by PEFT, lorakit and every serving engine) and ``adapter_model.safetensors`` (keys
``base_model.model.<path>.lora_A.weight`` of shape ``(r, d_in)`` and ``lora_B.weight`` of
shape ``(d_out, r)``). Slice adapters on fused qkv layers have no PEFT form, so they are
written losslessly as a block-structured rank ``k·r`` LoRA on the fused layer (A stacked,
B block-placed) with an explicit per-module ``rank_pattern``/``alpha_pattern`` keeping
the scaling.

Reading accepts an adapter only when lorakit implements every setting in its
``adapter_config.json`` (``lorakit.peft_config``), and checks every tensor (names,
shapes, dtypes, finite values) before the model is touched.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.fastpath import is_4bit
from lorakit.files import atomic_file
from lorakit.inject import Target, add_lora, is_extra, lora_modules, plan_injection
from lorakit.lora import LoRALinear
from lorakit.peft_config import CONFIG_NAME, config_to_peft, read_adapter_config

logger = logging.getLogger("lorakit")

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

@dataclass
class Adapter:
    """An adapter directory, read and checked: its config and its tensors under PEFT's keys."""

    path: Path
    config: LoraConfig
    base_model: str | None
    tensors: dict[str, torch.Tensor]
    base_sample: dict | None = None  # of the base it was trained on (lorakit's adapters)


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
        tmp.write_text(json.dumps(config_to_peft(model, config), indent=2, sort_keys=True) + "\n")
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
