"""``train(cfg)``: the whole fine-tuning run, driven by Accelerate.

Build (tokenizer, data, model, LoRA, optimizer, schedule), then one loop that reads
top to bottom: micro-batch → forward → backward → (every ``grad_accum``) clip, step,
log, evaluate, checkpoint. The adapter is written at the end.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from lorakit import report
from lorakit.adapter_io import save_adapter
from lorakit.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lorakit.config import SAVED_CONFIG, Config, TrainingConfig, config_to_dict
from lorakit.data import BatchOrder, build_examples, collate, pack
from lorakit.evaluation import evaluate_loss
from lorakit.inject import add_lora, count_parameters, lora_modules
from lorakit.launch import die_with_parent
from lorakit.loss import CausalLMLoss
from lorakit.model import load_model, load_tokenizer
from lorakit.sharding import local, whole_parameters


class TrainingError(RuntimeError):
    """A run that had to stop (non-finite loss, too little data, ...)."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved and the run can be resumed."""


@dataclass
class RunResult:
    """What a finished run produced."""

    adapter_dir: Path  # the adapter, or the whole model for method: full
    steps: int
    history: list[dict] = field(default_factory=list)
    main_process: bool = True
    trainable: int = 0


def _build_optimizer(params: list[torch.nn.Parameter], t: TrainingConfig) -> torch.optim.Optimizer:
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    if t.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        raise TrainingError("training.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw or adamw_8bit")
    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def _check_gradients(model) -> None:
    """Before the first optimizer step: every adapter must have received a gradient.

    B starts at zero, so A's first gradient is zero by design; B's must not be.
    """
    layers = lora_modules(model)
    grads = {n: m.lora_B.weight.grad for n, m in layers.items()}
    device = next(iter(layers.values())).lora_B.weight.device  # NCCL reduces only GPU tensors
    present = torch.stack([torch.zeros((), device=device) if g is None else local(g).abs().sum().float()
                           for g in grads.values()])
    if torch.distributed.is_initialized():  # under FSDP each process sees a shard of each gradient
        torch.distributed.all_reduce(present)
    starved = [n for n, total in zip(grads, present.tolist()) if total == 0]
    if starved:
        raise TrainingError(
            f"{len(starved)} of {len(layers)} adapted layers received no gradient at the first "
            f"step (e.g. {starved[0]}): they are cut off from the loss. Usual causes: gradient checkpointing "
            "without input gradients, or layers the forward pass never uses"
        )


