"""The ``lorakit`` command line: wiring only; the work happens in the library."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.logging import RichHandler

from lorakit.config import ConfigError, config_to_dict, load_config
from lorakit.report import console

app = typer.Typer(
    help="LoRA and QLoRA fine-tuning for Hugging Face causal language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Look at training data as the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

CONFIG_ARG = typer.Argument(..., help="YAML config file (see configs/README.md for every key).")
SET_OPT = typer.Option(
    [], "--set", help="Override a config key, e.g. --set training.lr=1e-4 --set lora.r=16 (values are YAML)."
)


def _quiet_libraries() -> None:
    """lorakit reports what matters; the libraries' own progress bars and notices are noise here."""
    import datasets
    import transformers

    logger = logging.getLogger("lorakit")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False  # libraries may configure the root logger: print once
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _user_errors() -> tuple[type[Exception], ...]:
    """Failures caused by inputs (data, model, adapter, checkpoint): a message, not a traceback."""
    from lorakit.checkpoint import ResumeError
    from lorakit.data import DataError
    from lorakit.lora import LoraError
    from lorakit.model import ModelLoadError
    from lorakit.evaluation import EvalError
    from lorakit.merge import MergeError
    from lorakit.train import TrainingError

    return (ResumeError, DataError, EvalError, LoraError, MergeError, ModelLoadError, TrainingError)


def _fail(message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str]):
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e), 2)


