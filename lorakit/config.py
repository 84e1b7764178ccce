"""The training config: a YAML file validated once into typed sections.

``load_config(path, overrides)`` reads YAML safely, applies ``--set a.b=value``
overrides, and returns a ``Config``; every problem is reported at once, one line per
key path, in a ``ConfigError``.
"""

from __future__ import annotations

import difflib
import logging
import os
import reprlib
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, Strict, ValidationError, field_validator,
                      model_validator)
from pydantic.dataclasses import dataclass

from lorakit.errors import ConfigError, InputError
from lorakit.inputs import check_regex, check_unicode, looks_local, missing_path, template_fields

logger = logging.getLogger("lorakit")

DEFAULT_MODEL = "default"
# Limits that keep a hostile config file from exhausting memory or time.
MAX_CONFIG_BYTES, MAX_ALIASES = 10_000_000, 20
# Written beside every adapter (and merged model) so later commands reuse the run's settings.
SAVED_CONFIG = "training_config.yaml"


# An integer that must be written as one: YAML's `true` or JSON's "8" is not a rank.
Count = Annotated[int, Strict()]


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean (YAML reads true/false, yes/no and "
                         "on/off as booleans)")
    return value


# Numbers that YAML's booleans must not stand in for (``lr: yes`` would otherwise be 1.0).
Real = Annotated[float, BeforeValidator(_not_a_boolean)]
Whole = Annotated[int, BeforeValidator(_not_a_boolean)]


@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class LoraConfig:
    """What to adapt and how.

    Args:
        r: rank of each update; higher = more capacity and more memory.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter input during training; 0 costs nothing.
        target_modules: a list of module names (exact, or a ``.suffix`` of the path) and
            attention roles ``q``/``k``/``v``/``o`` resolved per architecture (slices of
            fused qkv layers included), or one string: ``all-linear`` (every linear layer
            but the output head) or a regular expression matched against full paths.
        bias: ``none``, ``all`` (train every bias) or ``lora_only`` (biases of adapted layers).
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``kaiming`` (uniform, PEFT's default) or ``gaussian`` for A with B zero; or
            ``pissa`` / ``pissa_niter_N`` / ``olora``: A and B start from the principal part
            of each base weight (exact SVD, N-iteration randomized SVD, QR), which is taken
            out of the base; the adapter is saved as a plain LoRA of rank 2r on the base.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``lm_head``).
        layers: only adapt modules of these block indices (``model.layers.<i>``).
        layers_pattern: the name of the block list that ``layers`` indexes (``layers``, ``h``);
            default: the first numbered part of the path.
        exclude_modules: never adapt these (names or ``.suffix`` of the path, or one regex).
        rank_pattern: per-module rank, ``{regex matching the end of the path: r}`` (PEFT's rule).
        alpha_pattern: per-module alpha, the same way.
        use_dora: DoRA (weight-decomposed LoRA): also train a magnitude per output row of
            each adapted layer; about a third more time per step, merges exactly.
        init_from: start from this adapter's weights (e.g. a supervised run's, before DPO);
            its own config then sets every other key of this section.
    """

    r: Count = 8
    alpha: Real = 16.0
    dropout: Real = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q", "v"])
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    layers: list[Count] | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, Count] | None = None
    alpha_pattern: dict[str, Real] | None = None
    use_dora: bool = False
    init_from: str | None = None

    @field_validator("r", "alpha")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, p: float) -> float:
        if not 0 <= p < 1:
            raise ValueError("must be in [0, 1)")
        return p

    @field_validator("init")
    @classmethod
    def _known_init(cls, init: str) -> str:
        niter = init.removeprefix("pissa_niter_")
        if init not in ("kaiming", "gaussian", "pissa", "olora") and not (niter != init and niter.isdigit()
                                                                           and 0 < int(niter) <= 100):
            raise ValueError("must be kaiming, gaussian, pissa, pissa_niter_N (1 ≤ N ≤ 100) or olora")
        return init

    @model_validator(mode="after")
    def _init_fits(self) -> LoraConfig:
        if self.changes_base and self.use_dora:
            raise ValueError(f"init: {self.init} is not supported together with use_dora")
        return self

    @field_validator("target_modules")
    @classmethod
    def _valid_targets(cls, spec: list[str] | str) -> list[str] | str:
        if not spec:
            raise ValueError("must name at least one module")
        if isinstance(spec, str) and spec != "all-linear":
            check_regex(spec)
        return spec

    @field_validator("exclude_modules")
    @classmethod
    def _valid_excludes(cls, spec: list[str] | str | None) -> list[str] | str | None:
        if isinstance(spec, str):
            check_regex(spec)
        return spec

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _valid_patterns(cls, pattern: dict | None) -> dict | None:
        for key, value in (pattern or {}).items():
            check_regex(key)
            if not value > 0:
                raise ValueError(f"{key!r}: {value!r} must be > 0")
        return pattern

    @property
    def changes_base(self) -> bool:
        """Whether ``init`` takes part of each base weight out (PiSSA, OLoRA), so that the
        factors are right only on that changed base."""
        return self.init not in ("kaiming", "gaussian")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of the fields."""
        return asdict(self)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class QuantizationConfig(_Section):
    """bitsandbytes quantization of the frozen base (QLoRA)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # see quantized_compute_dtype


