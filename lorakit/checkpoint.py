"""Training checkpoints: written whole or not at all, checked, and resumed exactly.

``checkpoints/step-N/`` holds the adapter (PEFT format; the whole model for full
fine-tuning), ``optimizer.safetensors`` (the whole optimizer state's tensors, keyed by
parameter name; gathered from the shards under FSDP), one ``rng-<rank>.safetensors`` per
process, and ``state.json``: step (which fixes the data position), the optimizer's other
settings, scheduler, process count, config fingerprint, the training data's fingerprint
and the SHA-256 of every other file. Nothing in it is a pickle. It is written under a
temporary name and renamed, so a kill at any moment leaves the previous checkpoint
intact; a file damaged later (a truncated copy, a bad disk) is caught by its checksum,
and resuming falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.config import Config, config_to_dict
from lorakit.errors import InputError, ResumeError, TrainingError
from lorakit.files import atomic_directory, check_replaceable, temporary_path
from lorakit.inject import lora_modules
from lorakit.sharding import load_optimizer_state, optimizer_state, whole_parameters

logger = logging.getLogger("lorakit")

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys that may change between a run and its resumption without changing what it computes
# up to the checkpoint; max_steps and epochs change the schedule from there on (resume says how).
_FREE_KEYS = {"max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "log_every", "output_dir"}
# Keys a resumed run may change to recover from a divergence (a NaN loss); recorded in metrics.jsonl.
RECOVERY_KEYS = ("lr", "max_grad_norm", "warmup_steps")


def fingerprint(config: Config) -> dict:
    """The parts of the config a resumed run must share with the original."""
    data = config_to_dict(config)
    data["training"] = {k: v for k, v in data["training"].items() if k not in _FREE_KEYS and k not in RECOVERY_KEYS}
    return data


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


OPTIMIZER = "optimizer.safetensors"


def _split_moments(moments: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors' flat tensors and the plain values JSON holds
    (param groups, steps kept as numbers), each keyed by its path (``"<param>/exp_avg"``;
    8-bit optimizers nest dicts of tensors)."""
    tensors, plain, seen = {}, {}, set()

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{path}/{key}", inner)
        elif isinstance(value, torch.Tensor):
            value = value.detach().contiguous()
            if value.untyped_storage().data_ptr() in seen:  # shared (8-bit optimizers' quantization maps)
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
            tensors[path] = value
        else:
            plain[path] = value

    for name, values in moments["state"].items():
        walk(name, values)
    return tensors, {"param_groups": moments["param_groups"], "state": plain}


