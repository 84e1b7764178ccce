"""``train(cfg)``: the whole fine-tuning run, driven by Accelerate.

Check, build (tokenizer, data, model, LoRA, optimizer, schedule), resume, then one loop
that reads top to bottom: for each optimizer step, ``grad_accum`` micro-batches of
forward and backward, then clip, step, log, evaluate, checkpoint. The adapter is
written at the end.

The loss of a step is the mean over every labelled token of the whole step (all its
micro-batches on all processes), as HF Trainer's ``num_items_in_batch`` does: a
micro-batch with few labelled tokens weighs as little as it should.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from lorakit import report
from lorakit.activation_memory import keep_less
from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.attention import use_fast_backward
from lorakit.batching import BatchOrder, collate, epoch_steps, pack, total_steps
from lorakit.checkpoint import (
    capture_rng,
    check_deletable,
    list_checkpoints,
    load_checkpoint,
    newest_intact,
    save_checkpoint,
)
from lorakit.config import SAVED_CONFIG, Config, TrainingConfig, saved_config_dict
from lorakit.data import build_examples, labelled_targets
from lorakit.errors import DataError, InputError, TrainingError, TrainingInterrupted
from lorakit.files import atomic_directory, check_inputs_survive, check_replaceable
from lorakit.inject import add_lora, count_parameters, lora_modules
from lorakit.launch import die_with_parent
from lorakit.loss import CausalLMLoss, evaluate_loss
from lorakit.model import DTYPE_NAMES, compile_blocks, load_model, load_tokenizer, resolve_dtype
from lorakit.pairs import build_pairs, collate_pairs, pair_length, pair_tokens, precompute_reference
from lorakit.peft_config import with_init_from
from lorakit.preference import STATS, PreferenceLoss, evaluate_pairs, summarize
from lorakit.preflight import preflight
from lorakit.schedule import lr_scheduler
from lorakit.sharding import local, whole_parameters

logger = logging.getLogger("lorakit")

@dataclass(frozen=True)
class Batching:
    """How one objective's examples become batches: supervised examples or preference pairs."""

    collate: Callable[[list[dict], int], dict]
    length: Callable[[dict], int]  # its padded cost, for length grouping
    tokens: Callable[[dict], int]  # real tokens, for tokens/s
    weight: Callable[[dict], int]  # its share of the step's mean loss: labelled tokens, or 1 pair


SUPERVISED = Batching(collate, lambda e: len(e["input_ids"]), lambda e: len(e["input_ids"]), labelled_targets)
PREFERENCE = Batching(collate_pairs, pair_length, pair_tokens, lambda e: 1)


@dataclass
class RunResult:
    """What a finished run produced."""

    adapter_dir: Path  # the adapter, or the whole model for method: full
    steps: int
    history: list[dict] = field(default_factory=list)
    main_process: bool = True
    trainable: int = 0


def param_groups(model: torch.nn.Module, t: TrainingConfig) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter at ``lr``, except that
    with LoRA+ (Hayou et al., 2024: "LoRA+: Efficient Low Rank Adaptation of Large Models")
    the B factors learn ``loraplus_lr_ratio`` times faster, since B, which starts at zero,
    is where a wide layer's update needs the larger step. ``lr_scale`` keeps each group's
    share of the schedule."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not t.loraplus_lr_ratio:
        return [{"params": [p for _, p in trainable], "lr": t.lr, "lr_scale": 1.0}]
    B = [p for n, p in trainable if n.endswith("lora_B.weight")]
    rest = [p for n, p in trainable if not n.endswith("lora_B.weight")]
    return [{"params": rest, "lr": t.lr, "lr_scale": 1.0},
            {"params": B, "lr": t.lr * t.loraplus_lr_ratio, "lr_scale": t.loraplus_lr_ratio}]


def _build_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, t)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=t.lr, weight_decay=t.weight_decay)


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


