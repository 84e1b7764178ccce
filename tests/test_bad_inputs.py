"""Bad and hostile inputs, table-driven, through the real command line.

Each case builds its input in a fresh directory, runs one ``lorakit`` command, and
asserts the exit code (2: an input lorakit cannot honour; 1: work that could not finish),
that the message names what and where, and that no traceback is printed. The security
cases also assert that the marker file planted code or pickles would write never appears.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import save_tiny_model, tiny_config
from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import app
from lorakit.config import SAVED_CONFIG, config_to_dict, validate_config

runner = CliRunner()
MARKER = "pwned.marker"
_PAIR = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'


@dataclass
class Case:
    """What a case runs and what it must see."""

    args: list[str]
    code: int
    says: list[str]
    stdin: str | None = None
    absent: list[Path] = field(default_factory=list)  # files that must never appear
    intact: list[Path] = field(default_factory=list)  # files that must survive unchanged


@dataclass
class Ctx:
    """A fresh directory with a tiny model, a good config and a good adapter to spoil."""

    root: Path
    model: str
    adapter: Path

    def config(self, edit: Callable[[dict], None] | None = None, text: str | None = None, name: str = "c.yaml") -> str:
        raw = tiny_config(self.root, self.model)
        if edit:
            edit(raw)
        path = self.root / name
        path.write_text(text if text is not None else yaml.safe_dump(raw))
        return str(path)

    def data(self, text: str | bytes, name: str = "d.jsonl") -> str:
        path = self.root / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return str(path)

    def with_data(self, text: str | bytes, name: str = "d.jsonl", **data) -> str:
        path = self.data(text, name)
        return self.config(lambda raw: raw["data"].update(train=path, validation=None, **data))

    def with_pairs(self, text: str) -> str:
        """A DPO config on preference rows ``text``."""
        path = self.data(text)
        return self.config(lambda raw: (raw["data"].update(train=path, validation=None, format="preference",
                                                           prompt_template="{prompt}", completion_field="completion"),
                                        raw["training"].update(objective="dpo")))

    def peft(self, **changes) -> str:
        """The good adapter with its adapter_config.json edited (None removes a key)."""
        file = self.adapter / "adapter_config.json"
        config = json.loads(file.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        file.write_text(json.dumps(config))
        return str(self.adapter)

    def tensors(self, edit: Callable[[dict], None]) -> str:
        file = self.adapter / "adapter_model.safetensors"
        state = load_file(file)
        edit(state)
        save_file(state, file)
        return str(self.adapter)

    def first(self, suffix: str) -> str:
        return next(k for k in load_file(self.adapter / "adapter_model.safetensors") if k.endswith(suffix))


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A trained-looking adapter (random B) on the tiny model, with its training config."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("good")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q", "v"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_adapter(model, root / "adapter")
    cfg = validate_config(tiny_config(root, tiny_model_dir), "good")
    (root / "adapter" / SAVED_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg)))
    return root / "adapter"


class _Plant:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(c: Ctx) -> Case:
    (c.adapter / "adapter_model.safetensors").unlink()
    (c.adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Plant(c.root / MARKER)))
    return Case(["inspect", str(c.adapter)], 2, ["adapter_model.bin", "never loads"], absent=[c.root / MARKER])


def _pickle_only_eval(c: Ctx) -> Case:
    case = _pickle_only(c)
    return Case(["eval", str(c.adapter), "--limit", "1"], 2, ["never loads"], absent=case.absent)


def _remote_code(c: Ctx, base_flag: bool) -> Case:
    """A base whose config asks for custom code, named by an adapter that enables remote code."""
    base = c.root / "custom"
    shutil.copytree(c.model, base)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="planted", auto_map={"AutoConfig": "planted.PlantedConfig",
                                                    "AutoModelForCausalLM": "planted.PlantedModel"})
    (base / "config.json").write_text(json.dumps(config))
    (base / "planted.py").write_text(f"import pathlib\npathlib.Path({str(c.root / MARKER)!r}).touch()\n")
    saved = yaml.safe_load((c.adapter / SAVED_CONFIG).read_text())
    saved["model"].update(name_or_path=str(base), trust_remote_code=True)
    (c.adapter / SAVED_CONFIG).write_text(yaml.safe_dump(saved))
    args = ["eval", str(c.adapter), "--limit", "1", "--max-new-tokens", "1"]
    return Case(args + (["--base", str(base)] if base_flag else []), 2, ["trust_remote_code"],
                absent=[c.root / MARKER])


def _pickled_base(c: Ctx, command: list[str]) -> Case:
    """A base model whose only weights are a pickle that would write the marker."""
    base = c.root / "pickled"
    shutil.copytree(c.model, base)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(_Plant(c.root / MARKER)))
    args = [*command, "--base", str(base)] if command else ["train", c.config(
        lambda r: r["model"].update(name_or_path=str(base)))]
    return Case(args, 2, ["pytorch_model.bin", "never loads"], absent=[c.root / MARKER])


def _tokenizer_past_embedding(c: Ctx, command: str) -> Case:
    """A base whose tokenizer gained a token its embedding has no row for; a row writes it."""
    from transformers import AutoTokenizer

    base = c.root / "grown"
    shutil.copytree(c.model, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<new>"])
    tokenizer.save_pretrained(base)
    data = c.data('{"question": "1+1= <new>", "answer": "2"}\n')
    args = {
        "train": ["train", c.config(lambda r: (r["model"].update(name_or_path=str(base)),
                                               r["data"].update(train=data, validation=None)))],
        "eval": ["eval", str(c.adapter), "--base", str(base), "--data", data],
        "generate": ["generate", str(base), "--prompt", "x <new>"],
    }[command]
    return Case(args, 2, ["'<new>'", "embedding rows", "line 1" if command != "generate" else "generate"])


def _pad_past_embedding(c: Ctx) -> Case:
    """A base whose config shrank its vocabulary below the tokenizer's padding token."""
    base = c.root / "shrunk"
    shutil.copytree(c.model, base)
    config = json.loads((base / "config.json").read_text())
    config.update(vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    (base / "config.json").write_text(json.dumps(config))
    return Case(["train", c.config(lambda r: r["model"].update(name_or_path=str(base)))], 2,
                ["pad token", "100 embedding rows", "shrunk"])


def _replace_foreign(c: Ctx, command: str) -> Case:
    """--force or --overwrite onto a directory holding a file lorakit did not write."""
    run = c.root / "run"
    place = {"merge": c.root / "out", "export": c.root / "out", "train adapter": run / "adapter",
             "train checkpoints": run / "checkpoints"}[command]
    place.mkdir(parents=True)
    mine = Path(c.data("mine", str(place / "notes.txt")))
    if command.startswith("train"):
        (run / "adapter").mkdir(exist_ok=True)
        args = ["train", c.config(lambda r: r["training"].update(output_dir=str(run))), "--overwrite"]
    else:
        args = [command, str(c.adapter), "-o", str(place), "--force", *(["--to", "gguf"] if command == "export" else [])]
    return Case(args, 2, [str(place), "notes.txt", "lorakit did not write"], intact=[mine])


def _eval_onto_data(c: Ctx, data: str) -> Case:
    """eval --output where a file it writes is, or holds, its --data."""
    (c.root / data).parent.mkdir(parents=True)
    path = c.data('{"question": "1+1=", "answer": "2"}\n', data)
    written = data.split("/")[1]
    return Case(["eval", str(c.adapter), "--data", path, "--output", str(c.root / "out")], 2,
                ["--output", written, "--data"], intact=[Path(path)])


def _same_shapes_other_base(c: Ctx, command: str) -> Case:
    """The adapter on a base of the same shapes but other weights, named with --base."""
    other = c.root / "other"
    shutil.copytree(c.model, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    args = {"eval": ["eval", str(c.adapter), "--limit", "1", "--max-new-tokens", "1"],
            "merge": ["merge", str(c.adapter), "-o", str(c.root / "m")],
            "generate": ["generate", str(c.adapter), "--prompt", "1+1="]}[command]
    return Case([*args, "--base", str(other)] if command != "generate" else args, 2,
                ["trained on another base", "--any-base"], absent=[c.root / "m"])


def _merge_into(c: Ctx, where: str) -> Case:
    output = {"itself": c.adapter, "run": c.adapter.parent, "inside": c.adapter / "merged"}[where]
    weights = c.adapter / "adapter_model.safetensors"
    return Case(["merge", str(c.adapter), "--output", str(output), "--force"], 2, ["input", "destroy"],
                intact=[weights])


def _no_chat_template(c: Ctx) -> str:
    plain = c.root / "plain"
    shutil.copytree(c.model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    return c.config(lambda r: (r["model"].update(name_or_path=str(plain)), r["data"].update(chat_template=True)))


def _chat_template_case(c: Ctx, keeps: str, turns: list[tuple[str, str]]) -> str:
    """A model whose chat template renders a message only when ``keeps`` (a Jinja test on
    ``m`` and ``loop``) holds, and one conversation ``turns`` to train on."""
    model = c.root / "templated"
    shutil.copytree(c.model, model)
    (model / "chat_template.jinja").write_text(
        f"{{% for m in messages %}}{{% if {keeps} %}}<{{{{ m.role }}}}>{{{{ m.content }}}}{{% endif %}}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    path = c.data(json.dumps({"messages": [{"role": r, "content": t} for r, t in turns]}) + "\n")
    return c.config(lambda r: (r["model"].update(name_or_path=str(model)),
                               r["data"].update(train=path, validation=None, format="chat")))


def _base_in_run(c: Ctx) -> Case:
    """A base model saved as an earlier full fine-tune's ``model/``, trained into that run."""
    base = c.root / "run" / "model"
    shutil.copytree(c.model, base)
    config = c.config(lambda r: (r["model"].update(name_or_path=str(base)), r.pop("lora"), r.update(method="full"),
                                 r["training"].update(output_dir=str(base.parent))))
    return Case(["train", config, "--overwrite"], 2, ["training.output_dir", "model.name_or_path"],
                intact=[base / "model.safetensors"])


def _parquet_twice(c: Ctx) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.root / "d.parquet"
    pq.write_table(pa.table([["1+1="], ["2"], ["3"]], names=["question", "answer", "answer"]), path)
    return c.config(lambda raw: raw["data"].update(train=str(path), validation=None))


def _parquet_bytes(c: Ctx) -> str:
    """A binary answer column: str() would train Python's b'2'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.root / "d.parquet"
    pq.write_table(pa.table({"question": ["1+1="], "answer": [b"2"]}), path)
    return c.config(lambda raw: raw["data"].update(train=str(path), validation=None))


def _nan(c: Ctx) -> str:
    key = c.first("lora_B.weight")
    return c.tensors(lambda s: s.__setitem__(key, s[key] * float("nan")))


CASES: dict[str, Callable[[Ctx], Case]] = {
    # --- config files ----------------------------------------------------------------
    "config missing": lambda c: Case(["train", str(c.root / "absent.yaml")], 2, ["cannot read the config file"]),
    "config binary": lambda c: Case(["train", c.data(b"\x00\x01\x02", "c.yaml")], 2, ["not a text file"]),
    "config not utf-8": lambda c: Case(["train", c.data(b"data:\n  train: \xff\xfe\n", "c.yaml")], 2, ["not UTF-8"]),
    "config invalid yaml": lambda c: Case(["train", c.data("data: [a\n", "c.yaml")], 2, ["line", "not valid YAML"]),
    "config duplicate section": lambda c: Case(["train", c.data(
        "data:\n  train: a.jsonl\ntraining:\n  max_steps: 1\ndata:\n  train: b.jsonl\n", "c.yaml")],
        2, ["line 5", "'data' is given twice"]),
    "config duplicate key": lambda c: Case(["config", "show", c.data(
        "lora:\n  r: 4\n  r: 8\n", "c.yaml")], 2, ["line 3", "'r' is given twice"]),
    "config python tag": lambda c: Case(["train", c.data(
        f"!!python/object/apply:pathlib.Path.touch [{str(c.root / MARKER)!r}]\n", "c.yaml")], 2, ["not valid YAML"],
        absent=[c.root / MARKER]),
    "config is a device": lambda c: Case(["train", "/dev/zero"], 2, ["not a regular file"]),
    "config alias bomb": lambda c: Case(["train", c.data(
        "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi"))
        + "lora:\n  target_modules: *i\n", "c.yaml")], 2,
        ["YAML aliases"]),
    "config top-level list": lambda c: Case(["train", c.data("- a\n- b\n", "c.yaml")], 2, ["mapping of sections"]),
    "config unknown key": lambda c: Case(["train", c.config(lambda r: r["lora"].update(dropuot=0.1))], 2,
                                         ["lora.dropuot", "did you mean lora.dropout"]),
    "config unknown section": lambda c: Case(["train", c.config(lambda r: r.update(optimiser={}))], 2,
                                             ["optimiser: unknown key"]),
    "config r zero": lambda c: Case(["train", c.config(lambda r: r["lora"].update(r=0))], 2, ["lora.r"]),
    "config r text": lambda c: Case(["train", c.config(lambda r: r["lora"].update(r="eight"))], 2, ["lora.r"]),
    "config alpha negative": lambda c: Case(["train", c.config(lambda r: r["lora"].update(alpha=-1))], 2, ["lora.alpha"]),
    "config dropout one": lambda c: Case(["train", c.config(lambda r: r["lora"].update(dropout=1.0))], 2,
                                         ["lora.dropout"]),
    "config no length": lambda c: Case(["train", c.config(lambda r: r["training"].pop("max_steps"))], 2,
                                       ["max_steps or training.epochs"]),
    "config batch negative": lambda c: Case(["plan", c.config(lambda r: r["training"].update(batch_size=-1))], 2,
                                            ["training.batch_size"]),
    "config lr zero": lambda c: Case(["train", c.config(lambda r: r["training"].update(lr=0))], 2, ["training.lr"]),
    "config scheduler": lambda c: Case(["train", c.config(lambda r: r["training"].update(scheduler="step"))], 2,
                                       ["training.scheduler"]),
    "config optimizer": lambda c: Case(["train", c.config(lambda r: r["training"].update(optimizer="sgd"))], 2,
                                       ["training.optimizer"]),
    "config quantization bits": lambda c: Case(["train", c.config(
        lambda r: r["model"].update(quantization={"bits": 3}))], 2, ["model.quantization.bits"]),
    "config bad regex": lambda c: Case(["train", c.config(lambda r: r["lora"].update(target_modules="q_proj("))], 2,
                                       ["lora.target_modules", "regular expression"]),
    "config catastrophic regex": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(target_modules="(a+)+$"))], 2, ["lora.target_modules", "repeats"]),
    "config exclude regex": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(exclude_modules="(x|xx)*y"))], 2, ["lora.exclude_modules"]),
    "config rank pattern regex": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(rank_pattern={"(q+)+": 4}))], 2, ["lora.rank_pattern"]),
    "config template attribute": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(prompt_template="{question.__class__}"))], 2, ["data.prompt_template", "not a field name"]),
    "config template positional": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(prompt_template="{0}"))], 2, ["data.prompt_template"]),
    "config template index": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(prompt_template="{question[0]}"))], 2, ["data.prompt_template"]),
    "config template brace": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(prompt_template="{question"))], 2, ["data.prompt_template"]),
    "config template conversion": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(prompt_template="Q: {question!r}"))], 2, ["data.prompt_template", "{question!r}"]),
    "config train missing": lambda c: Case(["train", c.config(lambda r: r["data"].update(train="nope.jsonl"))], 2,
                                           ["data.train", "no such file or directory", "nope.jsonl"]),
    "config validation missing": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(validation="./val/missing.jsonl"))], 2, ["data.validation", "no such file"]),
    "config train directory": lambda c: Case(["train", c.config(lambda r: r["data"].update(train=str(c.root)))], 2,
                                             ["data.train", "is a directory"]),
    "config model missing": lambda c: Case(["train", c.config(
        lambda r: r["model"].update(name_or_path="./no-model"))], 2, ["model.name_or_path", "no such file"]),
    "config model gguf missing": lambda c: Case(["train", c.config(
        lambda r: r["model"].update(name_or_path="weights.gguf"))], 2, ["model.name_or_path", "weights.gguf"]),
    "config model parent exists": lambda c: Case(["train", c.config(
        lambda r: r["model"].update(name_or_path="adapter/nothing"))], 2, ["no such file"]),
    "config file and schema problems together": lambda c: Case(["train", c.config(
        lambda r: (r["data"].update(train="gone.jsonl"), r["lora"].update(r=0)))], 2, ["lora.r", "gone.jsonl"]),
    "config full with lora": lambda c: Case(["train", c.config(lambda r: r.update(method="full"))], 2,
                                            ["method: full"]),
    "config full with quantization": lambda c: Case(["train", c.config(
        lambda r: (r.update(method="full"), r.pop("lora"), r["model"].update(quantization={"bits": 4})))], 2,
        ["model.quantization", "full fine-tuning"]),
    "config max_length beyond context": lambda c: Case(["train", c.config(
        lambda r: r["data"].update(max_length=100_000))], 2, ["data.max_length", "context of 256"]),
    "config plan max_length beyond context": lambda c: Case(["plan", c.config(
        lambda r: r["data"].update(max_length=100_000))], 2, ["data.max_length"]),
    "config layers missing": lambda c: Case(["train", c.config(lambda r: r["lora"].update(layers=[0, 9]))], 2,
                                            ["lora.layers [9]", "0-1"]),
    "config r too large": lambda c: Case(["train", c.config(lambda r: r["lora"].update(r=4096))], 2,
                                         ["larger than the dimensions"]),
    "config target typo": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(target_modules=["q_proj", "v_prj"]))], 2, ["'v_prj'", "q_proj"]),
    "config exclude everything": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(exclude_modules=["q_proj", "v_proj"]))], 2, ["matched no layer"]),
    "config paged optimizer on cpu": lambda c: Case(["train", c.config(
        lambda r: r["training"].update(optimizer="paged_adamw_8bit"))], 2, ["paged_adamw_8bit needs a CUDA GPU"]),
    "config init unknown": lambda c: Case(["train", c.config(lambda r: r["lora"].update(init="pisa"))], 2,
                                          ["lora.init", "pissa_niter_N"]),
    "config pissa with dora": lambda c: Case(["train", c.config(lambda r: r["lora"].update(init="pissa",
                                                                                         use_dora=True))], 2,
                                             ["lora", "use_dora", "pissa"]),
    "config pissa with 4-bit": lambda c: Case(["train", c.config(lambda r: (r["lora"].update(init="olora"), r[
        "model"].update(quantization={"bits": 4})))], 2, ["lora.init: olora", "quantized"]),
    "config dpo on supervised data": lambda c: Case(["train", c.config(lambda r: r["training"].update(
        objective="dpo"))], 2, ["training.objective: dpo", "data.format: preference"]),
    "config preference data with sft": lambda c: Case(["train", c.with_data(_PAIR, format="preference")], 2,
                                                      ["data.format: preference", "dpo or orpo"]),
    "config dpo section for orpo": lambda c: Case(["train", c.config(lambda r: (r["training"].update(
        objective="orpo"), r["data"].update(format="preference"), r.update(dpo={"beta": 0.2})))], 2,
        ["dpo: set", "objective is orpo"]),
    "config dpo unknown key": lambda c: Case(["train", c.config(lambda r: (r["training"].update(
        objective="dpo"), r["data"].update(format="preference"), r.update(dpo={"betta": 0.2})))], 2,
        ["dpo.betta", "did you mean dpo.beta"]),
    "config orpo lambda negative": lambda c: Case(["train", c.config(lambda r: (r["training"].update(
        objective="orpo"), r["data"].update(format="preference"), r.update(orpo={"lambda": -1})))], 2,
        ["orpo.lambda"]),
    "config preference packing": lambda c: Case(["train", c.config(lambda r: (r["training"].update(
        objective="dpo"), r["data"].update(format="preference", packing=True)))], 2, ["data.packing", "preference"]),
    "config dpo full": lambda c: Case(["train", c.config(lambda r: (r.pop("lora"), r.update(method="full"), r[
        "training"].update(objective="dpo"), r["data"].update(format="preference")))], 2, ["use method: lora"]),
    "config init_from missing": lambda c: Case(["train", c.config(lambda r: r.update(lora={
        "init_from": str(c.root / "nope")}))], 2, ["lora.init_from", "nope"]),
    "config init_from not an adapter": lambda c: Case(["train", c.config(lambda r: r.update(lora={
        "init_from": str(c.root)}))], 2, ["lora.init_from", "adapter_config.json"]),
    "config init_from with r": lambda c: Case(["train", c.config(lambda r: r["lora"].update(
        init_from=str(c.adapter)))], 2, ["lora.", "init_from sets the whole lora section"]),
    "config init_from another base": lambda c: Case(["train", c.config(lambda r: (r["model"].update(
        name_or_path=save_tiny_model(c.root / "wide", hidden=96)), r.update(lora={"init_from": str(c.adapter)})))],
        2, ["does not fit", "shape"]),
    "data pair without rejected": lambda c: Case(["train", c.with_pairs(
        _PAIR + '{"prompt": "2+2=", "chosen": "4"}\n')], 2,
        ["d.jsonl, line 2", "'rejected'"]),
    "data pair answer not assistant": lambda c: Case(["train", c.with_pairs(
        '{"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}\n')], 2, ["line 1", "'chosen'", "one assistant message"]),
    "data pair chat prompt without template": lambda c: Case(["train", c.with_pairs(
        '{"prompt": [{"role": "user", "content": "a"}], "chosen": "x", "rejected": "y"}\n')], 2, ["line 1", "chat_template: true"]),
    "config r is a boolean": lambda c: Case(["train", c.config(lambda r: r["lora"].update(r=True))], 2, ["lora.r"]),
    "config alpha infinite": lambda c: Case(["train", c.config(lambda r: r["lora"].update(alpha=float("inf")))], 2,
                                            ["lora.alpha", "finite"]),
    "config lr nan": lambda c: Case(["train", c.config(lambda r: r["training"].update(lr=float("nan")))], 2,
                                    ["training.lr"]),
    "config output_dir is a file": lambda c: Case(["train", c.config(
        lambda r: r["training"].update(output_dir=c.data("x", "out.txt")))], 2, ["training.output_dir", "is a file"]),
    "config modules_to_save also a target": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(modules_to_save=["q_proj"]))], 2,
        ["lora.target_modules", "q_proj", "modules_to_save", "trains whole"]),
    "config modules_to_save missing": lambda c: Case(["train", c.config(
        lambda r: r["lora"].update(modules_to_save=["score"]))], 2, ["modules_to_save entry 'score'"]),
    "config model is an adapter": lambda c: Case(["train", c.config(
        lambda r: r["model"].update(name_or_path=str(c.adapter)))], 2, ["is a LoRA adapter, not a model"]),
    "config model corrupt gguf": lambda c: Case(["train", c.config(
        lambda r: r["model"].update(name_or_path=c.data(b"GGUF garbage", "m.gguf")))], 2, ["m.gguf", "GGUF"]),
    "config chat template missing": lambda c: Case(["train", _no_chat_template(c)], 2,
                                                   ["data.chat_template", "has none"]),
    "config fp16 on cpu": lambda c: Case(["train", c.config(
        lambda r: r["training"].update(mixed_precision="fp16"))], 2, ["fp16 needs a CUDA GPU"]),
    "config compile with a 4-bit base on cpu": lambda c: Case(["train", c.config(
        lambda r: (r["training"].update(compile=True), r["model"].update(quantization={"bits": 4})))], 2,
        ["training.compile", "quantized CPU kernels"]),
    "set without equals": lambda c: Case(["train", c.config(), "--set", "lora.r"], 2, ["expected KEY=VALUE"]),
    "set invalid yaml": lambda c: Case(["train", c.config(), "--set", "lora.r=[1"], 2, ["not valid YAML"]),
    "set through a value": lambda c: Case(["train", c.config(), "--set", "lora.r.x=1"], 2, ["not a section"]),
    "set unknown key": lambda c: Case(["config", "show", c.config(), "--set", "lora.rank=4"], 2, ["lora.rank"]),
    "accelerate config missing": lambda c: Case(["train", c.config(), "--accelerate-config", "nope.yaml"], 2,
                                                ["nope.yaml"]),
    "accelerate config key twice": lambda c: Case(["train", c.config(), "--accelerate-config", c.data(
        "distributed_type: MULTI_CPU\nnum_processes: 2\nnum_processes: 1\n", "acc.yaml")], 2,
        ["--accelerate-config", "acc.yaml", "num_processes"]),
    "set value key twice": lambda c: Case(["config", "show", c.config(), "--set",
                                           "model.quantization={bits: 4, bits: 8}"], 2, ["--set", "'bits' is given twice"]),
    "grid value key twice": lambda c: Case(["sweep", c.config(), "--grid", "model.quantization={bits: 4, bits: 8}"], 2,
                                           ["--grid", "'bits' is given twice"]),
    "grid value broken": lambda c: Case(["sweep", c.config(), "--grid", "lora.r=[4"], 2, ["--grid", "not valid YAML"]),
    "grid over output_dir": lambda c: Case(["sweep", c.config(), "--grid", "training.output_dir=a,b"], 2,
                                           ["sets each point's output_dir itself"]),
    "grid value twice": lambda c: Case(["sweep", c.config(), "--grid", "lora.r=4,8,4"], 2, ["the value 4 is given twice"]),
    "grid key twice": lambda c: Case(["sweep", c.config(), "--grid", "lora.r=4", "--grid", "lora.r=8"], 2,
                                     ["lora.r is already a grid key"]),
    "config yaml yes as a learning rate": lambda c: Case(["train", c.config(lambda r: r["training"].update(lr=True))], 2,
                                                         ["training.lr", "not a boolean"]),
    "config true as max_length": lambda c: Case(["train", c.config(lambda r: r["data"].update(max_length=True))], 2,
                                                ["data.max_length", "not a boolean"]),
    "config false as dropout": lambda c: Case(["train", c.config(lambda r: r["lora"].update(dropout=False))], 2,
                                              ["lora.dropout", "not a boolean"]),
    "config on as an alpha pattern": lambda c: Case(["config", "show", c.config(text=(
        "data:\n  train: x.jsonl\ntraining:\n  max_steps: 1\nlora:\n  alpha_pattern:\n    q_proj: on\n"))], 2,
        ["lora.alpha_pattern.q_proj", "not a boolean"]),
    "config max_steps and epochs": lambda c: Case(["train", c.config(lambda r: r["training"].update(epochs=2))], 2,
                                                  ["training.max_steps (6) and training.epochs (2) are both set"]),
    "config rank_pattern matches nothing": lambda c: Case(["train", c.config(lambda r: r["lora"].update(
        rank_pattern={"q_projj": 8}))], 2, ["lora.rank_pattern", "'q_projj' matches none of the adapted layers"]),
    "config alpha_pattern matches nothing": lambda c: Case(["plan", c.config(lambda r: r["lora"].update(
        alpha_pattern={"up_proj": 8}))], 2, ["lora.alpha_pattern", "'up_proj' matches none"]),
    "config output_dir empty": lambda c: Case(["train", c.config(lambda r: r["training"].update(output_dir=""))], 2,
                                              ["training.output_dir"]),
    "config negative seed": lambda c: Case(["train", c.config(lambda r: r["training"].update(seed=-1))], 2,
                                           ["training.seed"]),
    "config answer in the prompt": lambda c: Case(["train", c.config(lambda r: r["data"].update(
        prompt_template="{question} = {answer}"))], 2, ["data", "prompt_template names {answer}"]),
    "config chosen answer in a preference prompt": lambda c: Case(["train", c.config(lambda r: (
        r["data"].update(format="preference", prompt_template="{prompt} {chosen}"),
        r["training"].update(objective="dpo")))], 2, ["prompt_template names {chosen}"]),
    "too many processes": lambda c: Case(["train", c.config(), "--num-processes", "999"], 2, ["CPU core(s)"]),
    "earlier run without resume": lambda c: (
        (c.root / "run" / "adapter").mkdir(parents=True),
        Case(["train", c.config()], 2, ["already holds a run", "--resume"]))[1],
    "resume and overwrite together": lambda c: Case(["train", c.config(), "--resume", "--overwrite"], 2,
                                                    ["--resume", "--overwrite", "choose one"]),
    "overwrite a run whose adapter holds the user's file": lambda c: _replace_foreign(c, "train adapter"),
    "overwrite a run whose checkpoints hold the user's file": lambda c: _replace_foreign(c, "train checkpoints"),
    "merge force onto the user's files": lambda c: _replace_foreign(c, "merge"),
    "export force onto the user's files": lambda c: _replace_foreign(c, "export"),
    "resume without checkpoint": lambda c: Case(["train", c.config(), "--resume"], 2, ["no complete checkpoint"]),
    # --- data ------------------------------------------------------------------------
    "data empty file": lambda c: Case(["data", "preview", c.with_data("")], 2, ["d.jsonl", "no rows"]),
    "data is a device": lambda c: Case(["data", "preview", c.config(lambda r: r["data"].update(train="/dev/zero"))],
                                       2, ["/dev/zero", "not a regular file"]),
    "data with a byte-order mark is fine": lambda c: Case(["data", "preview", c.with_data(
        "\ufeff" + '{"question": "1+1=", "answer": "2"}\n')], 0, ["1 rows"]),
    "data blank lines only": lambda c: Case(["data", "preview", c.with_data("\n\n  \n")], 2, ["no rows"]),
    "data malformed json line": lambda c: Case(["data", "preview", c.with_data(
        '{"question": "1+1=", "answer": "2"}\n\n{"question": oops}\n')], 2, ["d.jsonl, line 3", "not valid JSON"]),
    "data non-utf8": lambda c: Case(["data", "preview", c.with_data(
        b'{"question": "1", "answer": "2"}\n{"question": "\xff", "answer": "2"}\n')], 2, ["d.jsonl, line 2", "UTF-8"]),
    "data row not an object": lambda c: Case(["data", "preview", c.with_data('[1, 2]\n')], 2,
                                             ["line 1", "JSON object"]),
    "data missing field": lambda c: Case(["data", "preview", c.with_data(
        '{"question": "1+1="}\n')], 2, ["d.jsonl, line 1", "no field 'answer'", "question"]),
    "data field is an object": lambda c: Case(["data", "preview", c.with_data(
        '{"question": "1+1=", "answer": {"x": 1}}\n')], 2, ["line 1", "'answer'", "dict"]),
    "data template field missing": lambda c: Case(["data", "preview", c.with_data(
        '{"q": "1+1=", "answer": "2"}\n')], 2, ["line 1", "prompt_template uses field 'question'"]),
    "data json array non-object": lambda c: Case(["data", "preview", c.with_data('[{"question": "a", "answer": "b"}, 3]',
                                                                                "d.json")], 2, ["d.json, row 2"]),
    "data json array broken": lambda c: Case(["data", "preview", c.with_data('[{"question": "a",\n "answer": }]',
                                                                            "d.json")], 2, ["d.json, line 2"]),
    "data csv header only": lambda c: Case(["data", "preview", c.with_data("question,answer\n", "d.csv")], 2,
                                           ["d.csv", "no rows"]),
    "data csv missing column": lambda c: Case(["data", "preview", c.with_data("question\n1+1=\n", "d.csv")], 2,
                                              ["d.csv, row 1", "no field 'answer'"]),
    "data jsonl key twice": lambda c: Case(["data", "preview", c.with_data(
        '{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4", "answer": "5"}\n')], 2,
        ["d.jsonl, line 2", "'answer' is given twice"]),
    "data json array key twice": lambda c: Case(["data", "preview", c.with_data(
        '[{"question": "a", "answer": "b"},\n {"question": "c",\n  "question": "d", "answer": "e"}]', "d.json")], 2,
        ["d.json, line 2", "'question' is given twice"]),
    "data json key twice in messages": lambda c: Case(["data", "preview", c.with_data(
        '{"messages": [{"role": "user", "content": "hi", "content": "bye"}]}\n', format="chat")], 2,
        ["d.jsonl, line 1", "'content' is given twice"]),
    "data csv unquoted comma": lambda c: Case(["data", "preview", c.with_data(
        "question,answer\n1+1=,2\nadd 2, then 2,4\n", "d.csv")], 2, ["d.csv, row 2", "3 fields", "header has 2"]),
    "data csv short row": lambda c: Case(["data", "preview", c.with_data(
        "question,answer,note\n1+1=,2,x\n2+2=,4\n", "d.csv")], 2, ["d.csv, row 2", "2 fields", "header has 3"]),
    "data csv column twice": lambda c: Case(["data", "preview", c.with_data(
        "question,answer,answer\n1+1=,2,3\n", "d.csv")], 2, ["d.csv", "'answer' twice"]),
    "data parquet column twice": lambda c: Case(["data", "preview", _parquet_twice(c)], 2,
                                                ["d.parquet", "Multiple matches", "answer"]),
    "data parquet binary column": lambda c: Case(["data", "preview", _parquet_bytes(c)], 2,
                                                ["d.parquet, row 1", "'answer'", "bytes, not text"]),
    "data parquet garbage": lambda c: Case(["data", "preview", c.with_data(b"not parquet at all", "d.parquet")], 2,
                                           ["d.parquet", "parquet"]),
    "data unknown extension": lambda c: Case(["data", "preview", c.with_data("x", "d.txt")], 2,
                                             ["unknown data file type .txt"]),
    "data chat unknown role": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}) + "\n",
        format="chat")], 2, ["line 1", "message 2", "role 'bot'"]),
    "data chat missing content": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}) + "\n", format="chat")], 2,
        ["line 1", "message 1", "content"]),
    "data chat content parts": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": "yo"}]}) + "\n", format="chat")], 2,
        ["line 1", "message 1", "list of parts", "one string"]),
    "eval compare-base without an adapter": lambda c: Case(["eval", c.model, "--compare-base", "--data", c.data(
        '{"question": "1+1=", "answer": "2"}\n')], 2, ["--compare-base", "whole model"]),
    # A template that drops earlier assistant turns, as templates that strip earlier reasoning do.
    "data chat template that rewrites earlier turns": lambda c: Case(["data", "preview", _chat_template_case(
        c, "m.role != 'assistant' or loop.last", [("user", "1+1="), ("assistant", "2"), ("user", "2+2="),
                                                  ("assistant", "4")])], 2, ["line 1", "before message 3", "exactly"]),
    "data chat template that raises": lambda c: Case(["data", "preview", _chat_template_case(
        c, "m.role != 'system' or raise_exception('no system turns')", [("system", "Be brief."), ("user", "1+1="),
                                                                         ("assistant", "2")])], 2,
        ["line 1: the model's chat template cannot render these messages", "no system turns"]),
    "data chat template that drops a message": lambda c: Case(["data", "preview", _chat_template_case(
        c, "m.role != 'system'", [("system", "Be brief."), ("user", "1+1="), ("assistant", "2")])], 2,
        ["line 1", "leaves out message 1 (system)"]),
    "data chat no assistant": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": [{"role": "user", "content": "hi"}]}) + "\n", format="chat")], 2, ["no assistant message"]),
    "data chat not a list": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": "hello"}) + "\n", format="chat")], 2, ["'messages' list"]),
    "data chat turn not an object": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": ["hello"]}) + "\n", format="chat")], 2, ["message 1 is a str"]),
    "data alpaca missing instruction": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"output": "x"}) + "\n", format="alpaca")], 2, ["no field 'instruction'"]),
    "data text field missing": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"body": "x"}) + "\n", format="text")], 2, ["no field 'text'"]),
    "data nothing trainable": lambda c: Case(["train", c.config(lambda r: r["data"].update(max_length=1))], 2,
                                             ["no usable example"]),
    "data fewer than a batch": lambda c: Case(["train", c.with_data(
        '{"question": "1+1=", "answer": "2"}\n')], 2, ["fewer than one batch"]),
    "data fewer than an accumulated batch": lambda c: Case(["train", c.with_data(
        '{"question": "1+1=", "answer": "2"}\n' * 4), "--set", "training.grad_accum=2"], 2,
        ["4 usable examples", "fewer than one batch", "4 × 2 accumulation"]),
    "data bad validation file": lambda c: Case(["train", c.config(lambda r: r["data"].update(
        validation=c.data('{"question": 1}\n', "v.jsonl")))], 2, ["v.jsonl, line 1", "no field 'answer'"]),
    "eval prompt beyond the context": lambda c: Case(["eval", str(c.adapter), "--data", c.data(json.dumps(
        {"question": "1+" * 200, "answer": "2"}) + "\n", "e.jsonl")], 2, ["e.jsonl, line 1: 400 prompt tokens",
                                                                         "context of 256 tokens"]),
    "generate prompt beyond the context": lambda c: Case(["generate", str(c.adapter), "-p", "x" * 200], 2,
                                                         ["generate: 200 prompt tokens", "--max-new-tokens 128"]),
    "config lone surrogate": lambda c: Case(["train", c.config(text=yaml.safe_dump(tiny_config(c.root, c.model)).replace(
        "prompt_template: '{question}'", 'prompt_template: "\\ud800{question}"'))], 2,
        ["data.prompt_template", "lone surrogate"]),
    "data json nested too deeply": lambda c: Case(["data", "preview", c.with_data(
        '{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "2"}\n')], 2, ["d.jsonl, line 1",
                                                                                    "nested too deeply"]),
    "data chat starts with the assistant": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"messages": [{"role": "assistant", "content": "hi"}]}) + "\n", format="chat")], 2,
        ["line 1", "message 1 is the assistant's"]),
    "data alpaca input a list": lambda c: Case(["data", "preview", c.with_data(json.dumps(
        {"instruction": "add", "input": ["1", "2"], "output": "3"}) + "\n", format="alpaca")], 2,
        ["line 1", "field 'input' holds a list"]),
    "data json lone surrogate": lambda c: Case(["data", "preview", c.with_data(
        '{"question": "1+1=\\ud800", "answer": "2"}\n')], 2, ["d.jsonl, line 1", "lone surrogate"]),
    "generate prompt bytes not utf-8": lambda c: Case(["generate", str(c.adapter), "-p", "x\udcff"], 2,
                                                      ["generate:", "lone surrogate"]),
    "eval data empty": lambda c: Case(["eval", str(c.adapter), "--data", c.data("", "e.jsonl")], 2, ["e.jsonl", "no rows"]),
    "eval data malformed": lambda c: Case(["eval", str(c.adapter), "--data", c.data('{"a": \n', "e.jsonl")], 2,
                                          ["e.jsonl, line 1"]),
    "eval data missing": lambda c: Case(["eval", str(c.adapter), "--data", "./none.jsonl"], 2, ["none.jsonl"]),
    "eval data lacks reference": lambda c: Case(["eval", str(c.adapter), "--data", c.data(
        '{"question": "1+1="}\n', "e.jsonl")], 2, ["e.jsonl, line 1", "answer"]),
    # --- paths -----------------------------------------------------------------------
    "eval output replaces its data": lambda c: _eval_onto_data(c, "out/predictions.jsonl"),
    "eval output inside its data": lambda c: _eval_onto_data(c, "out/metrics.json/rows.jsonl"),
    "eval a run directory": lambda c: Case(["eval", str(c.root), "--data", c.data(
        '{"question": "1", "answer": "2"}\n', "e.jsonl")], 2, ["run or checkpoint directory", "adapter"]),
    "eval output is a file": lambda c: Case(["eval", str(c.adapter), "--output", c.data("x", "out.txt")], 2,
                                            ["--output", "is a file"]),
    "eval dot path": lambda c: Case(["eval", "./nothing-here"], 2, ["no such file or directory", "nothing-here"]),
    "eval parent path": lambda c: Case(["eval", "../nothing-here"], 2, ["no such file or directory"]),
    "eval absolute path": lambda c: Case(["eval", str(c.root / "gone")], 2, ["no such file or directory"]),
    "eval gguf name": lambda c: Case(["eval", "model.gguf"], 2, ["no such file or directory", "model.gguf"]),
    "generate missing": lambda c: Case(["generate", "./gone", "--prompt", "x"], 2, ["no such file or directory"]),
    "targets missing": lambda c: Case(["targets", "./gone"], 2, ["no such file or directory"]),
    "targets bad spec": lambda c: Case(["targets", c.model, "-t", "(a+)+$"], 2, ["repeats"]),
    "inspect missing": lambda c: Case(["inspect", str(c.root / "gone")], 2, ["no such adapter directory"]),
    "inspect not an adapter": lambda c: Case(["inspect", str(c.root)], 2, ["no adapter_config.json"]),
    "inspect plot nowhere": lambda c: Case(["inspect", str(c.adapter), "--plot", "/nonexistent/p.png"], 2,
                                           ["--plot", "does not exist"]),
    "inspect plot onto the adapter": lambda c: Case(["inspect", str(c.adapter), "--plot",
                                                     str(c.adapter / "adapter_model.safetensors")], 2,
                                                    ["--plot", "name a .png"],
                                                    intact=[c.adapter / "adapter_model.safetensors"]),
    "train output_dir cannot be created": lambda c: Case(["train", c.config(
        lambda r: r["training"].update(output_dir="/proc/lorakit-run"))], 2, ["training.output_dir", "cannot"]),
    "train output_dir replaces the init_from adapter": lambda c: Case(["train", c.config(lambda r: (
        r.update(lora={"init_from": str(c.adapter)}), r["training"].update(output_dir=str(c.adapter.parent)))),
        "--overwrite"], 2, ["training.output_dir", "lora.init_from", "choose another training.output_dir"],
        intact=[c.adapter / "adapter_model.safetensors"]),
    "train output_dir replaces the base model": lambda c: _base_in_run(c),
    "inspect base missing": lambda c: Case(["inspect", str(c.adapter), "--base", "./gone"], 2, ["no such file"]),
    "merge missing adapter": lambda c: Case(["merge", str(c.root / "gone"), "-o", str(c.root / "m")], 2,
                                            ["no such adapter directory"]),
    "merge into the adapter": lambda c: _merge_into(c, "itself"),
    "merge into the run": lambda c: _merge_into(c, "run"),
    "merge inside the adapter": lambda c: _merge_into(c, "inside"),
    "merge output is a file": lambda c: Case(["merge", str(c.adapter), "-o", c.data("x", "file.txt")], 2,
                                             ["is a file"]),
    "merge output not empty": lambda c: (c.data("x", "out/x"), Case(
        ["merge", str(c.adapter), "-o", str(c.root / "out")], 2, ["not empty", "--force"]))[1]
        if (c.root / "out").mkdir() is None else None,
    "merge the same adapter twice": lambda c: Case(["merge", str(c.adapter), str(c.root / "adapter" / ".." / "adapter"),
                                                    "-o", str(c.root / "m")], 2, ["given twice", "--weights"]),
    "merge weights text": lambda c: Case(["merge", str(c.adapter), "-o", str(c.root / "m"), "--weights", "a"], 2,
                                         ["--weights"]),
    "merge weights count": lambda c: Case(["merge", str(c.adapter), "-o", str(c.root / "m"), "--weights", "1,2"], 2,
                                          ["2 values for 1 adapters"]),
    "merge weights nan": lambda c: Case(["merge", str(c.adapter), "-o", str(c.root / "m"), "--weights", "nan"], 2,
                                        ["finite"]),
    "merge dtype": lambda c: Case(["merge", str(c.adapter), "-o", str(c.root / "m"), "--dtype", "int8"], 2, ["int8"]),
    "merge into": lambda c: Case(["merge", str(c.adapter), "-o", str(c.root / "m"), "--into", "nf4"], 2, ["nf4"]),
    "eval metric": lambda c: Case(["eval", str(c.adapter), "--metric", "rogue"], 2, ["rogue"]),
    "generate adapter syntax": lambda c: Case(["generate", str(c.adapter), "--adapter", "nodir", "-p", "x"], 2,
                                              ["NAME=DIR"]),
    "generate unknown use": lambda c: Case(["generate", str(c.adapter), "--use", "other", "-p", "x"], 2,
                                           ["no adapter named 'other'"]),
    "generate bad extra adapter": lambda c: Case(["generate", str(c.adapter), "--adapter", f"b={c.root}", "-p", "x"],
                                                 2, ["no adapter_config.json"]),
    "generate :use unknown keeps going": lambda c: Case(
        ["generate", str(c.adapter), "--max-new-tokens", "2"], 0, ["no adapter named 'nope'"],
        stdin="1+1=\n:use nope\n2+2=\n"),
    "markup in a path": lambda c: Case(["train", str(c.root / "[/x]" / "c.yaml")], 2, ["[/x]"]),
    "markup red in a path": lambda c: Case(["eval", "./[red]gone"], 2, ["[red]gone"]),
    "markup in data": lambda c: Case(["data", "preview", c.with_data('{"[/b]": "x"}\n')], 2, ["(it has [/b])"]),
    # --- adapters ----------------------------------------------------------------------
    "adapter config invalid json": lambda c: (
        (c.adapter / "adapter_config.json").write_text("{not json"),
        Case(["inspect", str(c.adapter)], 2, ["adapter_config.json", "not valid JSON"]))[1],
    "adapter config a list": lambda c: (
        (c.adapter / "adapter_config.json").write_text("[1, 2]"),
        Case(["eval", str(c.adapter)], 2, ["expected a JSON object"]))[1],
    "adapter not lora": lambda c: Case(["inspect", c.peft(peft_type="IA3")], 2, ["peft_type is 'IA3'"]),
    "adapter for a classifier": lambda c: Case(["eval", c.peft(task_type="SEQ_CLS"), "--limit", "1"], 2,
                                               ["task_type SEQ_CLS", "sequence classifier"]),
    # PEFT reads JSON values as Python does: "false" would be true there, "8" an error.
    "adapter boolean as text": lambda c: Case(["eval", c.peft(use_rslora="false"), "--limit", "1"], 2,
                                              ["use_rslora: 'false' is not a JSON true/false"]),
    "adapter alpha as text": lambda c: Case(["merge", c.peft(lora_alpha="8"), "-o", str(c.root / "m")], 2,
                                            ["lora_alpha: '8' is not a JSON number"]),
    "adapter rank_pattern value as text": lambda c: Case(["inspect", c.peft(rank_pattern={"q_proj": "4"})], 2,
                                                         ["rank_pattern: 'q_proj': '4' is not a JSON number"]),
    "adapter dora without magnitudes": lambda c: Case(["merge", c.peft(use_dora=True), "-o", str(c.root / "m")], 2,
                                                      ["does not fit", "lora_magnitude_vector"]),
    "adapter magnitudes without dora": lambda c: Case(["eval", c.tensors(lambda s: s.__setitem__(
        c.first("lora_A.weight").replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(64)))], 2,
        ["DoRA magnitudes", "use_dora"]),
    "adapter pissa at half weight": lambda c: Case(["merge", c.peft(init_lora_weights="pissa"), "-o",
                                                    str(c.root / "m"), "--weights", "0.5"], 2,
                                                   ["pissa/olora", "at weight 1", "path_initial_model_for_weight_conversion"]),
    "adapter olora to gguf": lambda c: Case(["export", c.peft(init_lora_weights="olora"), "--to", "gguf"], 2,
                                            ["without conversion", "'olora'", "--merged"]),
    "adapter pissa niter": lambda c: Case(["eval", c.peft(init_lora_weights="pissa_niter_4")], 2, ["pissa_niter_4"]),
    "adapter corda": lambda c: Case(["inspect", c.peft(init_lora_weights="corda")], 2, ["corda"]),
    "adapter loftq": lambda c: Case(["inspect", c.peft(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})], 2,
                                    ["loftq"]),
    "adapter unknown init": lambda c: Case(["inspect", c.peft(init_lora_weights="orthogonal")], 2, ["orthogonal"]),
    "adapter alora": lambda c: Case(["eval", c.peft(alora_invocation_tokens=[1, 2])], 2, ["alora_invocation_tokens"]),
    "adapter lora bias": lambda c: Case(["inspect", c.peft(lora_bias=True)], 2, ["lora_bias"]),
    "adapter target parameters": lambda c: Case(["inspect", c.peft(target_parameters=["w"])], 2, ["target_parameters"]),
    "adapter trainable tokens": lambda c: Case(["inspect", c.peft(trainable_token_indices=[1])], 2,
                                               ["trainable_token_indices"]),
    "adapter layer replication": lambda c: Case(["inspect", c.peft(layer_replication=[[0, 1]])], 2,
                                                ["layer_replication"]),
    "adapter qalora": lambda c: Case(["inspect", c.peft(use_qalora=True)], 2, ["use_qalora"]),
    "adapter future key": lambda c: Case(["inspect", c.peft(use_hyperlora={"depth": 2})], 2,
                                         ["use_hyperlora", "unknown to lorakit"]),
    "adapter duplicate json key": lambda c: (
        (c.adapter / "adapter_config.json").write_text(
            (c.adapter / "adapter_config.json").read_text().replace('"lora_alpha"', '"lora_alpha": 64, "lora_alpha"', 1)),
        Case(["inspect", str(c.adapter)], 2, ["'lora_alpha' is given twice"]))[1],
    "adapter alpha infinite": lambda c: (
        (c.adapter / "adapter_config.json").write_text(
            (c.adapter / "adapter_config.json").read_text().replace('"lora_alpha": 8.0', '"lora_alpha": Infinity', 1)),
        Case(["inspect", str(c.adapter)], 2, ["lora_alpha", "finite"]))[1],
    "adapter r boolean": lambda c: Case(["inspect", c.peft(r=True)], 2, ["r:"]),
    "adapter config is a directory": lambda c: (
        (c.adapter / "adapter_config.json").unlink(), (c.adapter / "adapter_config.json").mkdir(),
        Case(["inspect", str(c.adapter)], 2, ["no adapter_config.json"]))[2],
    "adapter no targets": lambda c: Case(["inspect", c.peft(target_modules=None)], 2, ["no target_modules"]),
    "adapter r text": lambda c: Case(["inspect", c.peft(r="eight")], 2, ["r:"]),
    "adapter r zero": lambda c: Case(["inspect", c.peft(r=0)], 2, ["r:"]),
    "adapter alpha negative": lambda c: Case(["inspect", c.peft(lora_alpha=-4)], 2, ["lora_alpha"]),
    "adapter bias kind": lambda c: Case(["inspect", c.peft(bias="some")], 2, ["bias"]),
    "adapter catastrophic rank pattern": lambda c: Case(["inspect", c.peft(rank_pattern={"(a|aa)+$": 2})], 2,
                                                        ["rank_pattern", "repeats"]),
    "adapter catastrophic target regex": lambda c: Case(["eval", c.peft(target_modules="(.*)*q_proj")], 2,
                                                        ["target_modules", "repeats"]),
    "base tokenizer past the embedding": lambda c: _tokenizer_past_embedding(c, "train"),
    "base tokenizer past the embedding eval": lambda c: _tokenizer_past_embedding(c, "eval"),
    "base tokenizer past the embedding generate": lambda c: _tokenizer_past_embedding(c, "generate"),
    "base pad token past the embedding": _pad_past_embedding,
    "base model pickle only": lambda c: _pickled_base(c, []),
    "base model pickle only merge": lambda c: _pickled_base(c, ["merge", str(c.adapter), "-o", str(c.root / "m")]),
    "base model pickle only eval": lambda c: _pickled_base(c, ["eval", str(c.adapter), "--limit", "1"]),
    "adapter pickle only": _pickle_only,
    "adapter pickle only eval": _pickle_only_eval,
    "adapter truncated weights": lambda c: (
        (c.adapter / "adapter_model.safetensors").write_bytes(
            (c.adapter / "adapter_model.safetensors").read_bytes()[:200]),
        Case(["inspect", str(c.adapter)], 2, ["adapter_model.safetensors", "truncated or corrupt"]))[1],
    "adapter weights garbage": lambda c: (
        (c.adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
        Case(["merge", str(c.adapter), "-o", str(c.root / "m")], 2, ["truncated or corrupt"]))[1],
    "adapter nan inspect": lambda c: Case(["inspect", _nan(c)], 2, ["NaN"]),
    "adapter nan eval": lambda c: Case(["eval", _nan(c), "--limit", "1"], 2, ["NaN"]),
    "adapter nan generate": lambda c: Case(["generate", _nan(c), "-p", "x"], 2, ["NaN"]),
    "adapter nan merge": lambda c: Case(["merge", _nan(c), "-o", str(c.root / "m")], 2, ["NaN"]),
    "adapter inf": lambda c: Case(["inspect", c.tensors(lambda s: s.__setitem__(
        next(iter(s)), torch.full_like(next(iter(s.values())), float("inf"))))], 2, ["infinite"]),
    "adapter integer tensor": lambda c: Case(["inspect", c.tensors(lambda s: s.__setitem__(
        next(iter(s)), next(iter(s.values())).to(torch.int32)))], 2, ["int32", "floating point"]),
    "adapter wrong shape": lambda c: Case(["eval", c.tensors(lambda s: s.__setitem__(
        c.first("lora_A.weight"), torch.zeros(4, 16)))], 2, ["does not fit", "has shape (4, 16)"]),
    "adapter extra tensor": lambda c: Case(["eval", c.tensors(lambda s: s.__setitem__(
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)))], 2,
        ["does not fit", "up_proj"]),
    "adapter missing tensor": lambda c: Case(["eval", c.tensors(lambda s: s.pop(c.first("lora_B.weight")))], 2,
                                             ["does not fit", "no tensor for"]),
    "adapter for another base": lambda c: Case(["eval", str(c.adapter), "--base", save_tiny_model(
        c.root / "wide", hidden=96)], 2, ["does not fit", "the model needs"]),
    "adapter for another base of the same shapes": lambda c: _same_shapes_other_base(c, "eval"),
    "adapter for another base of the same shapes merge": lambda c: _same_shapes_other_base(c, "merge"),
    "adapter inspect against another base": lambda c: Case(["inspect", str(c.adapter), "--base", save_tiny_model(
        c.root / "wide", hidden=96)], 2, ["does not fit"]),
    "adapter saved config python tag": lambda c: (
        (c.adapter / SAVED_CONFIG).write_text(f"!!python/object/apply:pathlib.Path.touch [{str(c.root / MARKER)!r}]\n"),
        Case(["eval", str(c.adapter)], 2, [SAVED_CONFIG, "not valid YAML"], absent=[c.root / MARKER]))[1],
    "adapter saved template attribute": lambda c: (
        (c.adapter / SAVED_CONFIG).write_text(yaml.safe_dump({**yaml.safe_load((c.adapter / SAVED_CONFIG).read_text()),
            "data": {"train": "x.jsonl", "prompt_template": "{question.__init__.__globals__}"}})),
        Case(["eval", str(c.adapter)], 2, [SAVED_CONFIG, "not a field name"]))[1],
    "export missing adapter": lambda c: Case(["export", str(c.root / "gone"), "--to", "gguf"], 2, ["gone"]),
    "export unknown target": lambda c: Case(["export", str(c.adapter), "--to", "onnx"], 2, ["onnx"]),
    "export into the adapter": lambda c: Case(["export", str(c.adapter), "--to", "gguf", "-o", str(c.adapter)], 2,
                                              ["destroy"], intact=[c.adapter / "adapter_model.safetensors"]),
    "export output is a file": lambda c: Case(["export", str(c.adapter), "--to", "vllm", "-o",
                                               c.data("x", "file.txt")], 2, ["is a file"]),
    "export output not empty": lambda c: ((c.root / "out").mkdir(), c.data("x", "out/x"), Case(
        ["export", str(c.adapter), "--to", "gguf", "-o", str(c.root / "out")], 2, ["not empty", "--force"],
        intact=[c.root / "out" / "x"]))[2],
    "export for another base": lambda c: Case(["export", str(c.adapter), "--to", "gguf", "--base", save_tiny_model(
        c.root / "wide", hidden=96)], 2, ["does not fit"]),
    "export nan": lambda c: Case(["export", _nan(c), "--to", "gguf"], 2, ["NaN"]),
    "export dora to vllm": lambda c: Case(["export", c.peft(use_dora=True), "--to", "vllm"], 2, ["DoRA", "--to merged"]),
    "export dora to gguf": lambda c: Case(["export", c.peft(use_dora=True), "--to", "gguf"], 2, ["DoRA", "--merged"]),
    "export merged to vllm": lambda c: Case(["export", str(c.adapter), "--to", "vllm", "--merged"], 2,
                                            ["--merged applies to"]),
    "export merged without a gguf base": lambda c: Case(["export", str(c.adapter), "--to", "gguf", "--merged"], 2,
                                                        ["tokenizer", "GGUF"]),
    "export ollama without a gguf base": lambda c: Case(["export", str(c.adapter), "--to", "ollama"], 2,
                                                        ["Ollama needs", "GGUF"]),
    "export outtype": lambda c: Case(["export", str(c.adapter), "--to", "gguf", "--merged", "--outtype", "q4_k"],
                                     2, ["q4_k"]),
    "adapter remote code ignored": lambda c: _remote_code(c, base_flag=False),
    "adapter remote code ignored with base": lambda c: _remote_code(c, base_flag=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_model_dir, good_adapter, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(good_adapter, tmp_path / "adapter")
    ctx = Ctx(tmp_path, tiny_model_dir, tmp_path / "adapter")
    case = CASES[name](ctx)
    before = {p: p.read_bytes() for p in case.intact}
    result = runner.invoke(app, case.args, input=case.stdin)
    output = result.output
    assert result.exit_code == case.code, f"{name}: exit {result.exit_code}\n{output}"
    for text in case.says:
        assert text in output, f"{name}: {text!r} not in\n{output}"
    assert "Traceback" not in output and "unexpected" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for path in case.absent:
        assert not path.exists(), f"{name}: {path} was written: planted code ran"
    for path, data in before.items():
        assert path.is_file() and path.read_bytes() == data, f"{name}: {path} was changed or deleted"


def test_there_are_at_least_a_hundred_cases():
    assert len(CASES) >= 100


def test_any_base_loads_an_adapter_on_another_base_with_a_warning(tmp_path, tiny_model_dir, good_adapter):
    """The refusal above has a way through for the deliberate case: --any-base."""
    shutil.copytree(good_adapter, tmp_path / "adapter")
    case = _same_shapes_other_base(Ctx(tmp_path, tiny_model_dir, tmp_path / "adapter"), "merge")
    result = runner.invoke(app, [*case.args, "--any-base"])
    assert result.exit_code == 0, result.output
    assert "trained on another base" in result.output and "loaded anyway: --any-base" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