class ModelConfig(_Section):
    """The base model; ``dtype: auto`` computes in bfloat16 where the hardware runs it fast
    (see ``lorakit.model.resolve_dtype``), else float32."""

    name_or_path: str = DEFAULT_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: QuantizationConfig | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


class DataConfig(_Section):
    """Training (and validation) data and how rows become tokens."""

    train: str
    validation: str | None = None
    format: Literal["prompt_completion", "chat", "alpaca", "text", "preference"] = "prompt_completion"
    prompt_template: str = "{prompt}"
    completion_field: str = "completion"
    text_field: str = "text"
    chat_template: bool = False
    max_length: Whole = Field(512, gt=0)
    train_on_prompt: bool = False
    group_by_length: bool = True
    packing: bool = False
    validation_limit: Whole | None = Field(None, gt=0)

    @field_validator("prompt_template")
    @classmethod
    def _simple_placeholders(cls, template: str) -> str:
        template_fields(template)
        return template

    @model_validator(mode="after")
    def _no_answer_in_the_prompt(self) -> DataConfig:
        if self.format in ("prompt_completion", "preference"):
            answers = {self.completion_field} | ({"chosen", "rejected"} if self.format == "preference" else set())
            leaked = [name for name in template_fields(self.prompt_template) if name in answers]
            if leaked:
                raise ValueError(f"prompt_template names {{{leaked[0]}}}, the answer the model is trained to "
                                 "produce: every prompt would hold its own answer")
        return self


class DpoConfig(_Section):
    """DPO (``training.objective: dpo``): ``beta`` weighs the log-ratio against the
    reference; ``loss`` is ``sigmoid`` (Rafailov et al. 2023) or ``ipo`` (Azar et al. 2023);
    ``precompute_reference`` scores every pair with the reference once, before step 1,
    instead of once per step."""

    beta: Real = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    precompute_reference: bool = False


class OrpoConfig(_Section):
    """ORPO (``training.objective: orpo``; Hong et al. 2024): ``lambda`` weighs the
    odds-ratio term against the chosen answer's NLL."""

    weight: Real = Field(0.1, gt=0, alias="lambda")


class TrainingConfig(_Section):
    """The optimization loop, checkpoints and logging."""

    output_dir: str = Field("runs/lorakit", min_length=1)
    max_steps: Whole | None = Field(None, gt=0)
    epochs: Real | None = Field(None, gt=0)
    batch_size: Whole = Field(8, gt=0)
    grad_accum: Whole = Field(1, gt=0)
    lr: Real = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Whole = Field(0, ge=0)
    weight_decay: Real = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    max_grad_norm: Real | None = Field(1.0, gt=0)
    loraplus_lr_ratio: Real | None = Field(None, gt=0)
    seed: Whole = Field(0, ge=0, lt=2**32)  # what numpy (seeded with it) accepts
    eval_every: Whole | None = Field(None, gt=0)
    save_every: Whole | None = Field(None, gt=0)
    keep_checkpoints: Whole = Field(2, gt=0)
    log_every: Whole = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False
    objective: Literal["sft", "dpo", "orpo"] = "sft"

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set training.max_steps or training.epochs")
        if self.max_steps is not None and self.epochs is not None:  # one would be silently ignored
            raise ValueError(f"training.max_steps ({self.max_steps}) and training.epochs ({self.epochs:g}) are both "
                             "set; set one (e.g. --set training.max_steps=null)")
        return self


