"""Scoring a trained adapter or merged model: greedy generation on held-out rows,
text metrics, perplexity on the completions, and the gain over the base model.

Prompts are rendered exactly as in training (same format, template and chat template),
cut just before the text the model was trained to produce.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter_io import load_adapter, read_adapter
from lorakit.config import DataConfig, ModelConfig, read_saved_config
from lorakit.data import encode, labelled_targets, tokenize_many
from lorakit.errors import EvalError
from lorakit.files import atomic_file, check_inputs_survive, record_written
from lorakit.generation import greedy, stop_ids
from lorakit.inject import lora_modules, remove_lora
from lorakit.inputs import check_unicode, missing_path, template_fields
from lorakit.loss import CausalLMLoss, evaluate_loss
from lorakit.metrics import GENERATION_METRICS, METRICS, score
from lorakit.model import adapter_base_config, load_model, load_model_config, load_tokenizer
from lorakit.peft_config import CONFIG_NAME
from lorakit.preflight import context_length
from lorakit.render import preference_response, render
from lorakit.rows import load_rows, row_field

logger = logging.getLogger("lorakit")
PREDICTIONS_FILE, METRICS_FILE = "predictions.jsonl", "metrics.json"  # what eval writes into --output


@dataclass
class Target:
    """What to evaluate: a base model, optionally with an adapter, and the data format."""

    model: ModelConfig
    adapter: Path | None
    data: DataConfig | None


def resolve_target(path: str, base: str | None = None, trust_remote_code: bool = False,
                   dtype: str = "auto") -> Target:
    """An adapter directory (its base and data format come from its saved config) or a
    model (a merged directory, a checkpoint, ``default`` or a hub id).

    ``dtype`` is the base's compute dtype (``auto``: bfloat16 where the hardware runs it
    fast, as training does; adapters keep their float32 factors either way). A QLoRA
    adapter is scored on the 4-bit base it was trained with.

    Raises:
        InputError: a local-looking path that does not exist, or a saved config that is
            not valid.
    """
    problem = missing_path(path)
    if problem:
        raise EvalError(problem)
    directory = Path(path)
    saved = read_saved_config(directory) if directory.is_dir() else None
    data = saved.data if saved else None
    if (directory / CONFIG_NAME).is_file():
        model = adapter_base_config(directory, base, trust_remote_code).model_copy(update={"dtype": dtype})
        if saved and saved.model.quantization and base is None:  # score what the adapter was trained with
            model = model.model_copy(update={"quantization": saved.model.quantization, "dtype": saved.model.dtype})
        return Target(model, directory, data)
    return Target(ModelConfig(name_or_path=base or path, dtype=dtype, trust_remote_code=trust_remote_code),
                  None, data)


def reference_of(row: dict, data: DataConfig, where: str = "data") -> str:
    """The text the model should produce for ``row``."""
    if data.format == "chat":
        answers = [m["content"] for m in row["messages"] if m.get("role") == "assistant"]
        return answers[-1]  # render() has checked there is one
    if data.format == "alpaca":
        return row_field(row, "output", where)
    if data.format == "preference":
        return preference_response(row, "chosen", where)
    if data.format == "text":
        raise EvalError("format 'text' has no prompt/answer split: only --metric perplexity applies")
    return row_field(row, data.completion_field, where)


def prompt_of(segments: list[tuple[str, bool]]) -> str:
    """Everything before the last trained segment: the prompt for generation."""
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    return "".join(text for text, _ in segments[:last])


def check_context(tokenizer, prompts: list[str], places: list[str], max_new_tokens: int, context: int | None) -> None:
    """Refuse a prompt that, with the tokens to generate, runs past the model's positions
    (``context``): beyond them the output means nothing, and RoPE models give it silently.

    Raises:
        EvalError: naming the prompt's place, its length and the context.
        DataError: a prompt token the model has no embedding for.
    """
    for prompt, place in zip(prompts, places):
        n = len(encode(tokenizer, prompt, place))  # also refuses tokens the model has no embedding for
        if context is not None and n + max_new_tokens > context:
            raise EvalError(f"{place}: {n} prompt tokens and --max-new-tokens {max_new_tokens} run past the model's "
                            f"context of {context} tokens; shorten the prompt or lower --max-new-tokens")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to ``prompts`` (``generation.greedy``), stopped at EOS or end of turn."""
    encoded = [encode(tokenizer, prompt) for prompt in prompts]
    answers = greedy(model, encoded, max_new_tokens, stop_ids(tokenizer), batch_size, tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(answers, skip_special_tokens=True)]


