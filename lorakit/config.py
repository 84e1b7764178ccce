"""The training config: a YAML file validated once into typed sections.

``load_config(path, overrides)`` reads YAML safely, applies ``--set a.b=value``
overrides, and returns a ``Config``; every problem is reported at once, one line per
key path, in a ``ConfigError``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorakit.inject import LoraConfig

DEFAULT_MODEL = "default"
# Written beside every adapter (and merged model) so later commands reuse the run's settings.
SAVED_CONFIG = "training_config.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` holds one line per key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(_Section):
    """bitsandbytes quantization of the frozen base (QLoRA)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ModelConfig(_Section):
    """The base model."""

    name_or_path: str = DEFAULT_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: QuantizationConfig | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


class DataConfig(_Section):
    """Training (and validation) data and how rows become tokens."""

    train: str
    validation: str | None = None
    format: Literal["prompt_completion", "chat", "alpaca", "text"] = "prompt_completion"
    prompt_template: str = "{prompt}"
    completion_field: str = "completion"
    text_field: str = "text"
    chat_template: bool = False
    max_length: int = Field(512, gt=0)
    train_on_prompt: bool = False
    group_by_length: bool = True
    packing: bool = False
    validation_limit: int | None = Field(None, gt=0)


class TrainingConfig(_Section):
    """The optimization loop, checkpoints and logging."""

    output_dir: str = "runs/lorakit"
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set training.max_steps or training.epochs")
        return self


class Config(_Section):
    """A whole training run: ``model``, ``lora``, ``data``, ``training``.

    ``method: full`` trains every weight instead of adapters (the reference LoRA is
    measured against); the ``lora`` section is then ignored.
    """

    method: Literal["lora", "full"] = "lora"
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    training: TrainingConfig


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(source, [f"--set {dotted}: {key} is not a section"])
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str], source: str = "--set") -> list[tuple[str, Any]]:
    """``["a.b=1e-4", "c=[q, v]"]`` → ``[("a.b", 1e-4), ("c", ["q", "v"])]``; values are YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(source, [f"--set {item!r}: expected KEY=VALUE, e.g. training.lr=1e-4"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(source, [f"--set {key}: value {raw!r} is not valid YAML ({e})"]) from e
        parsed.append((key.strip(), value))
    return parsed


def _known_keys(model: type[BaseModel] | type, prefix: str) -> list[str]:
    fields = getattr(model, "model_fields", None) or getattr(model, "__pydantic_fields__", {})
    return [prefix + name for name in fields]


def _field_type(model: Any, name: str) -> Any:
    fields = getattr(model, "model_fields", None) or getattr(model, "__pydantic_fields__", {})
    info = fields.get(name)
    if info is None:
        return None
    ann = info.annotation
    for arg in getattr(ann, "__args__", ()) or (ann,):
        if hasattr(arg, "model_fields") or hasattr(arg, "__pydantic_fields__"):
            return arg
    return ann if hasattr(ann, "model_fields") or hasattr(ann, "__pydantic_fields__") else None


def _describe(error: dict, raw: dict) -> str:
    """One line for one pydantic error: the key path, the reason, and a did-you-mean."""
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-after")]
    path = ".".join(loc) or "(top level)"
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        model: Any = Config
        for part in loc[:-1]:
            model = _field_type(model, part) or model
        known = _known_keys(model, "")
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"; did you mean {'.'.join(loc[:-1] + close)}?" if close else f"; known keys: {', '.join(known)}"
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required, but missing"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) and len(str(value)) > 60 else f" (got {value!r})"
    return f"{path}: {message}{shown}"


def _file_problems(config: Config) -> list[str]:
    """Data files that do not exist, checked before any model loads."""
    problems = []
    for key in ("train", "validation"):
        value = getattr(config.data, key)
        if value is None:
            continue
        looks_local = value.startswith((".", "/", "~")) or Path(value).suffix in {
            ".json", ".jsonl", ".csv", ".parquet"
        }
        if looks_local and not Path(value).expanduser().is_file():
            problems.append(f"data.{key}: file {value!r} not found (from {os.getcwd()})")
    name = config.model.name_or_path
    if name != DEFAULT_MODEL and name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        problems.append(f"model.name_or_path: {name!r} does not exist")
    return problems


def validate_config(raw: dict, source: str) -> Config:
    """Turn a raw dict into a ``Config``, or raise ``ConfigError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, [_describe(err, raw) for err in e.errors()]) from None
    problems = _file_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config.

    Args:
        path: the YAML file.
        overrides: ``KEY=VALUE`` strings with dotted keys (``training.lr=1e-4``); values
            are parsed as YAML.

    Raises:
        ConfigError: for an unreadable file, bad YAML or any invalid value, listing all.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, [f"cannot read the config file: {e.strerror}"]) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"not valid YAML: {e}"]) from None
    for key, value in parse_overrides(overrides or []):
        if isinstance(raw, dict):
            _set_dotted(raw, key, value, source)
    return validate_config(raw, source)


def config_to_dict(config: Config) -> dict:
    """The fully resolved config as plain data (defaults included), ready for YAML/JSON."""
    return config.model_dump(mode="json")


def read_saved_config(directory: str | os.PathLike) -> dict:
    """The training config saved in an adapter or merged-model directory ({} if none)."""
    path = Path(directory) / SAVED_CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
