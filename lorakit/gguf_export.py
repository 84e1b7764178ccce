"""llama.cpp's GGUF files, written natively with the ``gguf`` package: LoRA adapters and
whole models, for the architectures whose layout lorakit has verified in llama.cpp.

What llama.cpp expects of an adapter (``src/llama-adapter.cpp``): ``general.type =
adapter``, ``adapter.type = lora``, one global ``adapter.lora.alpha``, and per weight the
tensors ``<name>.lora_a`` (torch shape ``r × d_in``) and ``<name>.lora_b`` (``d_out × r``).
It scales every pair by ``alpha / r`` with ``r`` read from that pair. Whatever else sets a
layer's scale (rsLoRA's ``alpha/√r``, ``rank_pattern``, ``alpha_pattern``) is therefore
folded into that layer's ``lora_b`` here, so llama.cpp computes lorakit's update exactly.

llama.cpp stores the query and key rows of Llama-family models in its own rotary order
(``convert_hf_to_gguf.py``'s ``LlamaModel.permute``); the same permutation is applied to
the base weights and to the rows of their ``lora_b``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch

from lorakit.errors import InputError

# transformers' model_type -> llama.cpp architecture. Each was checked in llama.cpp by
# tests/test_export.py (logits of adapter and merged exports against lorakit's).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTES_QK = {"llama"}  # architectures whose q/k rows llama.cpp keeps in its rotary order
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def architecture(hf_config) -> str:
    """The llama.cpp architecture of a transformers config.

    Raises:
        InputError: a model type lorakit has not verified in llama.cpp.
    """
    arch = ARCHITECTURES.get(getattr(hf_config, "model_type", None))
    if arch is None:
        raise InputError(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models; this base is "
            f"{hf_config.model_type!r}. Use `lorakit merge` and llama.cpp's convert_hf_to_gguf.py instead")
    return arch


def _head_counts(hf_config) -> tuple[int, int]:
    heads = hf_config.num_attention_heads
    return heads, getattr(hf_config, "num_key_value_heads", None) or heads


def _rotary_rows(hf_name: str, rows: torch.Tensor, hf_config) -> torch.Tensor:
    """``rows`` (output rows of ``hf_name``'s weight) in llama.cpp's order."""
    if architecture(hf_config) not in _PERMUTES_QK:
        return rows
    heads, kv_heads = _head_counts(hf_config)
    leaf = hf_name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
    n = {"q_proj": heads, "k_proj": kv_heads}.get(leaf)
    if n is None:
        return rows
    shape = rows.shape
    return rows.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(hf_name: str, hf_config) -> str:
    """llama.cpp's name for a module or tensor of the transformers model (``.weight``/``.bias`` kept).

    Raises:
        InputError: a module llama.cpp's layout for this architecture does not have.
    """
    arch = architecture(hf_config)
    found = _name_map(arch, hf_config.num_hidden_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise InputError(f"{hf_name}: llama.cpp's {arch} layout has no such tensor, so it cannot be exported")
    return found


@cache
def _name_map(arch: str, n_blocks: int):
    # gguf builds the map by formatting every name of every block: 23 ms, once per model, not per tensor
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)


def _writer(path: Path, arch: str):
    import gguf

    return gguf.GGUFWriter(path, arch)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_adapter(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]], alpha: float,
                  hf_config) -> None:
    """Write a LoRA adapter GGUF.

    Args:
        path: the ``.gguf`` file to write.
        layers: per adapted module (transformers path): ``(A, B, scale)``, A ``r × d_in``,
            B ``d_out × r`` and the update's scale, so that ``ΔW = scale·B·A``.
        alpha: the ``adapter.lora.alpha`` to record; each B is rescaled so that
            llama.cpp's ``alpha / r`` gives ``scale``.
        hf_config: the base model's transformers config.
    """
    writer = _writer(path, architecture(hf_config))
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for name, (A, B, scale) in layers.items():
        rank = A.shape[0]
        fold = scale * rank / alpha  # 1 for a plain LoRA: its B is written as trained
        B = B.double() * fold if fold != 1.0 else B
        target = gguf_name(name, hf_config)
        writer.add_tensor(f"{target}.weight.lora_a", A.float().contiguous().numpy())
        writer.add_tensor(f"{target}.weight.lora_b", _rotary_rows(name, B.float(), hf_config).contiguous().numpy())
    _finish(writer)


def _model_metadata(writer, hf_config, arch: str) -> None:
    """The architecture keys llama.cpp reads, from the transformers config.

    Raises:
        InputError: a config feature whose llama.cpp equivalent lorakit does not write.
    """
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise InputError(f"the base uses {rope_type!r} rope scaling, which lorakit's GGUF writer does not express")
    heads, kv_heads = _head_counts(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    theta = rope.get("rope_theta")
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta or getattr(hf_config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(hf_config.vocab_size)
    if head_dim != hf_config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _encoded(array: np.ndarray, outtype: str):
    """``array`` in ``outtype`` and its GGML type; vectors and odd-sized rows stay exact."""
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    qtype = types[outtype]
    if array.ndim == 1 or qtype == types["f32"]:
        return array, types["f32"]
    if qtype == types["q8_0"] and array.shape[-1] % 32:
        qtype = types["f16"]  # Q8_0 packs rows in blocks of 32; llama.cpp's converter falls back the same way
    return gguf.quants.quantize(array, qtype), qtype


def write_model(path: Path, state: dict[str, torch.Tensor], hf_config, outtype: str,
                carried: list[tuple[str, object, object, object]]) -> None:
    """Write a whole model as a GGUF file.

    Args:
        path: the ``.gguf`` file to write.
        state: the model's tensors under transformers' names.
        hf_config: its transformers config (shapes, heads, rope, tied head).
        outtype: one of ``OUTTYPES`` for the matrices (vectors stay float32).
        carried: ``(key, value, type, sub_type)`` metadata to copy, e.g. the tokenizer of
            the GGUF the base came from.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise InputError(f"GGUF type {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    arch = architecture(hf_config)
    writer = _writer(path, arch)
    writer.add_type("model")
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _model_metadata(writer, hf_config, arch)
    for key, value, vtype, sub_type in carried:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reads a missing output head as tied to token_embd
        array = _rotary_rows(name, tensor.float(), hf_config).contiguous().numpy()
        data, qtype = _encoded(array, outtype)
        writer.add_tensor(gguf_name(name, hf_config), data, raw_dtype=qtype)
    _finish(writer)


def tokenizer_metadata(gguf_file: Path) -> list[tuple[str, object, object, object]]:
    """The tokenizer and descriptive metadata of a GGUF file, to carry into a model written from it.

    Its architecture keys are not carried: they are written from the model itself.
    """
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(gguf_file)
    carried = []
    for field in reader.fields.values():
        if not field.name.startswith(("tokenizer.", "general.")):
            continue
        if field.name in ("general.architecture", "general.type", "general.file_type", "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        carried.append((field.name, field.contents(), vtype, sub_type))
    return carried
