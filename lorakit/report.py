"""What a run shows and leaves behind: tables, the progress bar, metrics.jsonl,
TensorBoard (when installed) and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
METRICS = "metrics.jsonl"


class MetricsLog:
    """``metrics.jsonl`` in ``out``, mirrored to TensorBoard (``out/tensorboard``) when installed.

    A fresh run starts the file over; a resumed one keeps the lines up to its checkpoint,
    so no step is logged twice.
    """

    def __init__(self, out: Path, resume_step: int | None = None) -> None:
        self.path = out / METRICS
        rows = []
        if resume_step is not None and self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            rows = [r for r in rows if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.history = rows
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
        except ImportError:
            self.board = None

    def append(self, record: dict) -> None:
        """Log one record (``step`` plus values)."""
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def startup_table(cfg, model, n_adapted: int, trainable: int, total: int, n_train: int, n_val: int,
                  world: int, n_steps: int, start: int, engine: str = "") -> None:
    """What is about to happen, before the first step."""
    t = cfg.training
    table = Table(title="lorakit train", show_header=False)
    quant = cfg.model.quantization
    rows = [
        ("model", f"{cfg.model.name_or_path} ({type(model).__name__})"
                  + (f", {quant.bits}-bit {quant.quant_type}" if quant else "")),
        ("adapted layers", f"{n_adapted} (r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, "
                           f"targets={cfg.lora.target_modules})" if cfg.method == "lora"
                           else "none: full fine-tuning, every weight trains"),
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"),
        ("examples", f"{n_train:,} train, {n_val:,} validation"),
        ("processes", f"{world} ({engine})" if world > 1 else "1"),
        ("effective batch", f"{t.batch_size * t.grad_accum * world} "
                            f"= {t.batch_size} × {t.grad_accum} accumulation × {world} process(es)"),
        ("steps", f"{n_steps}" + (f" (resuming at {start})" if start else "")),
        ("output", t.output_dir),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


class Progress:
    """A rich progress bar with loss, learning rate, tokens/s and ETA."""

    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(), console=console, disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, completed=done, loss="-", lr="-", tps="-")
        self.bar.start()

    def update(self, step: int, record: dict) -> None:
        self.bar.update(self.task, completed=step, loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}", tps=f"{record['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        self.bar.console.print(text)

    def stop(self) -> None:
        self.bar.stop()


def loss_plot(out: Path, history: list[dict]) -> Path | None:
    """``loss.png``: training and validation loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return out / "loss.png"


def summary_table(history: list[dict], adapter_dir: Path) -> None:
    """The run in a few lines: loss first → last, validation, throughput, the adapter."""
    train = [r for r in history if "loss" in r]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    table = Table(title="done", show_header=False)
    if train:
        table.add_row("train loss", f"{train[0]['loss']:.4f} → {train[-1]['loss']:.4f}")
        table.add_row("tokens/s", f"{sum(r['tokens_per_s'] for r in train) / len(train):.0f}")
    if val:
        table.add_row("validation loss", " → ".join(f"{v:.4f}" for v in (val[0], val[-1])[: len(val)]))
    table.add_row("adapter", str(adapter_dir))
    console.print(table)


def size(n_bytes: float) -> str:
    """``1536`` → ``1.5 KB``: decimal units, three significant digits."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n_bytes) < 1000 or unit == "GB":
            return f"{n_bytes:.3g} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def plan_tables(plan, cfg, processes: int, measured: tuple[int, int] | None = None) -> None:
    """``lorakit plan``'s report: the run's size, then its memory with and without
    gradient checkpointing (and the measured peak, when one was taken)."""
    t, m = cfg.training, plan.memory
    table = Table(title="lorakit plan", show_header=False)
    rows = [
        ("parameters", f"{m.trainable_params:,} trainable of {m.total_params:,} "
                       f"({100 * m.trainable_params / m.total_params:.3f}%)"),
        ("training rows", f"{plan.examples:,}" + (" (packed)" if cfg.data.packing else "")
                          + f", longest {plan.longest} tokens (max_length {cfg.data.max_length})"),
        ("tokens per epoch", f"{plan.tokens_per_epoch:,}, of which {plan.trained_tokens_per_epoch:,} carry loss "
                             f"({100 * plan.trained_tokens_per_epoch / plan.tokens_per_epoch:.1f}%)"),
        ("effective batch", f"{plan.effective_batch} = {t.batch_size} × {t.grad_accum} accumulation "
                            f"× {processes} process(es)"),
        ("steps", f"{plan.steps:,} ({plan.steps_per_epoch:,} per epoch, {plan.epochs:.2f} epochs)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    memory = Table(title=f"memory per process, heaviest micro-batch {t.batch_size} × {plan.longest} tokens")
    memory.add_column("part")
    for on in (False, True):
        mark = " (configured)" if on == m.checkpointing else ""
        memory.add_column(f"checkpointing {'on' if on else 'off'}{mark}", justify="right")
    quant = cfg.model.quantization
    for part, value, note in [
        ("base weights", m.weights, f" ({quant.bits}-bit)" if quant else ""),
        ("trainable weights", m.adapters, ""),
        ("gradients", m.gradients, ""),
        (f"optimizer states ({t.optimizer})", m.optimizer, ""),
    ]:
        memory.add_row(part + note, size(value), size(value))
    memory.add_row("activations", size(m.activations), size(m.activations_checkpointed))
    memory.add_row("[bold]estimated peak[/]", size(m.total(False)), size(m.total(True)))
    if measured is not None:
        steps, peak = measured
        cells = [f"{size(peak)} (estimate/measured {m.total() / peak:.2f})" if on == m.checkpointing else "-"
                 for on in (False, True)]
        memory.add_row(f"[bold]measured peak[/] ({steps} step{'s' if steps > 1 else ''})", *cells)
    console.print(memory)