def _data_fingerprint(examples: list[dict]) -> dict:
    """What identifies the training data as tokenized: how many examples and a digest of their ids."""
    digest = hashlib.sha256()
    for e in examples:
        for part in (e["chosen"], e["rejected"]) if "chosen" in e else (e,):
            digest.update(torch.tensor(part["input_ids"], dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(part["labels"], dtype=torch.int64).numpy().tobytes())
    return {"examples": len(examples), "sha256": digest.hexdigest()}


def _write_final(out: Path, model, tokenizer, cfg: Config) -> Path:
    """The adapter (or, for full fine-tuning, the model and tokenizer) plus the resolved
    config, swapped in atomically: a kill leaves the previous one or the new one."""
    final = out / ("adapter" if cfg.method == "lora" else "model")
    with atomic_directory(final) as tmp:
        if cfg.method == "lora":
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / SAVED_CONFIG).write_text(yaml.safe_dump(saved_config_dict(cfg), sort_keys=False))
    return final


class _GracefulStop:
    """Ctrl-C asks the run to stop at the end of the current optimizer step (which then
    resumes exactly); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        report.console.print("stopping after this step (Ctrl-C again to stop at once)...")

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Throughput:
    """Real tokens per second over training steps only: evaluation and saving are paused out."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.tokens, self.start = 0.0, 0, time.perf_counter()
        self.pairs = torch.zeros(len(STATS))  # preference statistics, summed

    def record(self, step: int, steps: int, lr: float) -> dict:
        """The metrics of the last ``steps`` steps (mean loss, tokens/s, and for preference
        objectives the rewards, margin and accuracy), then a fresh window."""
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "loss": self.loss / steps, "lr": lr, "tokens": self.tokens, "seconds": elapsed,
                  "tokens_per_s": self.tokens / elapsed}
        if self.pairs[-1]:
            record.update(summarize(self.pairs))
        self.reset()
        return record

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside the block does not count towards tokens/s."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Fine-tune ``cfg.model`` with LoRA on ``cfg.data`` as ``cfg.training`` says.

    Args:
        cfg: the validated config.
        resume: continue from the newest intact checkpoint in ``output_dir``.
        overwrite: start over in an ``output_dir`` that holds an earlier run (its
            checkpoints are deleted).

    Returns:
        The adapter directory, the number of steps and the metric history.

    Raises:
        InputError: a config, data or output directory that cannot be used (before any
            weight loads).
        TrainingError: a non-finite loss (naming the step and the last good checkpoint).
        TrainingInterrupted: after Ctrl-C, once a checkpoint is saved.
    """
    cfg = with_init_from(cfg)
    t = cfg.training
    out = Path(t.output_dir)
    checkpoints = out / "checkpoints"
    _check_inputs_survive(cfg, out)
    _check_output(out, checkpoints, resume, overwrite)
    preflight(cfg)
    accelerator = _accelerator(t)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(t.seed)

    # Build: tokenizer and data first, so bad data fails before the model loads.
    preference = t.objective != "sft"
    batching = PREFERENCE if preference else SUPERVISED
    tokenizer = load_tokenizer(cfg.model)
    train_set, val_set = _datasets(cfg, tokenizer, world)
    dtype = resolve_dtype(cfg.model, cfg.trains_whole_weights)
    if cfg.trains_whole_weights and dtype != torch.float32 and cfg.model.quantization is None and main:
        logger.warning("model.dtype: %s with whole weights to train (full fine-tuning, bias or modules_to_save): the "
                       "optimizer updates them in %s, which rounds away updates far smaller than the weights (a "
                       "bfloat16 weight keeps 3 significant digits); use model.dtype auto or float32 (with "
                       "training.mixed_precision: bf16 for speed)", cfg.model.dtype, cfg.model.dtype)
    model = load_model(cfg.model.model_copy(update={"dtype": DTYPE_NAMES[dtype]}), accelerator.device)
    keep_less(model)  # before the adapter's layers: the switch is probed on the base's own output
    if cfg.method == "full":
        model.requires_grad_(True)
    elif cfg.lora.init_from:
        load_adapter(model, cfg.lora.init_from)
    else:
        add_lora(model, cfg.lora)
    use_fast_backward(model, accelerator.device, dtype)
    if t.compile:
        compile_blocks(model)
    optimizer = _build_optimizer(model, t)
    n_steps = total_steps(t, epoch_steps(len(train_set), t, world))
    if t.warmup_steps >= n_steps and main:
        logger.warning("training.warmup_steps (%d) is not below the run's %d steps: the learning rate never reaches "
                       "training.lr", t.warmup_steps, n_steps)
    scheduler = lr_scheduler(optimizer, t.scheduler, t.warmup_steps, n_steps)
    # The shared prefix pass (lorakit.prefix) is a second call into the body: only where the body
    # is whole on each process (one process, or DDP's MULTI_*) and not compiled.
    kind = accelerator.distributed_type.value
    whole = not t.compile and (kind == "NO" or kind.startswith("MULTI_"))
    loss_model, optimizer = accelerator.prepare(
        PreferenceLoss(model, cfg) if preference else CausalLMLoss(model, share_prefixes=whole), optimizer)
    core = accelerator.unwrap_model(loss_model)
    plain = core.model
    params = [p for p in plain.parameters() if p.requires_grad]  # FSDP replaces them with shards
    if t.objective == "dpo":  # the reference is the model as it starts (the prepared parameters, before resuming)
        core.freeze_reference()
        if cfg.dpo.precompute_reference:
            with report.console.status("scoring every pair with the reference model"):
                precompute_reference(core, train_set, t.batch_size, tokenizer.pad_token_id, accelerator.device)
    data_id = _data_fingerprint(train_set)

    # Resume, or start fresh.
    step, changes = 0, {}
    if resume:
        step, changes = load_checkpoint(newest_intact(checkpoints), plain, optimizer, scheduler, cfg, accelerator,
                                        data_id)
    elif main:
        shutil.rmtree(checkpoints, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    metrics = report.MetricsLog(out, step if resume else None) if main else None
    if main and changes:
        metrics.append({"step": step, "resumed_with": changes})
    trainable, total = count_parameters(plain)
    if main:
        report.startup_table(cfg, plain, len(lora_modules(plain)), trainable, total, len(train_set),
                             len(val_set), world, n_steps, step, accelerator.distributed_type.value)

    # Train.
    loss_model.train()
    order = BatchOrder([batching.length(e) for e in train_set], t.batch_size, world, t.seed,
                       cfg.data.group_by_length)
    targets = [batching.weight(e) for e in train_set]
    meter, progress = _Throughput(), report.Progress(n_steps, step, enabled=main)
    rng, updating = capture_rng(), False

    def checkpoint(at: int, rng) -> Path:
        return save_checkpoint(checkpoints, at, plain, optimizer, scheduler, cfg, t.keep_checkpoints, accelerator,
                               rng, {"data": data_id})

    with _GracefulStop() as stop:
        try:
            while step < n_steps:
                rng, updating = capture_rng(), False  # the state this step starts from: a checkpoint resumes here
                # Every process knows every micro-batch of the step, so all divide by the same token count.
                micros = range(step * t.grad_accum, (step + 1) * t.grad_accum)
                items = max(1, sum(targets[i] for m in micros for r in range(world) for i in order.indices(m, r)))
                for micro in micros:
                    examples = [train_set[i] for i in order.indices(micro, rank)]
                    batch = {k: v.to(accelerator.device)
                             for k, v in batching.collate(examples, tokenizer.pad_token_id).items()}
                    with accelerator.accumulate(loss_model):
                        loss = loss_model(**batch, normalizer=items)  # this micro-batch's share of the step's mean
                        # One reduction: the step's loss so far, real tokens for tokens/s, any Ctrl-C, and
                        # the preference statistics.
                        stats = accelerator.reduce(torch.cat([torch.tensor(
                            [loss.item(), sum(batching.tokens(e) for e in examples), float(stop.requested)]),
                            core.stats.cpu() if preference else torch.zeros(0)]).to(loss.device), "sum")
                        _stop_on_nonfinite(stats[0].item(), step + 1, checkpoints)
                        # Processes' gradients are averaged and Accelerate divides by grad_accum: undo both.
                        accelerator.backward(loss * world * t.grad_accum)
                        if accelerator.sync_gradients:
                            if step == 0 and cfg.method == "lora":
                                _check_gradients(plain)
                            if t.max_grad_norm:
                                accelerator.clip_grad_norm_(params, t.max_grad_norm)
                            updating = True
                        optimizer.step()
                        optimizer.zero_grad()
                    meter.loss += stats[0].item()
                    meter.tokens += int(stats[1].item())
                    if preference:
                        meter.pairs += stats[3:].cpu()
                step += 1
                scheduler.step()
                if step % t.log_every == 0 or step == n_steps:
                    record = meter.record(step, step % t.log_every or t.log_every, scheduler.get_last_lr()[0])
                    if main:
                        metrics.append(record)
                        progress.update(step, record)
                with meter.paused():
                    if val_set and ((t.eval_every and step % t.eval_every == 0) or step == n_steps):
                        scores = _validate(loss_model, val_set, preference, t.batch_size, tokenizer.pad_token_id,
                                           accelerator.device)
                        if main:
                            metrics.append({"step": step, **scores})
                            accuracy = f", preference accuracy {scores['val_accuracy']:.3f}" if preference else ""
                            progress.note(f"step {step}: validation loss {scores['val_loss']:.4f}{accuracy}")
                    if t.save_every and step % t.save_every == 0:
                        checkpoint(step, capture_rng())
                    if stats[2].item() and step < n_steps:  # Ctrl-C on some process: stop here, exactly
                        saved = checkpoint(step, capture_rng())
                        raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved to {saved}")
        except KeyboardInterrupt:
            # A second Ctrl-C (or one outside the loop's reach). Before the optimizer moved, the
            # weights are still those of the last whole step: save them with that step's RNG.
            progress.stop()
            if updating:
                raise TrainingInterrupted(f"stopped at once during step {step + 1}'s update; nothing was saved "
                                          "(--resume continues from the newest checkpoint)") from None
            saved = checkpoint(step, rng)
            raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved to {saved}") from None
        finally:
            progress.stop()
            if main:
                metrics.close()

    # Write the adapter.
    adapter_dir = out / ("adapter" if cfg.method == "lora" else "model")
    with whole_parameters(plain):
        if main:
            adapter_dir = _write_final(out, plain, tokenizer, cfg)
    if main:
        report.loss_plot(out, metrics.history)
        report.summary_table(metrics.history, adapter_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears down the process group, so workers exit cleanly
    return RunResult(adapter_dir, step, metrics.history if main else [], main, trainable)


def _validate(loss_model, val_set: list[dict], preference: bool, batch_size: int, pad_id: int, device) -> dict:
    """Validation metrics: the loss, and for preference objectives rewards, margin and accuracy."""
    if preference:
        return evaluate_pairs(loss_model, val_set, batch_size, pad_id, device)
    return {"val_loss": evaluate_loss(loss_model, val_set, batch_size, pad_id, device)}


# What a run writes in output_dir: an input inside one of them would be replaced or deleted.
RUN_OUTPUTS = ("adapter", "model", "checkpoints", "tensorboard", report.METRICS, "loss.png")


def _check_inputs_survive(cfg: Config, out: Path) -> None:
    """Refuse an ``output_dir`` whose run outputs would replace one of the run's inputs."""
    inputs = {"model.name_or_path": cfg.model.name_or_path, "data.train": cfg.data.train,
              "data.validation": cfg.data.validation, "lora.init_from": cfg.lora.init_from}
    check_inputs_survive([out / name for name in RUN_OUTPUTS], inputs, "training.output_dir")


