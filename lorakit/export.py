"""``lorakit export``: a trained adapter in the form each serving engine runs.

- ``gguf``: a llama.cpp LoRA adapter (``llama-cli --lora``), or with ``merged`` the
  merged model as one GGUF file;
- ``ollama``: the same plus a ``Modelfile`` whose template renders prompts as training did;
- ``vllm`` / ``sglang``: the PEFT adapter checked against the engine's rules, with what
  it cannot read folded into an engine-ready copy;
- ``merged``: ``lorakit merge``'s verified transformers checkpoint.

Every target either reproduces lorakit's adapter-on-base model or is refused with the
reason and the alternative; nothing is exported approximately.
"""

from __future__ import annotations

import json
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapter_io import PREFIX, WEIGHTS_NAME, Adapter, adapter_problems, read_adapter
from lorakit.config import DEFAULT_MODEL, read_saved_config
from lorakit.errors import InputError, LoraError
from lorakit.files import MANIFEST, atomic_directory, check_output_dir
from lorakit.inject import pattern_value, plan_injection
from lorakit.lora import scaling
from lorakit.peft_config import CONFIG_NAME

TARGETS = ("gguf", "ollama", "vllm", "sglang", "merged")
# The projections vLLM and SGLang adapt in decoder models (attention and MLP); both refuse
# DoRA and trained full modules (vllm/lora/peft_helper.py; SGLang's LoRA docs).
ENGINE_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj"}
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank accepts these


@dataclass
class ExportReport:
    """What was written, how to serve it, and what the user should know."""

    target: str
    output: Path
    files: list[str]
    command: str
    notes: list[str] = field(default_factory=list)


def base_gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file the base model came from, when it came from one."""
    from lorakit.model import default_gguf

    if name_or_path == DEFAULT_MODEL:
        return default_gguf()
    path = Path(name_or_path).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None


def _layers(adapter: Adapter, tree) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A, B, scale)`` per adapted module, checked against the base's structure."""
    problems = adapter_problems(tree, adapter)
    if problems:
        raise LoraError(f"{adapter.path} does not fit {type(tree).__name__}: {problems[0]}")
    config = adapter.config
    return {name: (adapter.tensors[f"{PREFIX}{name}.lora_A.weight"], adapter.tensors[f"{PREFIX}{name}.lora_B.weight"],
                   scaling(t.r, t.alpha, config.use_rslora))
            for name, t in plan_injection(tree, config, strict=False).items()}


def _no_extras(adapter: Adapter, engine: str) -> None:
    """Refuse what ``engine``'s adapters cannot carry: a changed base, DoRA, trained whole modules and biases."""
    config = adapter.config
    if config.changes_base:
        raise LoraError(f"{adapter.path} was saved by PEFT without conversion (init_lora_weights={config.init!r}): "
                        f"it is right only on a base with its principal part taken out, which {engine} does not "
                        "build; export the merged model instead (--merged or --to merged)")
    if config.use_dora:
        raise LoraError(f"{adapter.path} is a DoRA adapter, which {engine} cannot apply (its magnitudes rescale "
                        "the whole weight); export the merged model instead (--merged or --to merged)")
    if config.modules_to_save:
        raise LoraError(f"{adapter.path} also trains whole modules ({', '.join(config.modules_to_save)}), which "
                        f"{engine} adapters cannot carry; export the merged model instead (--merged or --to merged)")
    if config.bias != "none":
        raise LoraError(f"{adapter.path} also trains biases (bias: {config.bias}), which {engine} adapters cannot "
                        "carry; export the merged model instead (--merged or --to merged)")