class Config(_Section):
    """A whole training run: ``model``, ``lora``, ``data``, ``training``; ``source`` names
    the file it came from, for messages.

    ``method: full`` trains every weight instead of adapters (the reference LoRA is
    measured against); the ``lora`` section is then ignored.
    """

    method: Literal["lora", "full"] = "lora"
    model: ModelConfig = ModelConfig()
    _source: str = PrivateAttr("the config")
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    training: TrainingConfig
    dpo: DpoConfig | None = None
    orpo: OrpoConfig | None = None

    @model_validator(mode="after")
    def _objective_defaults(self) -> Config:
        # The section of the chosen objective always exists, with its defaults when not given.
        if self.training.objective == "dpo" and self.dpo is None:
            self.dpo = DpoConfig()
        if self.training.objective == "orpo" and self.orpo is None:
            self.orpo = OrpoConfig()
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def trains_whole_weights(self) -> bool:
        """Whether the run trains weights other than LoRA factors (which need float32)."""
        return self.method == "full" or self.lora.bias != "none" or bool(self.lora.modules_to_save)


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
            value = yaml_value(raw) if raw.strip() else None
        except ValueError as e:
            raise ConfigError(source, [f"--set {key}: value {raw!r} is not valid YAML ({e})"]) from None
        parsed.append((key.strip(), value))
    return parsed


def _known_keys(model: type[BaseModel] | type, prefix: str) -> list[str]:
    fields = getattr(model, "model_fields", None) or getattr(model, "__pydantic_fields__", {})
    return [prefix + (getattr(info, "alias", None) or name) for name, info in fields.items()]


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
    shown = "" if isinstance(value, (dict, list)) else f" (got {reprlib.repr(value)})"
    return f"{path}: {message}{shown}"


def _raw_section(raw: dict, key: str) -> dict:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _file_problems(raw: dict) -> list[str]:
    """Paths that do not exist, checked from the raw config so they are reported together
    with every other problem, before any model loads."""
    problems = []
    data = _raw_section(raw, "data")
    for key in ("train", "validation"):
        value = data.get(key)
        if isinstance(value, str) and (problem := missing_path(value)):
            problems.append(f"data.{key}: {problem}")
        elif isinstance(value, str) and looks_local(value) and Path(value).expanduser().is_dir():
            problems.append(f"data.{key}: {value!r} is a directory; name a .jsonl, .json, .csv or .parquet file")
    output = _raw_section(raw, "training").get("output_dir")
    if isinstance(output, str) and output:
        target = Path(output).expanduser().absolute()
        existing = next(p for p in (target, *target.parents) if p.exists())
        if existing == target and not target.is_dir():
            problems.append(f"training.output_dir: {output!r} is a file, not a directory")
        elif not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"training.output_dir: {output!r} cannot be written ({existing} is not a writable directory)")
    init_from = _raw_section(raw, "lora").get("init_from")
    if isinstance(init_from, str) and (problem := missing_path(init_from)):
        problems.append(f"lora.init_from: {problem} (train the run that writes that adapter first)")
    elif isinstance(init_from, str) and not (Path(init_from).expanduser() / "adapter_config.json").is_file():
        problems.append(f"lora.init_from: {init_from!r} holds no adapter_config.json; name an adapter directory")
    name = _raw_section(raw, "model").get("name_or_path")
    if isinstance(name, str) and name != DEFAULT_MODEL and (problem := missing_path(name)):
        problems.append(f"model.name_or_path: {problem}")
    return problems