def _check_output(out: Path, checkpoints: Path, resume: bool, overwrite: bool) -> None:
    """An earlier run is never silently replaced, and --resume needs something to resume."""
    earlier = (out / "adapter").exists() or (out / "model").exists() or list_checkpoints(checkpoints)
    if earlier and not (resume or overwrite):
        raise InputError(f"{out} already holds a run; continue it with --resume, "
                         "or start over with --overwrite (deletes its checkpoints)")
    if resume and not list_checkpoints(checkpoints):
        raise InputError(f"--resume: no complete checkpoint in {checkpoints}")
    if overwrite:  # what the new run replaces must be the earlier run's alone
        check_replaceable(out / "adapter", "--overwrite")
        check_replaceable(out / "model", "--overwrite")
        check_deletable(checkpoints, "--overwrite")
    try:  # now, not after the model has loaded
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"training.output_dir: cannot create {out} ({e.strerror or e})") from None


def _datasets(cfg: Config, tokenizer, world: int) -> tuple[list[dict], list[dict]]:
    """Training examples (packed when asked) and validation examples, tokenized."""
    t = cfg.training
    if t.objective != "sft":
        train_set = build_pairs(cfg.data, tokenizer, "train")
        val_set = build_pairs(cfg.data, tokenizer, "validation") if cfg.data.validation else []
        _check_one_batch(len(train_set), "pairs", t, world)
        _warn_if_validation_is_trained_on(train_set, val_set, lambda p: (tuple(p["chosen"]["input_ids"]),
                                                                          tuple(p["rejected"]["input_ids"])))
        return train_set, val_set
    train_set = build_examples(cfg.data, tokenizer, "train")
    val_set = build_examples(cfg.data, tokenizer, "validation") if cfg.data.validation else []
    _warn_if_validation_is_trained_on(train_set, val_set, lambda e: tuple(e["input_ids"]))
    if cfg.data.packing:
        train_set = pack(train_set, cfg.data.max_length, t.seed)
    _check_one_batch(len(train_set), "examples", t, world)
    return train_set, val_set


