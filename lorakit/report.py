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
                  world: int, n_steps: int, start: int) -> None:
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