def _cross_problems(raw: dict, config: Config) -> list[str]:
    """Settings that are each valid but contradict one another."""
    problems = []
    if config.method == "full":
        if "lora" in raw:
            problems.append("lora: set, but method: full trains every weight and uses no adapters; "
                            "remove the lora section or use method: lora")
        if config.model.quantization is not None:
            problems.append("model.quantization: full fine-tuning cannot train quantized weights; "
                            "remove it or use method: lora (QLoRA)")
        if config.training.loraplus_lr_ratio is not None:
            problems.append("training.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B factors; "
                            "full fine-tuning has none")
    elif config.model.quantization is not None and config.lora.changes_base:
        problems.append(f"lora.init: {config.lora.init} takes the principal part out of each base weight, which a "
                        "quantized base cannot take without re-quantizing; use init: kaiming with model.quantization")
    quantization = _raw_section(_raw_section(raw, "model"), "quantization")
    if config.model.quantization is not None and config.model.quantization.bits == 8:
        problems += [f"model.quantization.{key}: applies to 4-bit bases only, and bits is 8 (bitsandbytes' 8-bit "
                     "layers take no such setting); remove it or use bits: 4"
                     for key in ("quant_type", "double_quant", "compute_dtype") if quantization.get(key) is not None]
    problems += _objective_problems(raw, config)
    return problems


# Data keys that only some formats read, and those formats.
_FORMAT_KEYS = {
    "prompt_template": ("prompt_completion", "preference"),
    "completion_field": ("prompt_completion",),
    "text_field": ("text",),
    "chat_template": ("prompt_completion", "alpaca", "preference"),
}


def _given(raw: dict, section: str) -> dict:
    """A raw section's keys with a value (``null`` counts as not set)."""
    return {key: value for key, value in _raw_section(raw, section).items() if value is not None}


def _unread_keys(raw: dict, config: Config) -> list[str]:
    """Keys set in the config that this run never reads: data keys its format ignores,
    validation settings without validation data, checkpoints kept but never written.

    They are warned about, not refused: a config switched to another format keeps its old
    keys, and ``--set data.validation=null`` leaves ``eval_every`` behind, harmlessly."""
    data, training, fmt = _given(raw, "data"), _given(raw, "training"), config.data.format
    unread = []
    for key, formats in _FORMAT_KEYS.items():
        if key not in data or fmt in formats:
            continue
        if fmt == "chat" and key == "chat_template":
            if data[key] is False:
                unread.append("data.chat_template: false has no effect: format chat always renders rows with the "
                              "model's chat template")
            continue
        unread.append(f"data.{key} has no effect: format {fmt} does not read it (only format {' or '.join(formats)} "
                      "does)")
    if config.data.validation is None:
        unread += [f"{where} has no effect: data.validation is not set, so there is nothing to validate on"
                   for where, given in (("data.validation_limit", "validation_limit" in data),
                                        ("training.eval_every", "eval_every" in training)) if given]
    if "keep_checkpoints" in training and config.training.save_every is None:
        unread.append("training.keep_checkpoints has no effect: training.save_every is not set, so no checkpoint is "
                      "written")
    return unread


def _objective_problems(raw: dict, config: Config) -> list[str]:
    """Preference objectives against the data, the method and the lora section."""
    problems = []
    objective, data = config.training.objective, config.data
    for section in ("dpo", "orpo"):
        if raw.get(section) is not None and objective != section:
            problems.append(f"{section}: set, but training.objective is {objective}; set training.objective: {section} "
                            "or remove the section")
    if objective != "sft":
        if data.format != "preference":
            problems.append(f"training.objective: {objective} trains on pairs of answers: set data.format: preference "
                            "(rows with prompt, chosen, rejected)")
        if config.method == "full":
            problems.append(f"training.objective: {objective} is trained on adapters (the reference is the model as "
                            "it started); use method: lora")
    elif data.format == "preference":
        problems.append("data.format: preference is for training.objective dpo or orpo; for supervised training on "
                        "the chosen answers, use format prompt_completion with completion_field: chosen")
    if data.format == "preference":
        problems += [f"data.{key}: not available with format preference (each answer is scored whole, after its "
                     "prompt)" for key in ("packing", "train_on_prompt") if getattr(data, key)]
    given = set(_raw_section(raw, "lora")) - {"init_from"}
    if config.lora.init_from and given:
        problems.append(f"lora.{sorted(given)[0]}: the adapter in lora.init_from sets the whole lora section; "
                        "remove the other lora keys")
    return problems