def _merged_state(adapter_dir: Path, base: str | None, trust_remote_code: bool, into: str):
    """The verified merged model's tensors and config (``lorakit merge`` into a scratch directory)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lorakit.merge import merge_adapters

    with tempfile.TemporaryDirectory(prefix="lorakit-export-") as scratch:
        merged = Path(scratch) / "merged"
        merge_adapters([adapter_dir], merged, base, "float32", into, trust_remote_code=trust_remote_code)
        state = {}
        for file in sorted(merged.glob("*.safetensors")):
            state.update(load_file(file))
        return state, AutoConfig.from_pretrained(merged)


def _gguf_files(adapter: Adapter, out: Path, merged: bool, outtype: str, base: str | None,
                trust_remote_code: bool, into: str) -> tuple[str, Path | None, list[str]]:
    """Write the GGUF file into ``out``; return its name, the base GGUF and notes."""
    from lorakit import gguf_export
    from lorakit.model import adapter_base_config
    from lorakit.targets import skeleton

    adapter_dir = adapter.path
    model_cfg = adapter_base_config(adapter_dir, base, trust_remote_code)
    base_file = base_gguf_file(model_cfg.name_or_path)
    tree = skeleton(model_cfg.name_or_path, trust_remote_code)
    gguf_export.architecture(tree.config)
    if merged:
        if base_file is None:
            raise InputError(f"a merged GGUF takes its tokenizer from the base's GGUF file, and the base "
                             f"{model_cfg.name_or_path} is not one: use `lorakit export --to merged`, then "
                             "llama.cpp's convert_hf_to_gguf.py on that directory")
        state, hf_config = _merged_state(adapter_dir, base, trust_remote_code, into)
        name = f"model-{outtype}.gguf"
        gguf_export.write_model(out / name, state, hf_config, outtype, gguf_export.tokenizer_metadata(base_file))
        return name, None, []
    _no_extras(adapter, "llama.cpp")
    layers = _layers(adapter, tree)
    untied = [n for n in layers if n == "lm_head" and getattr(tree.config, "tie_word_embeddings", False)]
    if untied:
        raise LoraError(f"{adapter.path} adapts lm_head, which this base ties to its embeddings; llama.cpp "
                        "adapters cannot untie it: export the merged model instead (--merged)")
    gguf_export.write_adapter(out / "adapter.gguf", layers, adapter.config.alpha, tree.config)
    notes = []
    if any(abs(s - adapter.config.alpha / a.shape[0]) > 1e-12 * s for a, _, s in layers.values()):
        notes.append("per-layer scales (rsLoRA or rank/alpha patterns) are folded into lora_b, so llama.cpp's "
                     "single alpha gives each layer its own scale")
    return "adapter.gguf", base_file, notes


def _chat_template(adapter_dir: Path, base: str | None, trust_remote_code: bool) -> tuple[str, list[str]]:
    """The prompt template in Ollama's syntax (training's rendering of one user prompt) and the stop strings."""
    from lorakit.evaluation import generation_prompt
    from lorakit.generation import stop_ids
    from lorakit.model import adapter_base_config, load_tokenizer

    tokenizer = load_tokenizer(adapter_base_config(adapter_dir, base, trust_remote_code))
    saved = read_saved_config(adapter_dir)
    sentinel = "\x00PROMPT\x00"
    rendered = generation_prompt(sentinel, saved.data if saved else None, tokenizer)
    go_safe = rendered.replace("{{", '{{ "{{" }}')
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids(tokenizer)]
    return go_safe.replace(sentinel, "{{ .Prompt }}"), stops


def _modelfile(from_: str, adapter: str | None, template: str, stops: list[str]) -> str:
    """Ollama's Modelfile; refused where its quoting cannot hold the template or a stop string."""
    if '"""' in template:
        raise InputError('the prompt template contains """, which an Ollama Modelfile cannot quote')
    bad = [s for s in stops if '"' in s or "\n" in s]
    if bad:
        raise InputError(f"the stop string {bad[0]!r} cannot be written in an Ollama Modelfile")
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")  # greedy, as lorakit eval and generate decode
    return "\n".join(lines) + "\n"


def _engine_copy(adapter: Adapter, engine: str, out: Path) -> tuple[int, list[str]]:
    """Check ``adapter`` against vLLM's/SGLang's rules and write a copy they read exactly.

    Both engines scale every layer by the config's one ``lora_alpha / r`` (``√r`` with
    rsLoRA); per-layer scales are folded into each ``lora_B`` and the copy's scale set to 1.
    """
    from safetensors.torch import save_file

    config = adapter.config
    _no_extras(adapter, engine)
    leaves = {k.removeprefix(PREFIX).rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in adapter.tensors}
    unsupported = sorted(leaves - ENGINE_MODULES)
    if unsupported:
        raise LoraError(f"{adapter.path} adapts {', '.join(unsupported)}; {engine} serves LoRA on attention and MLP "
                        f"projections only ({', '.join(sorted(ENGINE_MODULES))}): export the merged model instead")
    peft = json.loads((adapter.path / CONFIG_NAME).read_text(encoding="utf-8"))
    tensors, ranks, notes = {}, {}, []
    for key, tensor in adapter.tensors.items():
        name = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        if ".lora_A." in key:
            ranks[name] = tensor.shape[0]
        tensors[key] = tensor.contiguous()
    for name, rank in ranks.items():
        r = int(pattern_value(config.rank_pattern, name, config.r))
        alpha = float(pattern_value(config.alpha_pattern, name, config.alpha))
        scale = scaling(r, alpha, config.use_rslora)
        key = f"{PREFIX}{name}.lora_B.weight"
        tensors[key] = (tensors[key].double() * scale).to(tensors[key].dtype)
    if config.use_rslora or config.alpha_pattern or config.rank_pattern or config.alpha != config.r:
        notes.append("each layer's scale is folded into its lora_B; the copy's lora_alpha equals r (scale 1)")
    peft.update(lora_alpha=config.r, use_rslora=False, alpha_pattern={k: v for k, v in (config.rank_pattern or {}).items()})
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(peft, indent=2))
    return max(ranks.values()), notes