def _score_model(model, tokenizer, segments, places, references, data, metrics, max_new_tokens,
                 batch_size) -> tuple[dict, list[str]]:
    scores, predictions = {}, []
    if any(m in GENERATION_METRICS for m in metrics):
        predictions = generate(model, tokenizer, [prompt_of(s) for s in segments], max_new_tokens, batch_size)
        for m in metrics:
            if m in GENERATION_METRICS:
                scores.update(score(m, predictions, references))
    if "perplexity" in metrics:
        full = tokenize_many(segments, tokenizer, 10**9, False, places)
        examples = [{k: e[k][: data.max_length] for k in ("input_ids", "labels")} for e in full]
        cut = sum(len(e["input_ids"]) > data.max_length for e in full)
        if cut:
            logger.warning("%d of %d rows are cut at the training's max_length=%d: perplexity scores only the part "
                           "that fits, as validation loss in training does", cut, len(full), data.max_length)
        if not sum(labelled_targets(e) for e in examples):
            raise EvalError(f"perplexity: no row keeps an answer token within the training's max_length="
                            f"{data.max_length}, so there is nothing to score")
        loss = evaluate_loss(CausalLMLoss(model), examples, batch_size, tokenizer.pad_token_id, model.device)
        scores.update(loss=loss, perplexity=float(torch.exp(torch.tensor(loss))))
    return scores, predictions