def _text_problems(raw: dict) -> list[str]:
    """Lone surrogates (YAML's ``"\\ud800"``) anywhere in the config, by key."""
    problems = []
    for section, body in raw.items():
        for key, value in body.items() if isinstance(body, dict) else [(None, body)]:
            try:
                check_unicode([section, key, value], str(section) if key is None else f"{section}.{key}")
            except InputError as e:
                problems.append(str(e))
    return problems


def validate_config(raw: dict, source: str) -> Config:
    """Turn a raw dict into a ``Config``, or raise ``ConfigError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    if "lora" in raw and raw["lora"] is None:  # `lora: null` (or --set lora=null): no lora section
        raw = {k: v for k, v in raw.items() if k != "lora"}
    problems = _text_problems(raw)
    if problems:  # text that is no text breaks every later check
        raise ConfigError(source, problems)
    problems = _file_problems(raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, [_describe(err, raw) for err in e.errors()] + problems) from None
    problems += _cross_problems(raw, config)
    if problems:
        raise ConfigError(source, problems)
    for message in _unread_keys(raw, config):
        logger.warning("%s: %s", source, message)
    config._source = source
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
    raw = read_yaml(path, source)
    if raw is None:
        raw = {}
    for key, value in parse_overrides(overrides or []):
        if isinstance(raw, dict):
            _set_dotted(raw, key, value, source)
    return validate_config(raw, source)


def yaml_value(text: str) -> Any:
    """One value written in YAML (a ``--set`` or ``--grid`` value), read as strictly as a config file.

    Raises:
        ValueError: the value is not valid YAML (a key given twice included), saying why.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ValueError(getattr(e, "problem", None) or str(e)) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first on line {seen[key] + 1}); YAML would "
                    "silently keep only the second", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike, source: str | None = None) -> Any:
    """A YAML file parsed safely (no Python objects) and strictly (no duplicate keys).

    Raises:
        ConfigError: an unreadable, binary or invalid file, naming the line.
    """
    source = source or str(path)
    file = Path(path)
    if file.exists() and not file.is_file():
        raise ConfigError(source, ["not a regular file: expected a YAML config file"])
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(source, [f"{file.stat().st_size:,} bytes: a config is at most {MAX_CONFIG_BYTES:,}"])
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError(source, [f"cannot read the config file: {e.strerror or e}"]) from None
    if b"\0" in data:
        raise ConfigError(source, ["not a text file (it holds NUL bytes): expected YAML"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not UTF-8 text (byte {e.start + 1} is invalid): expected YAML"]) from None
    try:
        # Aliases can multiply a small file into an enormous structure ("billion laughs").
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_ALIASES:
            raise ConfigError(source, [f"{aliases} YAML aliases (*name): a config may use at most {MAX_ALIASES}"])
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"not valid YAML: {e}"]) from None


def config_to_dict(config: Config) -> dict:
    """The fully resolved config as plain data (defaults included), ready for YAML/JSON."""
    return config.model_dump(mode="json", by_alias=True)


def saved_config_dict(config: Config) -> dict:
    """``config_to_dict`` with the local paths a later command reads again (base model,
    data, ``lora.init_from``) made absolute: eval, generate and merge run from any
    directory, where a relative path would name another file, or another model."""
    data = config_to_dict(config)
    for section, key in (("model", "name_or_path"), ("data", "train"), ("data", "validation"), ("lora", "init_from")):
        value = (data.get(section) or {}).get(key)
        if value == DEFAULT_MODEL and section == "model":  # the embedded model, whatever the directory holds
            continue
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            data[section][key] = str(Path(value).expanduser().resolve())
    return data


def read_saved_config(directory: str | os.PathLike) -> Config | None:
    """The run's config saved beside an adapter or merged model (``None`` when there is none).

    Read like any config (safely, strictly), but without the checks that concern starting
    a run (its data files need not exist any more).

    Raises:
        ConfigError: a saved config that is not valid, naming the file.
    """
    path = Path(directory) / SAVED_CONFIG
    if not path.is_file():
        return None
    saved = read_yaml(path)
    if not isinstance(saved, dict):
        raise ConfigError(str(path), [f"expected a mapping of sections, got {type(saved).__name__}"])
    try:
        config = Config.model_validate(saved)
    except ValidationError as e:
        raise ConfigError(str(path), [_describe(err, saved) for err in e.errors()]) from None
    config._source = str(path)
    return config
