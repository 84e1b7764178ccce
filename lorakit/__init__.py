"""lorakit: LoRA and QLoRA fine-tuning for Hugging Face causal language models.

The public names are imported on first use (PEP 562), so ``import lorakit`` and the
command line's help load neither torch nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "LoRALinear": "lorakit.lora",
    "LoraConfig": "lorakit.config",
    "LoraError": "lorakit.errors",
    "LorakitError": "lorakit.errors",
    "add_lora": "lorakit.inject",
    "count_parameters": "lorakit.inject",
    "load_adapter": "lorakit.adapter_io",
    "merge_lora": "lorakit.inject",
    "save_adapter": "lorakit.adapter_io",
    "unload_lora": "lorakit.inject",
    "unmerge_lora": "lorakit.inject",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