def _check_one_batch(n: int, what: str, t: TrainingConfig, world: int) -> None:
    """Refuse data smaller than one effective batch: each step would hold the same
    examples several times, and the batch the run reports would not be the one it trains."""
    if n < t.batch_size * t.grad_accum * world:
        raise DataError(f"data.train: {n} usable {what}, fewer than one batch ({t.batch_size} × {t.grad_accum} "
                        f"accumulation × {world} processes); lower training.batch_size or grad_accum")


def _warn_if_validation_is_trained_on(train_set: list[dict], val_set: list[dict], key: Callable) -> None:
    """Warn when validation examples also appear, token for token, in the training data:
    their loss then measures memorising, not how the adapter does on unseen rows."""
    trained = {key(e) for e in train_set}
    shared = sum(key(e) in trained for e in val_set)
    if shared:
        logger.warning("data.validation: %d of its %d examples also appear in data.train (token for token); "
                       "the validation loss on them measures memorising, not held-out performance",
                       shared, len(val_set))


def _stop_on_nonfinite(loss: float, step: int, checkpoints: Path) -> None:
    if not math.isfinite(loss):
        last = list_checkpoints(checkpoints)
        kept = f"; the last good checkpoint is {last[-1]}" if last else ""
        raise TrainingError(f"the loss became {loss} at step {step}{kept}. Try a lower training.lr or "
                            "training.max_grad_norm (both may change on --resume)")


def _accelerator(t: TrainingConfig) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        # A dead peer must end the others' collectives in minutes, not NCCL's default 30.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))],
    )
    _start_processes(accelerator, accelerator.is_main_process)
    return accelerator


def _start_processes(accelerator: Accelerator, main: bool) -> None:
    """Multi-process housekeeping: workers die with their launcher, one copy of each warning,
    and a warning when Accelerate silently runs a sharded config unsharded."""
    if accelerator.num_processes > 1:
        die_with_parent()  # torchrun starts workers in their own sessions: tie them to the launcher
    asked = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}") == "true"]
    if main and asked and accelerator.distributed_type.value != asked[0]:
        logger.warning("the launch config asks for %s, but Accelerate runs %s here (it shards only on GPUs): "
                       "every process holds the whole model", asked[0], accelerator.distributed_type.value)
    if not main:
        logger.setLevel(logging.ERROR)  # one copy of each warning