def epoch_steps(n_examples: int, t: TrainingConfig, processes: int) -> int:
    """Optimizer steps in one pass over ``n_examples``: one per effective batch
    (``batch_size × grad_accum × processes``)."""
    return max(1, n_examples // (t.batch_size * processes) // t.grad_accum)


def total_steps(t: TrainingConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` worth of steps."""
    return t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))


def _write_final(out: Path, model, tokenizer, cfg: Config) -> Path:
    """The adapter (or, for full fine-tuning, the model and tokenizer) plus the resolved
    config, replaced atomically."""
    name = "adapter" if cfg.method == "lora" else "model"
    final, tmp = out / name, out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.method == "lora":
        save_adapter(model, tmp)
    else:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / SAVED_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def train(cfg: Config, resume: bool = False, overwrite: bool = False, longest_first: bool = False) -> RunResult:
    """Fine-tune ``cfg.model`` with LoRA on ``cfg.data`` as ``cfg.training`` says.

    Args:
        cfg: the validated config.
        resume: continue from the newest complete checkpoint in ``output_dir``.
        overwrite: start over in an ``output_dir`` that holds an earlier run (its
            checkpoints are deleted).
        longest_first: with ``data.group_by_length``, start each epoch with the batch
            holding the longest example (for memory measurements).

    Returns:
        The adapter directory, the number of steps and the metric history.

    Raises:
        TrainingError: a non-finite loss (naming the step) or unusable data.
        TrainingInterrupted: after Ctrl-C, once a checkpoint is saved.
    """
    t = cfg.training
    out = Path(t.output_dir)
    checkpoints = out / "checkpoints"
    earlier = (out / "adapter").exists() or (out / "model").exists() or list_checkpoints(checkpoints)
    if earlier and not (resume or overwrite):
        raise TrainingError(f"{out} already holds a run; continue it with --resume, "
                            "or start over with --overwrite (deletes its checkpoints)")
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        # A dead peer must end the others' collectives in minutes, not NCCL's default 30.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))],
    )
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if world > 1:
        die_with_parent()  # torchrun starts workers in their own sessions: tie them to the launcher
    asked = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}") == "true"]
    if main and asked and accelerator.distributed_type.value != asked[0]:
        # Accelerate quietly falls back to plain data parallelism on CPUs
        logging.getLogger("lorakit").warning(
            "the launch config asks for %s, but Accelerate runs %s here (it shards only on GPUs): "
            "every process holds the whole model", asked[0], accelerator.distributed_type.value)
    if not main:
        logging.getLogger("lorakit").setLevel(logging.ERROR)  # one copy of each warning
    set_seed(t.seed)

    # Build.
    tokenizer = load_tokenizer(cfg.model)
    train_set = build_examples(cfg.data, tokenizer, "train")
    if cfg.data.packing:
        train_set = pack(train_set, cfg.data.max_length, t.seed)
    val_set = build_examples(cfg.data, tokenizer, "validation") if cfg.data.validation else []
    if len(train_set) < t.batch_size * world:
        raise TrainingError(f"data.train: {len(train_set)} usable examples, fewer than one batch "
                            f"({t.batch_size} × {world} processes)")
    model = load_model(cfg.model, accelerator.device)
    if cfg.method == "lora":
        add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(params, t)
    n_steps = total_steps(t, epoch_steps(len(train_set), t, world))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=n_steps)
    loss_model, optimizer = accelerator.prepare(CausalLMLoss(model), optimizer)
    plain = accelerator.unwrap_model(loss_model).model
    params = [p for p in plain.parameters() if p.requires_grad]  # FSDP replaces them with shards

    step = 0
    if resume:
        found = list_checkpoints(checkpoints)
        if not found:
            raise TrainingError(f"--resume: no complete checkpoint in {checkpoints}")
        step = load_checkpoint(found[-1], plain, optimizer, scheduler, cfg, accelerator)
    elif main:
        shutil.rmtree(checkpoints, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    metrics = report.MetricsLog(out, step if resume else None) if main else None
    history = metrics.history if main else []

    trainable, total = count_parameters(plain)
    if main:
        report.startup_table(cfg, plain, len(lora_modules(plain)), trainable, total, len(train_set),
                             len(val_set), world, n_steps, step, accelerator.distributed_type.value)

    # Train.
    loss_model.train()
    pad_id = tokenizer.pad_token_id
    micro = step * t.grad_accum
    order = BatchOrder([len(e["input_ids"]) for e in train_set], t.batch_size, world, t.seed,
                       cfg.data.group_by_length, longest_first)
    window = {"loss": 0.0, "tokens": 0, "start": time.perf_counter()}
    progress = report.Progress(n_steps, step, enabled=main)
    try:
        while step < n_steps:
            examples = [train_set[i] for i in order.indices(micro, rank)]
            batch = {k: v.to(accelerator.device) for k, v in collate(examples, pad_id).items()}
            micro += 1
            with accelerator.accumulate(loss_model):
                loss = loss_model(**batch)
                # One reduction gives every process the mean loss (so all agree to stop on
                # NaN) and the real-token count for tokens/s.
                real_tokens = sum(len(e["input_ids"]) for e in examples)
                stats = accelerator.reduce(
                    torch.stack([loss.detach().float(), torch.tensor(float(real_tokens), device=loss.device)]), "sum")
                mean_loss = stats[0].item() / world
                if not math.isfinite(mean_loss):
                    last = list_checkpoints(checkpoints)
                    kept = f"; the last good checkpoint is {last[-1]}" if last else ""
                    raise TrainingError(f"the loss became {mean_loss} at step {step + 1}{kept}. "
                                        "Try a lower training.lr or training.max_grad_norm")
                accelerator.backward(loss)
                if accelerator.sync_gradients and step == 0 and cfg.method == "lora":
                    _check_gradients(plain)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window["loss"] += mean_loss / t.grad_accum
            window["tokens"] += int(stats[1].item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            scheduler.step()
            if step % t.log_every == 0 or step == n_steps:
                elapsed = time.perf_counter() - window["start"]
                steps_in_window = step % t.log_every or t.log_every
                record = {"step": step, "loss": window["loss"] / steps_in_window, "lr": scheduler.get_last_lr()[0],
                          "tokens": window["tokens"], "seconds": elapsed, "tokens_per_s": window["tokens"] / elapsed}
                window = {"loss": 0.0, "tokens": 0, "start": time.perf_counter()}
                if main:
                    metrics.append(record)
                    progress.update(step, record)
            paused = time.perf_counter()  # evaluation and saving don't count towards tokens/s
            if val_set and ((t.eval_every and step % t.eval_every == 0) or step == n_steps):
                val_loss = evaluate_loss(loss_model, val_set, t.batch_size, pad_id, accelerator.device)
                if main:
                    metrics.append({"step": step, "val_loss": val_loss})
                    progress.note(f"step {step}: validation loss {val_loss:.4f}")
            if t.save_every and step % t.save_every == 0:
                save_checkpoint(checkpoints, step, plain, optimizer, scheduler, cfg, t.keep_checkpoints, accelerator)
            window["start"] += time.perf_counter() - paused
    except KeyboardInterrupt:
        progress.stop()
        if main:
            metrics.close()
        saved = save_checkpoint(checkpoints, step, plain, optimizer, scheduler, cfg, t.keep_checkpoints, accelerator)
        raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved to {saved}") from None
    progress.stop()

    # Save.
    if main:
        metrics.close()
    adapter_dir = out / ("adapter" if cfg.method == "lora" else "model")
    with whole_parameters(plain):
        if main:
            adapter_dir = _write_final(out, plain, tokenizer, cfg)
    if main:
        report.loss_plot(out, history)
        report.summary_table(history, adapter_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears down the process group, so workers exit cleanly
    return RunResult(adapter_dir, step, history, main, trainable)