def export(adapter_dir: str | Path, to: str, output: Path | None = None, merged: bool = False,
           outtype: str = "f16", base: str | None = None, force: bool = False,
           trust_remote_code: bool = False, into: str = "dequantized", name: str | None = None) -> ExportReport:
    """Export the adapter in ``adapter_dir`` for serving engine ``to`` (one of ``TARGETS``).

    Args:
        output: the directory to write (default: ``export-<to>`` beside the adapter); it
            must be empty or absent unless ``force``.
        merged: for ``gguf``/``ollama``, the merged model instead of an adapter.
        outtype: the merged GGUF's matrix type (``f32``, ``f16``, ``bf16``, ``q8_0``).
        base: the base model, when not the one the adapter was trained on.
        into: for QLoRA adapters merged, as in ``lorakit merge``.
        name: the model name in the printed serve command (default: the adapter's run name).

    Raises:
        InputError: bad arguments, or an adapter the target cannot serve exactly (with the alternative).
    """
    from lorakit.gguf_export import OUTTYPES

    adapter_dir = Path(adapter_dir)
    if to not in TARGETS:
        raise InputError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    if merged and to not in ("gguf", "ollama"):
        raise InputError(f"--merged applies to --to gguf and --to ollama; --to {to} "
                         + ("is the merged checkpoint already" if to == "merged" else "serves the adapter itself"))
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    adapter = read_adapter(adapter_dir)  # checked whole before anything is written
    output = Path(output) if output else adapter_dir.resolve().parent / f"export-{to}"
    check_output_dir(output, [adapter_dir, *([base] if base else [])], force)
    name = name or adapter_dir.resolve().parent.name
    if to == "merged":
        from lorakit.merge import merge_adapters

        merge_adapters([adapter_dir], output, base, "float32", into, force=force, trust_remote_code=trust_remote_code)
        return ExportReport(to, output, sorted(p.name for p in output.iterdir() if p.name != MANIFEST),
                            f"python -c \"from transformers import AutoModelForCausalLM; "
                            f"AutoModelForCausalLM.from_pretrained({str(output)!r})\"")
    with atomic_directory(output) as tmp:
        notes: list[str] = []
        if to in ("gguf", "ollama"):
            file, base_file, notes = _gguf_files(adapter, tmp, merged, outtype, base, trust_remote_code, into)
            if to == "gguf":
                model = f"{output / file}" if merged else str(base_file or "BASE.gguf")
                lora = "" if merged else f" --lora {shlex.quote(str(output / file))}"
                command = f"llama-cli -m {shlex.quote(model)}{lora}"
                if not merged and base_file is None:
                    notes.append("the base is not a GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py "
                                 "and pass that file as -m")
            else:
                if not merged and base_file is None:
                    raise InputError("Ollama needs the base model as a GGUF file, and this adapter's base is not "
                                     "one: pass --base FILE.gguf, or --merged with a GGUF base")
                template, stops = _chat_template(adapter_dir, base, trust_remote_code)
                source, extra = (f"./{file}", None) if merged else (str(base_file), f"./{file}")
                (tmp / "Modelfile").write_text(_modelfile(source, extra, template, stops))
                command = f"ollama create {shlex.quote(name)} -f {shlex.quote(str(output / 'Modelfile'))}"
        else:
            rank, notes = _engine_copy(adapter, to, tmp)
            from lorakit.model import adapter_base_config

            served = adapter_base_config(adapter_dir, base).name_or_path
            if served == DEFAULT_MODEL:
                from lorakit.model import DEFAULT_HUB_ID

                served = DEFAULT_HUB_ID
            if to == "vllm":
                max_rank = next((r for r in VLLM_RANKS if r >= rank), None)
                if max_rank is None:
                    raise LoraError(f"{adapter_dir} has rank {rank}; vLLM serves ranks up to {VLLM_RANKS[-1]}")
                command = (f"vllm serve {shlex.quote(served)} --enable-lora --lora-modules "
                           f"{shlex.quote(f'{name}={output}')} --max-lora-rank {max_rank}")
            else:
                command = (f"python -m sglang.launch_server --model-path {shlex.quote(served)} --enable-lora "
                           f"--lora-paths {shlex.quote(f'{name}={output}')} --max-lora-rank {rank}")
        files = sorted(p.name for p in tmp.iterdir())
    return ExportReport(to, output, files, command, notes)
