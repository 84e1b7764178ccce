"""The ``lorakit`` command line: wiring only; the work happens in the library."""

from __future__ import annotations

import logging
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
    from lorakit.train import TrainingError

    return (ResumeError, DataError, LoraError, ModelLoadError, TrainingError)


def _fail(message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
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
) -> None:
    """Fine-tune a model with LoRA as CONFIG says; writes OUTPUT_DIR/adapter (PEFT format).

    Progress, validation loss and checkpoints go to training.output_dir. Ctrl-C saves a
    checkpoint; rerun with --resume to continue exactly where it stopped.
    """
    cfg = _load(config, overrides)
    _quiet_libraries()
    from lorakit.train import TrainingInterrupted
    from lorakit.train import train as run

    try:
        result = run(cfg, resume=resume)
    except TrainingInterrupted as e:
        _fail(f"{e}. Continue with: lorakit train {config} --resume", 130)
    except _user_errors() as e:
        _fail(str(e), 1)
    console.print(f"adapter written to [bold]{result.adapter_dir}[/]")


@config_app.command("show")
def config_show(config: Path = CONFIG_ARG, overrides: list[str] = SET_OPT) -> None:
    """Print CONFIG fully resolved: every key, with defaults filled in and overrides applied."""
    cfg = _load(config, overrides)
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point for ``python -m lorakit``."""
    app(argv)