def run_eval(target: Target, metrics: list[str], data_file: str | None = None, limit: int | None = None,
             max_new_tokens: int = 64, batch_size: int = 32, output: Path | None = None,
             compare_base: bool = False) -> dict:
    """Score ``target`` and write ``predictions.jsonl`` and ``metrics.json`` to ``output``.

    Returns:
        ``{"model": scores}`` and, with ``compare_base``, ``{"base": scores, "gain": ...}``.

    Raises:
        EvalError: unknown metric, no data, no data format to render prompts with, or
            ``compare_base`` without an adapter.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}")
    if compare_base and target.adapter is None:
        raise EvalError(f"--compare-base scores an adapter's base beside it, and {target.model.name_or_path} is a "
                        "whole model (merged or base); evaluate the base on its own to compare")
    data = target.data or DataConfig(train=data_file or "")
    source = data_file or data.validation
    if not source:
        raise EvalError("no data to evaluate on: pass --data FILE (the config has no validation split)")
    if target.data is None:
        logger.warning("no saved training config: rendering %s as prompt/completion rows with defaults", source)
    if output is not None:
        check_inputs_survive([output / PREDICTIONS_FILE, output / METRICS_FILE], {"--data": source}, "--output")
    rows = load_rows(source, "validation").head(limit)

    tokenizer = load_tokenizer(target.model)
    # Render every row first: bad data fails before the model loads.
    segments = [render(row, data, tokenizer, where) for row, where in zip(rows.rows, rows.where)]
    references = [reference_of(row, data, where) for row, where in zip(rows.rows, rows.where)] if set(metrics) & set(GENERATION_METRICS) else []
    if references:
        context = context_length(load_model_config(target.model.name_or_path, target.model.trust_remote_code))
        check_context(tokenizer, [prompt_of(s) for s in segments], rows.where, max_new_tokens, context)
    model = load_model(target.model)
    args = (tokenizer, segments, rows.where, references, data, metrics, max_new_tokens, batch_size)
    results = {}
    if compare_base and target.adapter is not None:
        results["base"], _ = _score_model(model, *args)
    if target.adapter is not None:
        load_adapter(model, target.adapter)
    results["model"], predictions = _score_model(model, *args)
    if "base" in results:
        results["gain"] = {k: v - results["base"][k] for k, v in results["model"].items()}
    if target.adapter is not None:
        remove_lora(model)

    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        with atomic_file(output / PREDICTIONS_FILE) as tmp:  # a kill leaves the previous eval's files
            tmp.write_text("".join(json.dumps({"row": i, "prediction": prediction, "reference": references[i]}) + "\n"
                                   for i, prediction in enumerate(predictions)))
        with atomic_file(output / METRICS_FILE) as tmp:
            tmp.write_text(json.dumps({"data": source, "rows": len(rows), **results}, indent=2))
        record_written(output, [PREDICTIONS_FILE, METRICS_FILE])  # what --force and --overwrite may replace
    return results


def generation_prompt(text: str, data: DataConfig | None, tokenizer) -> str:
    """A user prompt rendered as the adapter saw prompts in training.

    Chat data and ``chat_template`` wrap it as a user turn; alpaca uses it as the
    instruction; a prompt template with a single field gets it in that field; anything
    else takes the text as it is.
    """
    if data is None:
        return text
    if data.format == "preference":  # its prompts render as prompt_completion rows' do
        data = data.model_copy(update={"format": "prompt_completion"})
    if data.format == "chat":
        row = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    elif data.format == "alpaca":
        row = {"instruction": text, "output": ""}
    elif data.format == "text":
        return text
    else:
        fields = set(template_fields(data.prompt_template))
        template = data.prompt_template if len(fields) == 1 else "{prompt}"
        data = data.model_copy(update={"prompt_template": template})
        row = {(fields.pop() if len(fields) == 1 else "prompt"): text, data.completion_field: ""}
    return prompt_of(render(row, data, tokenizer))


class Switcher:
    """One base model in memory and several adapters to answer with, switched by name."""

    def __init__(self, target: str, adapters: dict[str, str], use: str | None = None,
                 trust_remote_code: bool = False, dtype: str = "auto") -> None:
        main = resolve_target(target, trust_remote_code=trust_remote_code, dtype=dtype)
        self.adapters = {**({"main": str(main.adapter)} if main.adapter else {}), **adapters}
        for name, directory in adapters.items():
            read_adapter(directory)  # every adapter is checked before the base loads
        first = resolve_target(next(iter(self.adapters.values())), trust_remote_code=trust_remote_code, dtype=dtype) \
            if self.adapters else main
        self.tokenizer = load_tokenizer(first.model)
        self.target_model = first.model
        self.model = load_model(first.model).eval()
        self.data = main.data
        self.active = None
        if self.adapters:
            self.use(use or next(iter(self.adapters)))

    def use(self, name: str) -> None:
        """Make adapter ``name`` the one that answers."""
        if name not in self.adapters:
            raise EvalError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters)}")
        if any(m.initial is not None for m in lora_modules(self.model).values()):
            # That adapter changed the base weights (an unconverted PiSSA/OLoRA adapter); taking
            # them back would round them in a low-precision dtype, so the base loads again.
            self.model = load_model(self.target_model).eval()
        else:
            remove_lora(self.model)
        load_adapter(self.model, self.adapters[name])
        self.data = resolve_target(self.adapters[name]).data or self.data
        self.active = name
        fields = template_fields(self.data.prompt_template) if self.data else []
        if self.data and self.data.format in ("prompt_completion", "preference") and len(fields) > 1:
            logger.warning("adapter %s was trained with prompt_template fields %s: one text cannot fill them, so each "
                           "prompt is used whole; write it as the training prompts read", name, ", ".join(fields))

    def answer(self, text: str, max_new_tokens: int) -> str:
        """The greedy answer to one prompt."""
        check_unicode(text, "generate")
        prompt = generation_prompt(text, self.data, self.tokenizer)
        check_context(self.tokenizer, [prompt], ["generate"], max_new_tokens, context_length(self.model.config))
        return generate(self.model, self.tokenizer, [prompt], max_new_tokens, 1)[0]