@app.command()
def train(
    config: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in output_dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an output_dir that holds an earlier run."),
    num_processes: int = typer.Option(1, "--num-processes", min=1, help="Train data-parallel (DDP) on N processes "
                                      "(N GPUs, or N CPU processes on a machine without GPUs), through Accelerate."),
    accelerate_config: Optional[Path] = typer.Option(
        None, "--accelerate-config", help="Launch with this Accelerate config instead of plain DDP, e.g. "
        "configs/accelerate/fsdp.yaml (sharded) or deepspeed-zero2.yaml; --num-processes overrides its count."),
) -> None:
    """Fine-tune a model with LoRA as CONFIG says; writes OUTPUT_DIR/adapter (PEFT format).

    Progress, validation loss and checkpoints go to training.output_dir. Ctrl-C saves a
    checkpoint; rerun with --resume to continue exactly where it stopped.
    """
    cfg = _load(config, overrides)
    if (num_processes > 1 or accelerate_config) and "LOCAL_RANK" not in os.environ:
        from lorakit.launch import LaunchError, launch

        args = [str(config), *(f"--set={o}" for o in overrides), *(["--resume"] if resume else []),
                *(["--overwrite"] if overwrite else [])]
        try:
            raise typer.Exit(launch(num_processes, args, str(accelerate_config) if accelerate_config else None))
        except LaunchError as e:
            _fail(str(e), 2)
    _quiet_libraries()
    from lorakit.train import TrainingInterrupted
    from lorakit.train import train as run

    try:
        result = run(cfg, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as e:
        _fail(f"{e}. Continue with: lorakit train {config} --resume", 130)
    except _user_errors() as e:
        _fail(str(e), 1)
    if result.main_process:
        console.print(f"adapter written to [bold]{result.adapter_dir}[/]")


@app.command()
def merge(
    adapters: list[Path] = typer.Argument(..., help="Adapter directories (several are combined, see --weights)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the merged checkpoint."),
    base: Optional[str] = typer.Option(None, help="Base model, when not the one the adapter was trained on."),
    dtype: str = typer.Option("float32", help="Saved dtype: float32, bfloat16 or float16."),
    into: str = typer.Option("dequantized", help="QLoRA adapters: merge into the 'dequantized' 4-bit weights "
                             "they were trained against, or the original 'full-precision' ones."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weight per adapter, e.g. 0.7,0.3."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
) -> None:
    """Fold adapters into the base model and write a checkpoint plain transformers loads.

    The result is verified before it is kept: it is reloaded and its logits are compared
    with the adapter-on-base model on sample inputs.
    """
    _quiet_libraries()
    from lorakit.merge import merge_adapters

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        _fail(f"--weights {weights!r}: expected numbers separated by commas, e.g. 0.7,0.3", 2)
    try:
        report = merge_adapters(adapters, output, base, dtype, into, parsed, force)
    except _user_errors() as e:
        _fail(str(e), 1)
    if report.into:
        other = "full-precision" if report.into == "dequantized" else "dequantized"
        console.print(f"QLoRA adapter merged into the {report.into} base weights; merging into the {other} "
                      f"ones instead would move logits by up to {report.into_other_diff:.4g}")
    console.print(f"verified: max |logit difference| {report.max_abs_diff:.3g} "
                  f"(tolerance {report.tolerance:.3g} for {report.dtype})")
    console.print(f"merged model written to [bold]{report.output}[/]")


@app.command("eval")
def eval_command(
    target: str = typer.Argument(..., help="An adapter directory or a model (merged directory, checkpoint, 'default')."),
    metric: list[str] = typer.Option(["rouge"], "--metric", "-m", help="rouge, bleu, exact_match or perplexity; repeatable."),
    data: Optional[str] = typer.Option(None, help="Rows to score (default: the training config's validation file)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score only the first N rows."),
    max_new_tokens: int = typer.Option(64, min=1, help="Generation length limit."),
    batch_size: int = typer.Option(8, min=1, help="Prompts generated at once."),
    output: Optional[Path] = typer.Option(None, help="Where metrics.json and predictions.jsonl go (default: TARGET/eval)."),
    compare_base: bool = typer.Option(False, "--compare-base", help="Also score the base model and show the gain."),
    base: Optional[str] = typer.Option(None, help="Base model, when not the one the adapter was trained on."),
) -> None:
    """Generate greedily on held-out rows and score the outputs, offline.

    Prompts are rendered exactly as in training; predictions and scores are written next
    to each other.
    """
    _quiet_libraries()
    from rich.table import Table

    from lorakit.evaluation import resolve_target, run_eval

    try:
        resolved = resolve_target(target, base)
        out = output or (Path(target) / "eval" if Path(target).is_dir() else Path("eval"))
        results = run_eval(resolved, metric, data, limit, max_new_tokens, batch_size, out, compare_base)
    except _user_errors() as e:
        _fail(str(e), 1)
    table = Table(title=f"lorakit eval: {target}")
    columns = [c for c in ("base", "model", "gain") if c in results]
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    for key in results["model"]:
        table.add_row(key, *(f"{results[c][key]:+.4f}" if c == "gain" else f"{results[c][key]:.4f}" for c in columns))
    console.print(table)
    console.print(f"scores and predictions written to [bold]{out}[/]")


@app.command()
def generate(
    target: str = typer.Argument(..., help="An adapter directory or a model (merged directory, checkpoint, 'default')."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeatable. Without it, prompts are "
                                     "read from stdin, one per line (':use NAME' switches adapter)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=DIR: load another adapter onto the same base."),
    use: Optional[str] = typer.Option(None, help="Which adapter answers (default: TARGET's, else the first)."),
    max_new_tokens: int = typer.Option(128, min=1, help="Generation length limit."),
) -> None:
    """Answer prompts with a fine-tuned model, formatted as in training.

    Several adapters can share one base: load them with --adapter NAME=DIR and switch with
    --use NAME, or with a ':use NAME' line on stdin, without reloading the base.
    """
    _quiet_libraries()
    import sys

    from lorakit.evaluation import Switcher

    try:
        named = dict(item.split("=", 1) for item in adapter)
    except ValueError:
        _fail(f"--adapter expects NAME=DIR, got {adapter}", 2)
    try:
        switcher = Switcher(target, named, use)
        lines = prompt or (line.rstrip("\n") for line in sys.stdin)
        for line in lines:
            if line.startswith(":use "):
                switcher.use(line[5:].strip())
                console.print(f"[dim]using adapter {switcher.active}[/]")
            elif line.strip():
                typer.echo(switcher.answer(line, max_new_tokens))
    except _user_errors() as e:
        _fail(str(e), 1)


@app.command()
def sweep(
    config: Path = CONFIG_ARG,
    grid: list[str] = typer.Option(..., "--grid", help="KEY=V1,V2,... e.g. --grid lora.r=4,8,16 --grid "
                                   "training.lr=2e-4,1e-3; values are YAML ([q,v] is a list)."),
    overrides: list[str] = SET_OPT,
    full_finetune: bool = typer.Option(False, "--full-finetune", help="Add full fine-tuning as a reference point."),
    full_lr: float = typer.Option(2e-5, help="Learning rate of the full fine-tuning point."),
    metric: list[str] = typer.Option([], "--metric", "-m", help="Also score each point: rouge, bleu, exact_match, "
                                     "perplexity (validation loss is always reported)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score on the first N validation rows."),
    max_new_tokens: int = typer.Option(32, min=1, help="Generation length for scored metrics."),
) -> None:
    """Train every combination of the grid's values (same steps, same data order) and
    compare them: trainable parameters, wall time, validation loss and scores.

    Results land in OUTPUT_DIR/sweep/ (a table in sweep.json and a plot in sweep.png);
    rerunning skips finished points and resumes interrupted ones.
    """
    cfg = _load(config, overrides)
    _quiet_libraries()
    from rich.table import Table

    from lorakit.sweep import plot_sweep, run_sweep

    try:
        rows = run_sweep(config, overrides, grid, full_finetune, full_lr, metric, limit, max_new_tokens)
    except ConfigError as e:
        _fail(str(e), 2)
    except _user_errors() as e:
        _fail(str(e), 1)
    scores = [k for k in rows[0] if k not in ("point", "overrides", "trainable", "seconds")]
    table = Table(title="lorakit sweep")
    for column in ("point", "trainable", "seconds", *scores):
        table.add_column(column, justify="left" if column == "point" else "right")
    for row in rows:
        table.add_row(row["point"], f"{row['trainable']:,}", f"{row['seconds']:.0f}",
                      *(f"{row[k]:.4f}" if isinstance(row.get(k), float) else "-" for k in scores))
    console.print(table)
    root = Path(cfg.training.output_dir) / "sweep"
    score = "rouge1" if "rouge1" in scores else "val_loss"
    console.print(f"results in {root / 'sweep.json'}, plot in {plot_sweep(rows, score, root / 'sweep.png')}")


@app.command()
def targets(
    model: str = typer.Argument("default", help="'default', a local checkpoint directory, a .gguf file or a hub id."),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", "-t", help="A spec to try: names or "
                                                 "roles separated by commas (q,v), 'all-linear', or a regex."),
    r: int = typer.Option(8, min=1, help="Rank used to count the parameters a spec adds."),
) -> None:
    """List a model's linear layers by role, and show what a target spec would adapt.

    Reads only the model's config: no weights are loaded.
    """
    _quiet_libraries()
    from rich.table import Table

    from lorakit.inject import LoraConfig
    from lorakit.targets import layers, parse_spec, plan_targets, skeleton

    try:
        tree = skeleton(model)
        found = layers(tree)
        table = Table(title=f"{type(tree).__name__}: linear layers by role")
        for column in ("role", "layers", "name (last part)", "shape in → out", "parameters"):
            table.add_column(column)
        for role in dict.fromkeys(layer.role for layer in found):
            group = [layer for layer in found if layer.role == role]
            shapes = sorted({(l.d_in, l.d_out) for l in group})
            table.add_row(role, str(len(group)), ", ".join(sorted({l.name.rsplit(".", 1)[-1] for l in group})),
                          ", ".join(f"{a} → {b}" for a, b in shapes), f"{sum(l.params for l in group):,}")
        console.print(table)
        if target_modules:
            config = LoraConfig(r=r, target_modules=parse_spec(target_modules))
            chosen, added, total = plan_targets(tree, config)
            sliced = sum(1 for roles in chosen.values() if roles)
            console.print(f"target_modules {config.target_modules!r} adapts {len(chosen)} layers"
                          + (f" ({sliced} of them on fused-qkv slices)" if sliced else "")
                          + f", e.g. {next(iter(chosen))}; at r={r} it adds {added:,} trainable parameters, "
                          f"{100 * added / total:.3f}% of the model's {total:,}")
    except _user_errors() as e:
        _fail(str(e), 1)


@app.command()
def plan(
    config: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    num_processes: int = typer.Option(1, "--num-processes", min=1, help="Processes the run will use."),
    measure: int = typer.Option(0, "--measure", min=0, metavar="N",
                                help="Also run N real training steps and print their measured peak memory."),
) -> None:
    """Before training: parameters, tokens, steps and the memory the run will need.

    Memory is split into base weights, trainable weights, gradients, optimizer states
    and activations (with and without gradient checkpointing), estimated without
    allocating anything. The data is tokenized as training will see it.
    """
    cfg = _load(config, overrides)
    _quiet_libraries()
    from lorakit.memory import measure_peak
    from lorakit.plan import make_plan
    from lorakit.report import plan_tables

    try:
        result = make_plan(cfg, num_processes)
        measured = None
        if measure:
            console.print(f"measuring {measure} training step(s)...")
            console.quiet = True  # the short run's own tables would bury the plan
            try:
                measured = (measure, measure_peak(cfg, measure))
            finally:
                console.quiet = False
    except _user_errors() as e:
        _fail(str(e), 1)
    plan_tables(result, cfg, num_processes, measured)


@app.command("inspect")
def inspect_command(
    adapter: Path = typer.Argument(..., help="An adapter directory (lorakit's or PEFT's)."),
    base: Optional[str] = typer.Option(None, help="Check the adapter against this base model (config only)."),
    plot: Optional[Path] = typer.Option(None, help="Draw per-layer update norms and spectra to this PNG."),
) -> None:
    """Show an adapter's files, shapes and settings, and the rank its updates really use.

    Per adapted layer: the norm of ΔW = scaling·B·A, its singular values (computed exactly
    from the thin factors) and its effective rank at 90% and 99% of the update energy.
    """
    _quiet_libraries()
    from rich.table import Table

    from lorakit.adapter_report import inspect_adapter, plot_report

    try:
        tree = None
        if base:
            from lorakit.targets import skeleton

            tree = skeleton(base)
        report = inspect_adapter(adapter, tree)
    except _user_errors() as e:
        _fail(str(e), 1)
    console.print(f"[bold]{adapter}[/]: " + ", ".join(f"{name} ({size:,} B)" for name, size in report.files.items()))
    console.print(f"r={report.r}, alpha={report.alpha:g}, scaling={report.scaling:g}; {report.n_tensors} tensors, "
                  f"{report.n_params:,} parameters, dtype {', '.join(report.dtypes)}")
    table = Table(title="updates ΔW = scaling·B·A")
    for column in ("layer", "r", "shape", "‖ΔW‖", "top singular values", "rank@90%", "rank@99%"):
        table.add_column(column)
    for m in report.modules:
        top = ", ".join(f"{v:.3g}" for v in m.singular_values[:4])
        table.add_row(m.name, str(m.r), f"{m.shape[0]}×{m.shape[1]}", f"{m.norm:.4g}", top, str(m.rank90), str(m.rank99))
    console.print(table)
    console.print(f"most layers keep 90% of their update energy within rank {report.recommended_rank} "
                  f"(trained at r={report.r})")
    if plot:
        console.print(f"plot written to {plot_report(report, plot)}")
    if base:
        if report.problems:
            _fail(f"the adapter does not fit {base}:\n  - " + "\n  - ".join(report.problems), 1)
        console.print(f"fits {base}: every tensor matches a LoRA target, with the right shape")


@data_app.command("preview")
def data_preview(
    config: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    n: int = typer.Option(3, "--n", min=0, help="How many examples to show."),
) -> None:
    """Show training examples as tokens, with the ones that carry loss highlighted.

    Also the share of trained tokens, the length distribution against max_length, and
    warnings about data that would train badly.
    """
    cfg = _load(config, overrides)
    _quiet_libraries()
    from rich.text import Text

    from lorakit.data import data_report, length_summary
    from lorakit.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model)
        report = data_report(cfg.data, tokenizer)
    except _user_errors() as e:
        _fail(str(e), 1)
    for i, example in enumerate(report.examples[:n]):
        text = Text(f"--- example {i} ---\n", style="bold")
        for token, label in zip(example["input_ids"], example["labels"]):
            text.append(tokenizer.decode([token]), style="bold green" if label != -100 else "dim")
        console.print(text)
    console.print("[bold green]green[/] tokens carry loss; [dim]dim[/] ones are context only")
    console.print(f"{report.rows} rows; {100 * report.trained_share:.1f}% of tokens carry loss; "
                  + length_summary(report.lengths, cfg.data.max_length)
                  + f"; {report.over_max_length} rows are cut at max_length")
    for warning in report.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")


@config_app.command("show")
def config_show(config: Path = CONFIG_ARG, overrides: list[str] = SET_OPT) -> None:
    """Print CONFIG fully resolved: every key, with defaults filled in and overrides applied."""
    cfg = _load(config, overrides)
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point for ``python -m lorakit``."""
    app(argv)
