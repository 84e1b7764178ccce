"""The ``lorakit`` command line: wiring only.

Each command parses its arguments, calls one library function and prints through
``lorakit.report``. Errors are mapped to exit codes in one place (``_handled``): an
input lorakit cannot honour is 2, work that could not finish is 1, Ctrl-C is 130.
Heavy libraries are imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from pydantic import ValidationError

from lorakit.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, InputError, LorakitError, TrainingInterrupted
from lorakit.files import exclusive
from lorakit.metrics import METRICS
from lorakit.report import console, fail_message, note

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
TRUST_OPT = typer.Option(False, "--trust-remote-code", help="Run the model repository's own Python code (only "
                         "for models you trust; settings saved in adapters never switch this on).")
TARGET_ARG = typer.Argument(..., help="An adapter directory or a model (merged directory, checkpoint, 'default').")


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ComputeDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


COMPUTE_OPT = typer.Option(ComputeDtype.auto, "--dtype", help="The base model's compute dtype: auto = bfloat16 "
                           "where the hardware runs it fast (as training does), else float32; float32 for "
                           "bit-comparable scores across machines.")


class Into(str, Enum):
    dequantized = "dequantized"
    full_precision = "full-precision"


class ExportTarget(str, Enum):
    gguf = "gguf"
    ollama = "ollama"
    vllm = "vllm"
    sglang = "sglang"
    merged = "merged"


class Outtype(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


Metric = Enum("Metric", {name: name for name in METRICS}, type=str)  # the choices of --metric


def _quiet_libraries() -> None:
    """lorakit reports what matters; the libraries' own progress bars and notices are noise here."""
    import transformers

    from lorakit.report import LogHandler

    logger = logging.getLogger("lorakit")
    if not logger.handlers:
        logger.addHandler(LogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # libraries may configure the root logger: print once
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # datasets reads these when first imported; importing it here would cost merge, export and
    # generate, which never use it, 1.6 s each
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["DATASETS_VERBOSITY"] = "error"
    if "datasets" in sys.modules:
        datasets = sys.modules["datasets"]
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def _handled(command: Callable) -> Callable:
    """Run a command, turning every failure into a message and an exit code (never a traceback)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except LorakitError as e:
            fail_message(str(e))
            raise typer.Exit(e.exit_code) from None
        except ValidationError as e:  # pydantic's: a value the user gave
            lines = [f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in e.errors()]
            fail_message("invalid input:\n  - " + "\n  - ".join(lines))
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            fail_message("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:  # a disk that is full, a file that vanished, no permission
            fail_message(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
            raise typer.Exit(EXIT_FAILURE) from None
        except Exception as e:  # noqa: BLE001 — the last line of defence: a message, not a traceback
            # safetensors reports a failed write (a full disk) as its own error, not an OSError
            io = re.search(r"I/O error: (.*?) \(os error \d+\)", str(e))
            if io:
                fail_message(f"writing safetensors weights failed: {io.group(1)}; nothing was replaced")
                raise typer.Exit(EXIT_FAILURE) from None
            return _unexpected(e)

    return run


def _unexpected(error: Exception) -> None:
    if os.environ.get("LORAKIT_DEBUG"):
        raise error
    fail_message(f"unexpected {type(error).__name__}: {error}. This is a lorakit bug or an input it does not "
                 "check yet; rerun with LORAKIT_DEBUG=1 for the traceback and report it")
    raise typer.Exit(EXIT_FAILURE) from None


ANY_BASE_OPT = typer.Option(False, "--any-base", help="Load the adapter even on a base other than the one it was "
                            "trained on (same shapes, other weights, e.g. its instruct version); refused otherwise.")


def _base_choice(allow: bool) -> contextlib.AbstractContextManager:
    """``--any-base``: adapters load onto another base than their own, with a warning."""
    if not allow:
        return contextlib.nullcontext()
    from lorakit.adapter_io import any_base

    return any_base()


def _load(config: Path, overrides: list[str]):
    from lorakit.config import load_config

    return load_config(config, overrides)


@app.command()
@_handled
def train(
    config: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in output_dir."),
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
    if resume and overwrite:
        raise InputError("--resume continues the run in output_dir and --overwrite deletes it: choose one")
    cfg = _load(config, overrides)
    launcher = "LOCAL_RANK" not in os.environ  # this process starts the run (its workers have a rank)
    with ExitStack() as held:
        if launcher:
            held.enter_context(exclusive(Path(cfg.training.output_dir), "training.output_dir"))
        if launcher and (num_processes > 1 or accelerate_config):
            from lorakit.launch import launch

            args = [str(config), *(f"--set={o}" for o in overrides), *(["--resume"] if resume else []),
                    *(["--overwrite"] if overwrite else [])]
            raise typer.Exit(launch(num_processes, args, str(accelerate_config) if accelerate_config else None))
        _quiet_libraries()
        from lorakit.train import train as run

        try:
            result = run(cfg, resume=resume, overwrite=overwrite)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}. Continue with: lorakit train {config} --resume") from None
    if result.main_process:
        note("adapter written to", result.adapter_dir)


@app.command()
@_handled
def merge(
    adapters: list[Path] = typer.Argument(..., help="Adapter directories (several are combined, see --weights)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the merged checkpoint."),
    base: Optional[str] = typer.Option(None, help="Base model, when not the one the adapter was trained on."),
    dtype: Dtype = typer.Option(Dtype.float32, help="Saved dtype."),
    into: Into = typer.Option(Into.dequantized, help="QLoRA adapters: merge into the 'dequantized' 4-bit weights "
                              "they were trained against, or the original 'full-precision' ones."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weight per adapter, e.g. 0.7,0.3."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    any_base: bool = ANY_BASE_OPT,
    trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Fold adapters into the base model and write a checkpoint plain transformers loads.

    The result is verified before it is kept: it is reloaded and its logits are compared
    with the adapter-on-base model on sample inputs.
    """
    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise InputError(f"--weights {weights!r}: expected numbers separated by commas, e.g. 0.7,0.3") from None
    _quiet_libraries()
    from lorakit.merge import merge_adapters
    from lorakit.report import merge_summary

    with _base_choice(any_base):
        merge_summary(merge_adapters(adapters, output, base, dtype.value, into.value, parsed, force, trust_remote_code))


@app.command()
@_handled
def export(
    adapter: Path = typer.Argument(..., help="The adapter directory (e.g. runs/quickstart/adapter)."),
    to: ExportTarget = typer.Option(..., "--to", help="gguf: a llama.cpp LoRA adapter (or with --merged the whole model); "
                              "ollama: the same plus a Modelfile; vllm / sglang: an adapter checked against the "
                              "engine's rules; merged: a transformers checkpoint, as lorakit merge."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory to write (default: export-TARGET "
                                          "beside the adapter)."),
    merged: bool = typer.Option(False, "--merged", help="gguf/ollama: export the merged model as one GGUF file "
                                "instead of an adapter (needs a GGUF base, such as the default model)."),
    outtype: Outtype = typer.Option(Outtype.f16, help="--merged: the type of the GGUF's weight matrices."),
    base: Optional[str] = typer.Option(None, help="Base model, when not the one the adapter was trained on."),
    name: Optional[str] = typer.Option(None, help="Model name in the printed serve command (default: the run's name)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    any_base: bool = ANY_BASE_OPT,
    trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Turn an adapter into what a serving engine runs: llama.cpp, Ollama, vLLM, SGLang.

    Each export computes exactly what lorakit computes (per-layer scales are folded in where
    an engine has one global scale); what an engine cannot express is refused with the
    alternative, usually --merged. Prints the command that serves the result.
    """
    _quiet_libraries()
    from lorakit.export import export as run_export
    from lorakit.report import export_summary

    with _base_choice(any_base):
        export_summary(run_export(adapter, to.value, output, merged, outtype.value, base, force, trust_remote_code,
                                  name=name))


@app.command("eval")
@_handled
def eval_command(
    target: str = TARGET_ARG,
    metric: list[Metric] = typer.Option([Metric.rouge], "--metric", "-m", help="What to score; repeatable."),
    data: Optional[str] = typer.Option(None, help="Rows to score (default: the training config's validation file)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score only the first N rows."),
    max_new_tokens: int = typer.Option(64, min=1, help="Generation length limit."),
    batch_size: int = typer.Option(32, min=1, help="Most prompts decoded together (their prompt passes stay short, to bound padding); rows per pass for perplexity."),
    output: Optional[Path] = typer.Option(None, help="Where metrics.json and predictions.jsonl go (default: TARGET/eval)."),
    compare_base: bool = typer.Option(False, "--compare-base", help="Also score the base model and show the gain."),
    base: Optional[str] = typer.Option(None, help="Base model, when not the one the adapter was trained on."),
    any_base: bool = ANY_BASE_OPT,
    dtype: ComputeDtype = COMPUTE_OPT,
    trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Generate greedily on held-out rows and score the outputs, offline.

    Prompts are rendered exactly as in training; predictions and scores are written next
    to each other.
    """
    _quiet_libraries()
    from lorakit.evaluation import resolve_target, run_eval
    from lorakit.report import eval_table

    out = output or (Path(target) / "eval" if Path(target).is_dir() else Path("eval"))
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file, not a directory")
    with _base_choice(any_base):
        results = run_eval(resolve_target(target, base, trust_remote_code, dtype.value), [m.value for m in metric],
                           data, limit, max_new_tokens, batch_size, out, compare_base)
    eval_table(target, results)
    note("scores and predictions written to", out)


@app.command()
@_handled
def generate(
    target: str = TARGET_ARG,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeatable. Without it, prompts are "
                                     "read from stdin, one per line (':use NAME' switches adapter)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=DIR: load another adapter onto the same base."),
    use: Optional[str] = typer.Option(None, help="Which adapter answers (default: TARGET's, else the first)."),
    max_new_tokens: int = typer.Option(128, min=1, help="Generation length limit."),
    any_base: bool = ANY_BASE_OPT,
    dtype: ComputeDtype = COMPUTE_OPT,
    trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Answer prompts with a fine-tuned model, formatted as in training.

    Several adapters can share one base: load them with --adapter NAME=DIR and switch with
    --use NAME, or with a ':use NAME' line on stdin, without reloading the base.
    """
    named = {}
    for item in adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise InputError(f"--adapter expects NAME=DIR, got {item!r}")
        named[name] = directory
    _quiet_libraries()
    from lorakit.evaluation import Switcher

    with _base_choice(any_base):
        switcher = Switcher(target, named, use, trust_remote_code, dtype.value)
        if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the check as text, not as a crash
            sys.stdin.reconfigure(errors="surrogateescape")
        for line in prompt or (line.rstrip("\n") for line in sys.stdin):
            if line.startswith(":use "):
                try:  # a typo in an interactive session must not end it
                    switcher.use(line[5:].strip())
                    note("using adapter", switcher.active)
                except InputError as e:
                    fail_message(str(e))
            elif line.strip():
                typer.echo(switcher.answer(line, max_new_tokens))


@app.command()
@_handled
def sweep(
    config: Path = CONFIG_ARG,
    grid: list[str] = typer.Option(..., "--grid", help="KEY=V1,V2,... e.g. --grid lora.r=4,8,16 --grid "
                                   "training.lr=2e-4,1e-3; values are YAML (\\[q,v] is a list)."),
    overrides: list[str] = SET_OPT,
    full_finetune: bool = typer.Option(False, "--full-finetune", help="Add full fine-tuning as a reference point."),
    full_lr: float = typer.Option(2e-5, help="Learning rate of the full fine-tuning point."),
    metric: list[Metric] = typer.Option([], "--metric", "-m", help="Also score each point (validation loss is "
                                        "always reported); repeatable."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score on the first N validation rows."),
    max_new_tokens: int = typer.Option(32, min=1, help="Generation length for scored metrics."),
) -> None:
    """Train every combination of the grid's values (same steps, same data order) and
    compare them: trainable parameters, wall time, validation loss and scores.

    Results land in OUTPUT_DIR/sweep/ (a table in sweep.json and a plot in sweep.png);
    rerunning skips finished points and resumes interrupted ones, and refuses a point
    that ran with other settings (config, data or metrics) instead of reporting it.
    """
    cfg = _load(config, overrides)
    _quiet_libraries()
    from lorakit.report import sweep_table
    from lorakit.sweep import plot_sweep, run_sweep

    root = Path(cfg.training.output_dir) / "sweep"
    with exclusive(root, "training.output_dir"):
        rows = run_sweep(config, overrides, grid, full_finetune, full_lr, [m.value for m in metric], limit,
                         max_new_tokens)
    sweep_table(rows, root / "sweep.json", plot_sweep(rows, "rouge1" if "rouge1" in rows[0] else "val_loss",
                                                      root / "sweep.png"))


@app.command()
@_handled
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
    from lorakit.report import targets_table
    from lorakit.targets import describe_targets

    targets_table(describe_targets(model, target_modules, r))


@app.command()
@_handled
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

    result = make_plan(cfg, num_processes)
    measured = None
    if measure:
        console.print(f"measuring {measure} training step(s)...")
        console.quiet = True  # the short run's own tables would bury the plan
        try:
            measured = (measure, measure_peak(cfg, measure))
        finally:
            console.quiet = False
    plan_tables(result, cfg, num_processes, measured)


@app.command("inspect")
@_handled
def inspect_command(
    adapter: Path = typer.Argument(..., help="An adapter directory (lorakit's or PEFT's)."),
    base: Optional[str] = typer.Option(None, help="Check the adapter against this base model (config only)."),
    plot: Optional[Path] = typer.Option(None, help="Draw per-layer update norms and spectra to this .png, .svg or .pdf file."),
) -> None:
    """Show an adapter's files, shapes and settings, and the rank its updates really use.

    Per adapted layer: the norm of ΔW = scaling·B·A, its singular values (computed exactly
    from the thin factors) and its effective rank at 90% and 99% of the update energy.
    """
    if plot and not plot.expanduser().absolute().parent.is_dir():
        raise InputError(f"--plot {plot}: its directory does not exist")
    if plot and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"--plot {plot}: name a .png, .svg or .pdf file (the picture's format follows the name)")
    _quiet_libraries()
    from lorakit.adapter_report import inspect_adapter, plot_report
    from lorakit.report import inspect_tables

    report = inspect_adapter(adapter, base)
    inspect_tables(adapter, report)
    if plot:
        note("plot written to", plot_report(report, plot))
    if base:
        if report.problems:
            raise InputError(f"the adapter does not fit {base}:\n  - " + "\n  - ".join(report.problems))
        note(f"fits {base}: every tensor matches a LoRA target, with the right shape")


@data_app.command("preview")
@_handled
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
    from lorakit.data import data_report
    from lorakit.model import load_tokenizer
    from lorakit.report import data_preview_tables

    tokenizer = load_tokenizer(cfg.model)
    data_preview_tables(data_report(cfg.data, tokenizer), tokenizer, cfg.data.max_length, n)


@config_app.command("show")
@_handled
def config_show(config: Path = CONFIG_ARG, overrides: list[str] = SET_OPT) -> None:
    """Print CONFIG fully resolved: every key, with defaults filled in and overrides applied."""
    import yaml

    from lorakit.config import config_to_dict

    typer.echo(yaml.safe_dump(config_to_dict(_load(config, overrides)), sort_keys=False).rstrip())


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point for ``python -m lorakit``."""
    app(argv)
