"""What lorakit shows and leaves behind: every command's tables and messages, the
progress bar, metrics.jsonl, TensorBoard (when installed) and the loss plot.

User-supplied text (paths, keys, module names) is always escaped: a path holding
``[red]`` or ``[/x]`` prints as it is and never as Rich markup.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lorakit.files import atomic_file

console = Console(stderr=True)
METRICS = "metrics.jsonl"


def _e(value) -> str:
    """Any value as text that Rich prints literally."""
    return escape(str(value))


class LogHandler(logging.Handler):
    """lorakit's log records as single unwrapped lines (``warning: ...``), so that a message
    is never split where someone searches for it."""

    def emit(self, record: logging.LogRecord) -> None:
        style = "bold yellow" if record.levelno >= logging.WARNING else "dim"
        console.print(f"[{style}]{record.levelname.lower()}:[/] {_e(record.getMessage())}", highlight=False,
                      soft_wrap=True)


def fail_message(message: str) -> None:
    """``error: MESSAGE`` in red, the message printed literally."""
    console.print(f"[bold red]error:[/] {_e(message)}", highlight=False, soft_wrap=True)


def note(text: str, *names) -> None:
    """One line of plain output: ``text``, then ``names`` (paths, adapter names) in bold."""
    console.print(" ".join([_e(text), *(f"[bold]{_e(n)}[/]" for n in names)]), highlight=False, soft_wrap=True)


def _record(line: str) -> dict | None:
    """One metrics.jsonl line, or None for a line a killed run left half-written."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLog:
    """``metrics.jsonl`` in ``out``, mirrored to TensorBoard (``out/tensorboard``) when installed.

    A fresh run starts the file over; a resumed one keeps the lines up to its checkpoint,
    so no step is logged twice.
    """

    def __init__(self, out: Path, resume_step: int | None = None) -> None:
        self.path = out / METRICS
        rows = []
        if resume_step is not None and self.path.is_file():
            rows = [r for r in map(_record, self.path.read_text(errors="replace").splitlines())
                    if r is not None and r["step"] <= resume_step]
        with atomic_file(self.path) as tmp:  # a kill while rewriting keeps the earlier lines
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
                if key != "step" and isinstance(value, (int, float)):
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
        ("model", f"{_e(cfg.model.name_or_path)} ({type(model).__name__})"
                  + (f", {quant.bits}-bit {quant.quant_type}" if quant else
                     f", {str(model.get_input_embeddings().weight.dtype).removeprefix('torch.')}"
                     + (" (dtype auto)" if cfg.model.dtype == "auto" else ""))
                  + (", blocks compiled (torch.compile)" if t.compile else "")),
        ("adapted layers", f"{n_adapted} (r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, "
                           f"targets={_e(cfg.lora.target_modules)}"
                           + (f", init {cfg.lora.init}" if cfg.lora.init != "kaiming" else "")
                           + (", DoRA" if cfg.lora.use_dora else "") + ")" if cfg.method == "lora"
                           else "none: full fine-tuning, every weight trains"),
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"),
        *([("objective", _objective(cfg))] if t.objective != "sft" else []),
        ("examples", f"{n_train:,} train, {n_val:,} validation" + (" pairs" if t.objective != "sft" else "")),
        ("processes", f"{world} ({engine})" if world > 1 else "1"),
        ("effective batch", f"{t.batch_size * t.grad_accum * world} "
                            f"= {t.batch_size} × {t.grad_accum} accumulation × {world} process(es)"),
        ("optimizer", f"{t.optimizer}, lr {t.lr:g}" + (f"; LoRA's B factors at {t.lr * t.loraplus_lr_ratio:g} "
                                                         f"(LoRA+, ×{t.loraplus_lr_ratio:g})" if t.loraplus_lr_ratio
                                                         else "") + f", {t.scheduler} schedule"),
        ("steps", f"{n_steps}" + (f" (resuming at {start})" if start else "")),
        ("output", _e(t.output_dir)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _objective(cfg) -> str:
    if cfg.training.objective == "orpo":
        return f"ORPO, lambda {cfg.orpo.weight:g} (no reference model)"
    start = f"the adapter in {_e(cfg.lora.init_from)}" if cfg.lora.init_from else "the base model (B = 0)"
    pre = ", scored once before step 1" if cfg.dpo.precompute_reference else ""
    return f"DPO ({cfg.dpo.loss}), beta {cfg.dpo.beta:g}; reference: the model at step 0, {start}{pre}"


class Progress:
    """A rich progress bar with loss, learning rate, tokens/s and ETA."""

    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}{task.fields[extra]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(), console=console, disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, completed=done, loss="-", lr="-", tps="-", extra="")
        self.bar.start()

    def update(self, step: int, record: dict) -> None:
        extra = f"  acc {record['accuracy']:.2f}  margin {record['margin']:.3f}" if "accuracy" in record else ""
        self.bar.update(self.task, completed=step, loss=f"{record['loss']:.4f}", extra=extra,
                        lr=f"{record['lr']:.2e}", tps=f"{record['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        self.bar.console.print(text)

    def stop(self) -> None:
        self.bar.stop()


def loss_plot(out: Path, history: list[dict]) -> Path | None:
    """``loss.png``: training and validation loss against steps (and, for preference
    objectives, the preference accuracy beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any("loss" in r for r in history):
        return None
    panels = [("loss", "val_loss")] + ([("accuracy", "val_accuracy")] if any("accuracy" in r for r in history) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, val_key) in zip(axes[0], panels):
        train = [(r["step"], r[key]) for r in history if key in r]
        val = [(r["step"], r[val_key]) for r in history if val_key in r]
        ax.plot(*zip(*train), label="train")
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("preference accuracy" if key == "accuracy" else "loss")
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
    accuracy = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    if accuracy:
        table.add_row("preference accuracy", " → ".join(f"{v:.3f}" for v in (accuracy[0], accuracy[-1])[: len(accuracy)]))
    table.add_row("adapter", _e(adapter_dir))
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
                          + (" pairs (two answers each)" if t.objective != "sft" else "")
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
    rows_per_batch = t.batch_size * (2 if t.objective != "sft" else 1)
    shared = f" (shared prefix: {m.shared_prefix})" if m.shared_prefix else ""  # computed once, lorakit.prefix
    memory = Table(title=f"memory per process, heaviest micro-batch {rows_per_batch} × {plan.longest} tokens{shared}")
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


def merge_summary(report) -> None:
    """What ``lorakit merge`` wrote and how closely it matches the adapter-on-base model."""
    if report.into:
        other = "full-precision" if report.into == "dequantized" else "dequantized"
        console.print(f"QLoRA adapter merged into the {report.into} base weights; merging into the {other} "
                      f"ones instead would move logits by up to {report.into_other_diff:.4g}")
    console.print(f"verified: max |logit difference| {report.max_abs_diff:.3g} "
                  f"(tolerance {report.tolerance:.3g} for {report.dtype})")
    note("merged model written to", report.output)


def eval_table(target: str, results: dict) -> None:
    """Scores of the model (and of the base, with the gain, when compared)."""
    note("lorakit eval:", target)
    table = Table()
    columns = [c for c in ("base", "model", "gain") if c in results]
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    for key in results["model"]:
        table.add_row(key, *(f"{results[c][key]:+.4f}" if c == "gain" else f"{results[c][key]:.4f}" for c in columns))
    console.print(table)


def sweep_table(rows: list[dict], table_path: Path, plot_path: Path) -> None:
    """One row per grid point: trainable parameters, seconds, validation loss, scores."""
    scores = [k for k in rows[0] if k not in ("point", "overrides", "trainable", "seconds")]
    table = Table(title="lorakit sweep")
    for column in ("point", "trainable", "seconds", *scores):
        table.add_column(column, justify="left" if column == "point" else "right")
    for row in rows:
        table.add_row(_e(row["point"]), f"{row['trainable']:,}", f"{row['seconds']:.0f}",
                      *(f"{row[k]:.4f}" if isinstance(row.get(k), float) else "-" for k in scores))
    console.print(table)
    note(f"results in {table_path}, plot in {plot_path}")


def targets_table(found) -> None:
    """``lorakit targets``: linear layers grouped by role, then what a spec adapts."""
    table = Table(title=f"{_e(found.model_class)}: linear layers by role")
    for column in ("role", "layers", "name (last part)", "shape in → out", "parameters"):
        table.add_column(column)
    for role in dict.fromkeys(layer.role for layer in found.layers):
        group = [layer for layer in found.layers if layer.role == role]
        shapes = sorted({(l.d_in, l.d_out) for l in group})
        table.add_row(role, str(len(group)), _e(", ".join(sorted({l.name.rsplit(".", 1)[-1] for l in group}))),
                      ", ".join(f"{a} → {b}" for a, b in shapes), f"{sum(l.params for l in group):,}")
    console.print(table)
    if found.plan is not None:
        plan, spec = found.plan, found.spec
        sliced = sum(1 for t in plan.values() if t.roles)
        added = sum(t.params for t in plan.values())
        console.print(f"target_modules {_e(repr(spec))} adapts {len(plan)} layers"
                      + (f" ({sliced} of them on fused-qkv slices)" if sliced else "")
                      + f", e.g. {_e(next(iter(plan)))}; at r={found.r} it adds {added:,} trainable parameters, "
                      f"{100 * added / found.total:.3f}% of the model's {found.total:,}", highlight=False)


def inspect_tables(adapter: Path, report) -> None:
    """``lorakit inspect``: files, settings, and per-layer update spectra."""
    console.print(f"[bold]{_e(adapter)}[/]: " + ", ".join(f"{_e(name)} ({size:,} B)" for name, size in report.files.items()),
                  highlight=False)
    console.print(f"r={report.r}, alpha={report.alpha:g}, scaling={report.scaling:g}; {report.n_tensors} tensors, "
                  f"{report.n_params:,} parameters, dtype {', '.join(report.dtypes)}", highlight=False)
    if report.dora:
        console.print("DoRA: each layer computes m·(W0 + ΔW)/‖W0 + ΔW‖ per output row, m its trained magnitudes "
                      "(the spectra below are of ΔW alone)", highlight=False)
    for note in report.notes:
        console.print(_e(note), highlight=False)
    table = Table(title="updates ΔW = scaling·B·A")
    for column in ("layer", "r", "alpha", "shape", "‖ΔW‖", "top singular values", "rank@90%", "rank@99%"):
        table.add_column(column)
    for m in report.modules:
        top = ", ".join(f"{v:.3g}" for v in m.singular_values[:4])
        table.add_row(_e(m.name), str(m.r), f"{m.alpha:g}", f"{m.shape[0]}×{m.shape[1]}", f"{m.norm:.4g}", top,
                      str(m.rank90), str(m.rank99))
    console.print(table)
    console.print(f"most layers keep 90% of their update energy within rank {report.recommended_rank} "
                  f"(trained at r={report.r})")


def data_preview_tables(report, tokenizer, max_length: int, n: int) -> None:
    """``lorakit data preview``: examples as tokens (trained ones green), shares and warnings."""
    from rich.text import Text

    from lorakit.data import IGNORE, length_summary

    for i, example in enumerate(report.examples[:n]):
        text = Text(f"--- example {i + 1} ---\n", style="bold")
        for token, label in zip(example["input_ids"], example["labels"]):
            text.append(tokenizer.decode([token]), style="bold green" if label != IGNORE else "dim")
        console.print(text)
    console.print("[bold green]green[/] tokens carry loss; [dim]dim[/] ones are context only")
    console.print(f"{report.rows} rows; {100 * report.trained_share:.1f}% of tokens carry loss; "
                  + length_summary(report.lengths, max_length)
                  + f"; {report.over_max_length} rows are cut at max_length", highlight=False)
    for warning in report.warnings:
        console.print(f"[bold yellow]warning:[/] {_e(warning)}", highlight=False)


def export_summary(report) -> None:
    """What ``lorakit export`` wrote and the command that serves it."""
    note(f"{report.target} export written to", report.output)
    for file in report.files:
        note("  ", file)
    for line in report.notes:
        note(f"note: {line}")
    note("serve it with:")
    console.print(report.command, markup=False, highlight=False, soft_wrap=True)
