"""Training checkpoints: written whole or not at all, and resumed exactly.

``checkpoints/step-N/`` holds the adapter (PEFT format), ``optimizer.pt`` (the whole
optimizer state keyed by parameter name, tensors only, read back with
``weights_only=True``; gathered from the shards under FSDP), ``state.json`` (step, which fixes the data
position; scheduler; process count; config fingerprint) and one ``rng-<rank>.safetensors``
per process. It is written under a temporary
name and renamed, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.config import Config, config_to_dict
from lorakit.inject import lora_modules
from lorakit.sharding import load_optimizer_state, optimizer_state, whole_parameters

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys that may change between a run and its resumption without changing its result.
_FREE_KEYS = {"max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "log_every", "output_dir"}


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from."""


def fingerprint(config: Config) -> dict:
    """The parts of the config a resumed run must share with the original."""
    data = config_to_dict(config)
    data["training"] = {k: v for k, v in data["training"].items() if k not in _FREE_KEYS}
    return data


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, config: Config, keep: int,
                    accelerator) -> Path:
    """Write ``root/step-<step>`` atomically and prune to the newest ``keep`` checkpoints.

    Every process calls it: the main one writes the adapter, optimizer and state, each
    process its own RNG state, then the main one renames the directory into place.
    """
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    main = accelerator.is_main_process
    moments = optimizer_state(model, optimizer)  # a collective under FSDP: every process takes part
    with whole_parameters(model):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            if lora_modules(model):
                save_adapter(model, tmp / "adapter")
            else:  # full fine-tuning: every weight (tied ones once)
                tmp.mkdir(parents=True)
                save_model(model, str(tmp / "model.safetensors"))
    if main:
        torch.save(moments, tmp / "optimizer.pt")
        state = {
            "step": step,
            "processes": accelerator.num_processes,
            "scheduler": scheduler.state_dict(),
            "config_hash": _hash(fingerprint(config)),
            "config": fingerprint(config),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / f"rng-{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, half-written ones are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out


def load_checkpoint(path: Path, model, optimizer, scheduler, config: Config, accelerator) -> int:
    """Restore adapter, optimizer, scheduler and this process's RNG from ``path``; returns its step.

    Raises:
        ResumeError: when the config or the number of processes changed in a way that
            would change the result.
    """
    state = json.loads((path / "state.json").read_text())
    if state["config_hash"] != _hash(fingerprint(config)):
        diffs = "; ".join(_differences(state["config"], fingerprint(config)))
        raise ResumeError(f"cannot resume from {path}: the config changed ({diffs})")
    if state["processes"] != accelerator.num_processes:
        raise ResumeError(f"cannot resume from {path}: it was written by {state['processes']} process(es), "
                          f"this run has {accelerator.num_processes}; use --num-processes {state['processes']}")
    with whole_parameters(model, write_back=True):
        if (path / "adapter").is_dir():
            load_adapter(model, path / "adapter")
        else:
            load_model(model, str(path / "model.safetensors"))
    load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(path / f"rng-{accelerator.process_index}.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])
