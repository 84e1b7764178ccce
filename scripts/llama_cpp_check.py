"""Generate with an exported GGUF adapter inside llama.cpp and with lorakit, side by side.

    python scripts/llama_cpp_check.py runs/quickstart/adapter runs/quickstart/export-gguf/adapter.gguf

Greedy continuations of the first validation prompts must be the same token for token.
llama.cpp runs the adapter on a float32 GGUF of the base (written once by lorakit's own
GGUF writer, cached beside the converted default model) with a float32 KV cache, and
lorakit runs in float32 too, so the comparison is not blurred by quantization or bfloat16. Needs llama-cpp-python (``make install``).
Exit status 1 when a continuation differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers
from llama_cpp import Llama

from lorakit.adapter_io import load_adapter
from lorakit.data import encode
from lorakit.evaluation import prompt_of, resolve_target
from lorakit.export import base_gguf_file
from lorakit.files import atomic_file
from lorakit.generation import greedy, stop_ids
from lorakit.gguf_export import tokenizer_metadata, write_model
from lorakit.model import cache_dir, load_model, load_tokenizer
from lorakit.render import render
from lorakit.rows import load_rows

F32 = 0  # GGML_TYPE_F32


def base_f32_gguf(model, source: Path) -> Path:
    dtype = str(model.dtype).removeprefix("torch.")  # the weights written are the loaded model's
    path = cache_dir() / "gguf" / f"{source.stem}-{source.stat().st_size}-f32-from-{dtype}.gguf"
    if not path.is_file():
        with atomic_file(path) as tmp:
            write_model(tmp, model.state_dict(), model.config, "f32", tokenizer_metadata(source))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the lorakit adapter directory")
    parser.add_argument("gguf", help="its export: adapter.gguf")
    parser.add_argument("--rows", type=int, default=3, help="validation prompts to compare")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()

    target = resolve_target(args.adapter)
    source = base_gguf_file(target.model.name_or_path)
    if source is None:
        sys.exit(f"{args.adapter}: its base is not a GGUF model; this check needs one")
    tokenizer = load_tokenizer(target.model)
    # float32 on both sides: a bfloat16 lorakit against float32 llama.cpp can flip near-ties.
    model = load_model(target.model.model_copy(update={"dtype": "float32"})).eval()
    base = base_f32_gguf(model, source)
    load_adapter(model, target.adapter)
    engine = Llama(str(base), lora_path=args.gguf, n_ctx=1024, verbose=False, type_k=F32, type_v=F32)
    stops = set(stop_ids(tokenizer))

    rows = load_rows(target.data.validation, "validation").head(args.rows)
    same = 0
    for row, where in zip(rows.rows, rows.where):
        ids = encode(tokenizer, prompt_of(render(row, target.data, tokenizer, where)))
        mine = greedy(model, [ids], args.max_new_tokens, sorted(stops), 1, tokenizer.pad_token_id)[0]
        theirs = []  # cut before a stop token, as lorakit's are
        for token in engine.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in stops:
                break
            theirs.append(token)
            if len(theirs) == args.max_new_tokens:
                break
        verdict = "same" if mine == theirs else "DIFFERENT"
        same += mine == theirs
        print(f"{where}: {verdict}")
        print(f"  lorakit:   {tokenizer.decode(mine, skip_special_tokens=True)!r}")
        print(f"  llama.cpp: {tokenizer.decode(theirs, skip_special_tokens=True)!r}")
    print(f"{same}/{len(rows)} greedy continuations identical in llama.cpp and lorakit")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