def _join_moments(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict = {}
    for path, value in [*plain["state"].items(), *tensors.items()]:
        *parents, key = path.split("/")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's random state (CPU and CUDA), to save with a checkpoint."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, config: Config, keep: int,
                    accelerator, rng: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    """Write ``root/step-<step>`` atomically and prune to the newest ``keep`` checkpoints.

    Every process calls it: the main one writes the adapter, optimizer and state, each
    process its own RNG state, then the main one renames the directory into place.

    Args:
        rng: the random state as it was when step ``step + 1`` began, so that the resumed
            run draws the same dropout masks as an uninterrupted one.
        extra: more to record in ``state.json`` (e.g. the data fingerprint).

    Raises:
        TrainingError: trainable weights that are no longer finite (such a checkpoint
            would only reproduce the failure).
    """
    from safetensors.torch import save_file, save_model

    final = root / f"step-{step}"
    main = accelerator.is_main_process
    moments = optimizer_state(model, optimizer)  # a collective under FSDP: every process takes part
    tmp = temporary_path(final)  # where every process writes; the main one renames it into place
    with ExitStack() as commit:
        with whole_parameters(model):
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            if bad:
                raise TrainingError(f"the trained weights hold NaN or infinite values at step {step} (e.g. "
                                    f"{bad[0]}); no checkpoint was written. Try a lower training.lr or "
                                    "training.max_grad_norm")
            if main:
                tmp = commit.enter_context(atomic_directory(final))
                if lora_modules(model):
                    save_adapter(model, tmp / "adapter")
                else:  # full fine-tuning: every weight (tied ones once)
                    save_model(model, str(tmp / "model.safetensors"))
        if main:
            tensors, plain_moments = _split_moments(moments)
            save_file(tensors, tmp / OPTIMIZER)
        accelerator.wait_for_everyone()
        save_file(rng, tmp / f"rng-{accelerator.process_index}.safetensors")
        accelerator.wait_for_everyone()
        if main:
            files = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            state = {
                "step": step,
                "processes": accelerator.num_processes,
                "optimizer": plain_moments,
                "scheduler": scheduler.state_dict(),
                "config_hash": _hash(fingerprint(config)),
                "config": fingerprint(config),
                "recovery": {k: getattr(config.training, k) for k in RECOVERY_KEYS},
                "schedule": {k: getattr(config.training, k) for k in ("max_steps", "epochs")},
                **(extra or {}),
                "files": files,
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if main:
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


def check_deletable(root: Path, key: str) -> None:
    """Refuse to delete a run's checkpoints directory that holds anything lorakit did not
    write there: entries other than its checkpoints (and their half-written versions), or
    files a checkpoint's manifest does not list.

    Raises:
        InputError: naming ``key`` and what would be lost.
    """
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.is_dir() and re.fullmatch(r"\.?step-\d+(\.tmp|\.old)?", entry.name):
            check_replaceable(entry, key)
        else:
            raise InputError(f"{key}: {root} holds {entry.name}, which lorakit did not write; deleting the "
                             "checkpoints would delete it. Move it away or choose another output_dir")


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (``None`` when every file matches its checksum)."""
    try:
        state = json.loads((path / "state.json").read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "state.json is unreadable"
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_digest(file) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def newest_intact(root: Path) -> Path:
    """The newest checkpoint whose files all match their checksums, saying which were skipped.

    Raises:
        ResumeError: when there is none.
    """
    found = list_checkpoints(root)
    if not found:
        raise ResumeError(f"--resume: no complete checkpoint in {root}")
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged (%s); trying an older one", path.name, problem)
    raise ResumeError(f"--resume: every checkpoint in {root} is damaged; start over with --overwrite")


def differences(old: dict, new: dict, then: str = "in the checkpoint", prefix: str = "") -> list[str]:
    """``"key.sub: OLD <then>, NEW now"`` for every leaf where two nested dicts differ."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, then, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} {then}, {b!r} now")
    return out


def resume_changes(state: dict, config: Config, data_fingerprint: dict) -> dict:
    """What differs between the checkpoint and this run in ways resuming allows: recovery
    settings, the schedule's length and the training data. Each is logged with what it does."""
    t = config.training
    changes = {}
    for key in RECOVERY_KEYS:
        before = state.get("recovery", {}).get(key)
        if before != getattr(t, key):
            changes[key] = [before, getattr(t, key)]
            logger.warning("training.%s changed from %r to %r on resume: from step %d on the run follows the new "
                           "value (recorded in metrics.jsonl)", key, before, getattr(t, key), state["step"])
    for key in ("max_steps", "epochs"):
        before = state.get("schedule", {}).get(key)
        if before != getattr(t, key):
            changes[key] = [before, getattr(t, key)]
            logger.warning("training.%s changed from %r to %r: the learning-rate schedule is now laid over the new "
                           "length, so from step %d on the run matches neither an uninterrupted run of the old "
                           "length nor one of the new", key, before, getattr(t, key), state["step"])
    before = state.get("data")
    if before is not None and before != data_fingerprint:
        changes["data"] = [before, data_fingerprint]
        logger.warning("the training data changed since the checkpoint (%s examples, digest %s → %s examples, digest "
                       "%s): from step %d on, batches are drawn from the new data in a new order", before["examples"],
                       before["sha256"][:12], data_fingerprint["examples"], data_fingerprint["sha256"][:12], state["step"])
    return changes


def _state_problem(state, path: Path) -> str | None:
    """What makes ``state`` (a checkpoint's state.json) unusable, or None. Its step must be
    the directory's, and its scheduler must stand at that step."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    step, scheduler, processes = state["step"], state["scheduler"], state["processes"]
    state["config_hash"], state["config"]  # present
    named = _STEP_DIR.match(path.name)
    if type(step) is not int or (named and step != int(named.group(1))):
        return f"step {step!r} in a directory named {path.name}"
    if type(processes) is not int or processes < 1:
        return f"processes {processes!r}"
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != step or \
            not isinstance(scheduler.get("base_lrs"), list):
        return "its learning-rate schedule does not stand at its step"
    return None


def load_checkpoint(path: Path, model, optimizer, scheduler, config: Config, accelerator,
                    data_fingerprint: dict) -> tuple[int, dict]:
    """Restore adapter, optimizer, scheduler and this process's RNG from ``path``.

    Returns:
        The checkpoint's step, and the allowed changes since it was written (see
        ``resume_changes``).

    Raises:
        ResumeError: when the config or the number of processes changed in a way that
            would change the result.
    """
    from safetensors.torch import load_file, load_model

    try:
        state = json.loads((path / "state.json").read_text())
        problem = _state_problem(state, path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ResumeError(f"{path / 'state.json'}: not a lorakit checkpoint state ({problem})") from None
    if state["config_hash"] != _hash(fingerprint(config)):
        diffs = "; ".join(differences(state["config"], fingerprint(config)))
        allowed = ", ".join(f"training.{k}" for k in sorted((*_FREE_KEYS, *RECOVERY_KEYS)))
        raise ResumeError(f"cannot resume from {path}: the config changed ({diffs}); only {allowed} may change")
    if state["processes"] != accelerator.num_processes:
        raise ResumeError(f"cannot resume from {path}: it was written by {state['processes']} process(es), "
                          f"this run has {accelerator.num_processes}; use --num-processes {state['processes']}")
    changes = resume_changes(state, config, data_fingerprint)
    with whole_parameters(model, write_back=True):
        if (path / "adapter").is_dir():
            load_adapter(model, path / "adapter")
        else:
            load_model(model, str(path / "model.safetensors"))
    if (path / "optimizer.pt").exists() and not (path / OPTIMIZER).exists():
        raise ResumeError(f"{path}: written by an older lorakit, whose optimizer.pt is a pickle, which lorakit no "
                          "longer loads; start over with --overwrite (or resume with that version)")
    try:
        moments = _join_moments(load_file(path / OPTIMIZER), state["optimizer"])
    except Exception as e:  # noqa: BLE001 — a damaged or foreign file fails in many ways
        raise ResumeError(f"{path / OPTIMIZER}: not lorakit's optimizer state ({type(e).__name__}: {e})") from None
    load_optimizer_state(model, optimizer, moments)
    scheduler.load_state_dict(state["scheduler"])
    if "lr" in changes:  # the schedule keeps its shape and position, scaled to the new peak
        scheduler.base_lrs = [config.training.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # warmup_steps may have changed too
    try:
        rng = load_file(path / f"rng-{accelerator.process_index}.safetensors")
        torch.set_rng_state(rng["cpu"])
    except Exception as e:  # noqa: BLE001 — a damaged or foreign file
        raise ResumeError(f"{path}: the random state of process {accelerator.process_index} is unreadable "
                          f"({type(e).__name__})") from None
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"]), changes
