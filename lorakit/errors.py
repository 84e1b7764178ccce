"""lorakit's errors: one hierarchy, one exit code per kind.

Every failure lorakit reports on purpose is a ``LorakitError``. Its class says who can
fix it: an ``InputError`` (exit 2) is something the user gave (a config, data, a path,
an adapter, a flag) that lorakit cannot honour exactly; a ``RunError`` (exit 1) is work
that started from valid inputs and could not finish (a loss that turned NaN, a merge
whose verification failed). ``cli`` maps them to exit codes in one place; Ctrl-C is 130.

This module imports nothing heavy, so the command line can name errors before torch loads.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class LorakitError(Exception):
    """Base of every error lorakit raises on purpose; ``exit_code`` is the CLI's status."""

    exit_code = EXIT_FAILURE


class InputError(LorakitError, ValueError):
    """An input that lorakit cannot honour exactly: refused before any work is done."""

    exit_code = EXIT_USAGE


class RunError(LorakitError, RuntimeError):
    """Work that started from valid inputs but could not finish."""

    exit_code = EXIT_FAILURE


class ConfigError(InputError):
    """A config that cannot be used; ``problems`` holds one line per key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


class DataError(InputError):
    """Data that cannot be turned into training examples (names the file and the 1-based row)."""


class LoraError(InputError):
    """A LoRA operation or adapter that cannot be carried out or loaded as asked."""


class ModelLoadError(InputError):
    """The base model could not be found or loaded."""


class EvalError(InputError):
    """An evaluation that cannot run as asked."""


class LaunchError(InputError):
    """A multi-process launch that cannot work on this machine."""


class ResumeError(InputError):
    """A checkpoint that cannot be resumed from."""


class MergeError(RunError):
    """A merge whose result failed verification, or that could not be written."""


class TrainingError(RunError):
    """A run that had to stop (non-finite loss, adapters cut off from the loss, ...)."""


class TrainingInterrupted(LorakitError):
    """Ctrl-C: a checkpoint was saved and the run can be resumed."""

    exit_code = EXIT_INTERRUPTED
