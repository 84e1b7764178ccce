"""Checks of a run against the model and the machine, before any weight or data loads.

The config schema (``lorakit.config``) checks what can be known from the file alone.
What needs the model's shape (its context length, its layers, the ranks they allow) or
the machine (a CUDA-only optimizer) is checked here, on a weightless skeleton of the
model, and reported all at once like every other config problem.
"""

from __future__ import annotations

import torch

from lorakit.config import Config
from lorakit.errors import ConfigError, LoraError, ModelLoadError
from lorakit.inject import plan_injection


def context_length(model_config) -> int | None:
    """The longest input the model's positions allow (``None`` when it does not say)."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def preflight(cfg: Config) -> None:
    """Raise one ``ConfigError`` listing every problem of ``cfg`` with this model and machine.

    Raises:
        ConfigError: with one line per problem, each naming its key.
    """
    from lorakit.targets import skeleton

    problems = []
    if cfg.training.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        problems.append("training.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw or adamw_8bit here")
    if cfg.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    if cfg.training.compile and cfg.model.quantization is not None and not torch.cuda.is_available():
        problems.append("training.compile: bitsandbytes' quantized CPU kernels fail under torch.compile; "
                        "set compile: false, or drop model.quantization")
    try:
        tree = skeleton(cfg.model.name_or_path, cfg.model.trust_remote_code)
    except ModelLoadError as e:
        raise ConfigError(cfg.source, [*problems, f"model.name_or_path: {e}"]) from None
    context = context_length(tree.config)
    if context is not None and cfg.data.max_length > context:
        problems.append(f"data.max_length: {cfg.data.max_length} is beyond {type(tree).__name__}'s context of "
                        f"{context} tokens; use at most {context}")
    if cfg.method == "lora":
        try:
            plan_injection(tree, cfg.lora)
        except LoraError as e:
            problems.append(f"lora: {e}")
    if problems:
        raise ConfigError(cfg.source, problems)
