"""lorakit: LoRA and QLoRA fine-tuning for Hugging Face causal language models."""

from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.inject import (
    LoraConfig,
    add_lora,
    count_parameters,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lorakit.lora import LoraError, LoRALinear

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "LoraError",
    "add_lora",
    "count_parameters",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
