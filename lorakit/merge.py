"""``merge_adapters``: fold one or more adapters into the base and write a plain,
verified transformers checkpoint.

For an adapter trained on a 4-bit base (QLoRA), the default folds it into the
NF4-dequantized weights: the function it was trained against. ``into="full-precision"``
uses the original weights instead; the report gives the logit difference between the two.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter_io import load_adapter, read_adapter
from lorakit.config import SAVED_CONFIG, read_saved_config
from lorakit.errors import InputError, MergeError
from lorakit.files import atomic_directory, check_output_dir
from lorakit.inject import lora_modules, unload_lora, untie_adapted
from lorakit.model import DTYPES, adapter_base_config, from_pretrained, load_model, load_tokenizer

logger = logging.getLogger("lorakit")

PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    "Write the one-line synopsis of this Debian package.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]
# Max abs logit difference allowed, relative to the largest logit, per saved dtype.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class MergeReport:
    """What was written and how well it matches the adapter-on-base model."""

    output: Path
    dtype: str
    max_abs_diff: float
    tolerance: float
    into: str | None = None
    into_other_diff: float | None = None


def nf4_roundtrip(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True) -> torch.Tensor:
    """``weight`` as a 4-bit bitsandbytes layer sees it: quantized, then dequantized."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def _quantizable(model) -> dict[str, torch.nn.Linear]:
    """The layers transformers quantizes with bitsandbytes: every Linear but the output head."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@torch.no_grad()
def _probe_logits(model, tokenizer) -> torch.Tensor:
    # 32 tokens each: enough to compare logits, short enough for any model's positions.
    batch = tokenizer(PROBES, return_tensors="pt", padding=True, truncation=True, max_length=32)
    out = model(**batch.to(model.device)).logits.float()
    return out * batch["attention_mask"][..., None]


def _swap_weights(layers: dict[str, torch.nn.Linear], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    previous = {}
    for name, layer in layers.items():
        previous[name] = layer.weight.data
        layer.weight.data = weights[name]
    return previous


def merge_adapters(
    adapters: list[Path],
    output: Path,
    base: str | None = None,
    dtype: str | None = None,
    into: str = "dequantized",
    weights: list[float] | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Fold ``ΔW = Σ wᵢ·scalingᵢ·Bᵢ·Aᵢ`` into the base and write a verified checkpoint.

    Args:
        adapters: adapter directories (one, or several to combine).
        output: the directory to write; it must be empty or absent unless ``force``, and
            never an input (an adapter, its run directory, the base model).
        base: the base model, when not the one the adapter names.
        dtype: the saved dtype (``float32``/``bfloat16``/``float16``); default float32.
        into: for QLoRA adapters, ``dequantized`` (the NF4 weights they were trained
            against) or ``full-precision`` (the original weights).
        weights: one weight per adapter (default 1 each).
        force: replace a non-empty ``output``.
        trust_remote_code: run the base model's own code (the user's choice; never
            taken from the adapter's files).

    Raises:
        InputError: bad arguments or inputs, checked before anything loads.
        MergeError: a merged model whose logits differ from the adapter-on-base model by
            more than the dtype's tolerance (nothing is written).
    """
    adapters = [Path(a) for a in adapters]
    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"--weights {weights}: every weight must be a finite number")
    twice = next((a for i, a in enumerate(adapters) if any(a.resolve() == b.resolve() for b in adapters[:i])), None)
    if twice is not None:
        raise InputError(f"the adapter {twice} is given twice; to scale one adapter, give it once with --weights")
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if into not in ("dequantized", "full-precision"):
        raise InputError(f"--into {into!r}: choose dequantized or full-precision")
    configs = [read_adapter(a).config for a in adapters]  # every adapter checked whole before anything loads
    if len(adapters) > 1 and any(c.modules_to_save or c.bias != "none" for c in configs):
        raise InputError("adapters that also train biases or modules_to_save cannot be combined")
    if any(c.use_dora for c in configs) and (len(adapters) > 1 or weights != [1.0]):
        raise InputError("a DoRA adapter merges alone and at weight 1: its magnitudes renormalise the whole "
                         "weight, so neither a sum of adapters nor a fraction of one is defined")
    if any(c.changes_base for c in configs) and (len(adapters) > 1 or weights != [1.0]):
        raise InputError("an adapter PEFT saved without conversion (init_lora_weights pissa/olora) is an update of a "
                         "base with its principal part taken out: it merges alone and at weight 1. Save it in PEFT "
                         "with path_initial_model_for_weight_conversion to combine or scale it")
    model_cfg = adapter_base_config(adapters[0], base, trust_remote_code)
    output = Path(output)
    check_output_dir(output, [*adapters, model_cfg.name_or_path], force)

    model = load_model(model_cfg).eval()
    tokenizer = load_tokenizer(model_cfg)
    saved = read_saved_config(adapters[0])
    quant = saved.model.quantization if saved else None
    report_into, other_diff = None, None
    if quant and quant.bits == 4:
        layers = _quantizable(model)
        rounded = {n: nf4_roundtrip(m.weight.data, quant.quant_type, quant.double_quant) for n, m in layers.items()}
        original = {n: m.weight.data for n, m in layers.items()}
        report_into = into
        if into == "dequantized":
            _swap_weights(layers, rounded)

    for i, (adapter, weight) in enumerate(zip(adapters, weights)):
        load_adapter(model, adapter)
        untie_adapted(model)
        modules = lora_modules(model)
        if len(adapters) == 1:
            # The reference is the adapter-on-base model at this weight: w·scaling·B·A.
            with torch.no_grad():
                for module in modules.values():
                    module.lora_B.weight.mul_(weight)
            weight = 1.0
            reference = _probe_logits(model, tokenizer)
            if report_into:
                other = rounded if into == "full-precision" else original
                mine = _swap_weights(layers, other)
                other_diff = float((_probe_logits(model, tokenizer) - reference).abs().max())
                _swap_weights(layers, mine)
        untrained = [n for n, m in modules.items() if not m.lora_B.weight.any()]
        if untrained:
            logger.warning("%s: %d adapted layers have B = 0 (never trained), e.g. %s", adapter, len(untrained), untrained[0])
        for module in modules.values():
            module.merge(weight)
        unload_lora(model)
    if len(adapters) > 1:
        reference = _probe_logits(model, tokenizer)

    model.to(DTYPES[dtype])
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (adapters[0] / SAVED_CONFIG).is_file():
            shutil.copy(adapters[0] / SAVED_CONFIG, tmp / SAVED_CONFIG)  # eval and generate reuse its data format
        del model
        merged = from_pretrained(tmp, dtype=DTYPES[dtype]).eval()
        diff = float((_probe_logits(merged, tokenizer) - reference).abs().max())
        tolerance = TOLERANCE[dtype] * max(1.0, float(reference.abs().max()))
        if not diff <= tolerance:
            raise MergeError(f"verification failed: the merged model's logits differ from the adapter's by "
                             f"{diff:.3g} (tolerance {tolerance:.3g} for {dtype}); nothing was written")
    return MergeReport(output, dtype, diff, tolerance, report_into, other_diff)
