"""lorakit against PEFT, side by side in one run: layer-level timings, memory, end to end.

    python scripts/bench.py              # everything (make bench); writes bench.json
    python scripts/bench.py --quick      # fewer repetitions, tiny model only
    python scripts/bench.py --dora-only --output scripts/results/bench-dora.json   # DoRA against PEFT's DoRA
    python scripts/bench.py --floor-only   # the quickstart step against the frozen model's own step
    python scripts/dpo_bench.py          # DPO against TRL's DPOTrainer (make bench runs it too)

Timings alternate the order of the two libraries every repetition after a warm-up and
report the median of per-repetition lorakit/PEFT ratios with its spread (min-max). PEFT
against a second PEFT model gives the noise floor first. Each tool runs the step its
users run: lorakit's training loss (``lorakit.loss``: only labelled rows, the output head
in chunks) and PEFT's model returning transformers' loss, as under ``Trainer``; one more
row puts lorakit's adapters under transformers' loss, so the adapters alone are compared
too. Each training-step row also gives the ratio a zero-cost adapter would reach: the
frozen model's own step with lorakit's loss (``make_floor``) against PEFT's step. Peak memory of three training
steps is measured in a fresh subprocess per setup: CUDA's peak allocated bytes on a GPU,
on the CPU the peak bytes of live tensors (``lorakit.memory.LiveTensorBytes``), weights
included. The end-to-end runs train the quickstart config, each in a fresh process:
tokens/s over the training steps only (setup, evaluation and saving left out for both),
the final validation loss, and the process's peak memory (CUDA's allocator peak; on the
CPU the peak resident set, model and libraries included, since counting live tensors
would slow the run it measures).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

SETUPS = {  # name: (targets, r, dropout)
    "qv r8 d.05": (["q_proj", "v_proj"], 8, 0.05),
    "qv r8 d0": (["q_proj", "v_proj"], 8, 0.0),
    "all r16 d.05": ("all-linear", 16, 0.05),
    "all r16 d0": ("all-linear", 16, 0.0),
}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_model(name: str):
    """A fresh copy of the base: the tiny random Llama, or the embedded SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "tiny":
        cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                          intermediate_size=1376, vocab_size=8192, max_position_embeddings=512)
        model = LlamaForCausalLM(cfg)
    else:
        from lorakit.config import ModelConfig
        from lorakit.model import load_model

        model = load_model(ModelConfig(dtype="bfloat16" if device() == "cuda" else "float32"))
    return model.to(device())


def sharing_weights(model, source):
    """``model`` with every parameter and buffer pointing at ``source``'s tensors."""
    tensors = dict(source.named_parameters()) | dict(source.named_buffers())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        tensor.data = tensors[name].data
    return model


def with_lora(lib: str, model, targets, r: int, dropout: float):
    if lib == "lorakit":
        from lorakit import LoraConfig, add_lora

        return add_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=targets))
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets))


def loss_fn(model, lib: str):
    """The loss each tool trains with: lorakit's own, or the model's (PEFT, Trainer)."""
    if lib != "lorakit":
        return lambda batch: model(**batch).loss
    from lorakit.loss import CausalLMLoss

    loss_model = CausalLMLoss(model)
    return lambda batch: loss_model(attention_mask=torch.ones_like(batch["input_ids"]), **batch)


def make_step(model, batch, lib: str):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    loss = loss_fn(model, lib)

    def step():
        loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def frozen_to_block0(model) -> None:
    """The model with no trainable weight but a scale on block 0's q projection, so that
    gradients reach it as they must for an adapter there."""
    model.requires_grad_(False)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.register_parameter("floor_scale", torch.nn.Parameter(torch.ones((), device=device())))
    q_proj.register_forward_hook(lambda module, args, out: out * module.floor_scale)


def make_floor(model, batch):
    """A step of the frozen model with no adapter (``frozen_to_block0``): the part of every
    LoRA step that no adapter implementation can make faster."""
    frozen_to_block0(model)
    return make_step(model, batch, "lorakit")


def make_forward(model, batch):
    model.eval()

    @torch.no_grad()
    def forward():
        model(input_ids=batch["input_ids"])

    return forward


def timed(fn, iters: int) -> float:
    if device() == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device() == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def interleaved(fns: list, reps: int, iters: int) -> list[list[float]]:
    """Seconds per call of each function, repetition by repetition, the order reversed
    every other repetition so that drift hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        order = list(range(len(fns))) if rep % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            times[i].append(timed(fns[i], iters))
    return times


def compare(a, b, reps: int, iters: int) -> dict:
    """Alternating timings of ``a`` and ``b``: medians and the median per-rep ratio a/b."""
    ta, tb = interleaved([a, b], reps, iters)
    ratios = [x / y for x, y in zip(ta, tb)]
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb), "ratio": statistics.median(ratios),
            "spread": [min(ratios), max(ratios)]}


def batch_of(vocab: int, b: int, t: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=gen).to(device())
    return {"input_ids": ids, "labels": ids}


UNMERGED_PROCESSES = 3


def unmerged_forward_child(model_name: str, reps: int, iters: int) -> None:
    """Run in a subprocess: the small-batch forward (1x8 tokens) of the base, of lorakit and
    of PEFT with all-linear r=16 adapters unmerged; prints each one's seconds per call,
    repetition by repetition, as JSON."""
    base = base_model(model_name)
    small = batch_of(base.config.vocab_size, 1, 8)
    # All three models read one copy of the base weights: two copies of the same model differ
    # in speed by a few percent (where their memory lies), as much as the overhead measured.
    models = [base] + [with_lora(lib, sharing_weights(base_model(model_name), base), "all-linear", 16, 0.0)
                       for lib in ("lorakit", "peft")]
    # The base runs interleaved with both: the ratio is that of the overheads, per repetition.
    print(json.dumps(interleaved([make_forward(m, small) for m in models], reps, iters)))


def unmerged_forward(model_name: str, reps: int, iters: int) -> dict:
    """Each tool's overhead over the base forward at 1x8 tokens, adapters unmerged, over
    several fresh processes: where a process's tensors lie moves this small overhead by
    several hundredths of the ratio, more than its repetitions disagree among themselves."""
    runs = []
    for _ in range(UNMERGED_PROCESSES):
        out = subprocess.run([sys.executable, __file__, "--unmerged-child", model_name, str(reps), str(iters)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    per_run = [[(a - b) / (p - b) for b, a, p in zip(*run)] for run in runs]
    ratios = [r for run in per_run for r in run]
    tb, ta, tp = ([t for run in runs for t in run[i]] for i in range(3))
    b = statistics.median(tb)
    return {"model": model_name, "what": "unmerged forward 1x8, all r16: overhead over the base",
            "a_s": statistics.median(ta), "b_s": statistics.median(tp), "ratio": statistics.median(ratios),
            "spread": [min(ratios), max(ratios)], "per_process": [statistics.median(run) for run in per_run],
            "lorakit_overhead": statistics.median(ta) / b - 1, "peft_overhead": statistics.median(tp) / b - 1}


def layer_level(model_name: str, reps: int, iters: int, quick: bool) -> list[dict]:
    rows = []
    vocab = 8192 if model_name == "tiny" else 49152
    train_batch = batch_of(vocab, 4 if model_name == "tiny" else 2, 256)

    base = base_model(model_name)
    base_fwd = make_forward(base, train_batch)
    base_fwd()
    t_base = statistics.median(timed(base_fwd, iters) for _ in range(3))

    frozen = make_floor(base_model(model_name), train_batch)
    frozen()
    t_floor = statistics.median(timed(frozen, iters) for _ in range(3))
    del frozen

    # Noise floor: PEFT against an identical PEFT model.
    p1 = make_step(with_lora("peft", base_model(model_name), *SETUPS["qv r8 d0"]), train_batch, "peft")
    p2 = make_step(with_lora("peft", base_model(model_name), *SETUPS["qv r8 d0"]), train_batch, "peft")
    floor = compare(p1, p2, reps, iters)
    rows.append({"model": model_name, "what": "noise floor: PEFT / PEFT step (qv r8 d0)", **floor})
    del p1, p2

    for setup, (targets, r, dropout) in SETUPS.items():
        if quick and setup.endswith("d.05"):
            continue
        lk = make_step(with_lora("lorakit", base_model(model_name), targets, r, dropout), train_batch, "lorakit")
        pf = make_step(with_lora("peft", base_model(model_name), targets, r, dropout), train_batch, "peft")
        res = compare(lk, pf, reps, iters)
        res.update(lorakit_step_per_fwd=res["a_s"] / t_base, peft_step_per_fwd=res["b_s"] / t_base,
                   # what an adapter costing nothing would score against PEFT
                   zero_cost_ratio=t_floor / res["b_s"])
        rows.append({"model": model_name, "what": f"train step {setup}", **res})
        del lk
        if setup == "qv r8 d0":  # the adapters alone: both under transformers' loss
            lk = make_step(with_lora("lorakit", base_model(model_name), targets, r, dropout), train_batch, "peft")
            rows.append({"model": model_name, "what": f"train step {setup}, adapters only (transformers' loss)",
                         **compare(lk, pf, reps, iters)})
            del lk
        del pf

    rows.append(unmerged_forward(model_name, 4 * reps, 10 * iters))

    # Merged forward against the base itself, on the weights both read (B is still zero, so
    # merging leaves their values as they were): only the wrappers differ.
    from lorakit import merge_lora

    lk_model = merge_lora(with_lora("lorakit", sharing_weights(base_model(model_name), base), "all-linear", 16, 0.0))
    res = compare(make_forward(lk_model, train_batch), base_fwd, 3 * reps, iters)  # the same math: only noise
    rows.append({"model": model_name, "what": "merged forward / base forward", **res})
    return rows


def qlora_step(reps: int, iters: int) -> dict:
    """QLoRA step on the tiny model: lorakit vs PEFT, both on the same 4-bit base."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        base_model("tiny").save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if device() == "cuda" else torch.float32)

        def load():
            return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map={"": device()})

        batch = batch_of(8192, 4, 256)
        lk = make_step(with_lora("lorakit", load(), *SETUPS["qv r8 d0"]), batch, "lorakit")
        pf = make_step(with_lora("peft", load(), *SETUPS["qv r8 d0"]), batch, "peft")
        return {"model": "tiny", "what": "QLoRA train step qv r8 d0", **compare(lk, pf, reps, iters)}


def peak_memory_child(model_name: str, lib: str, setup: str) -> None:
    """Run in a subprocess: three training steps, then print the peak memory in MB."""
    targets, r, dropout = SETUPS[setup]
    batch = batch_of(8192 if model_name == "tiny" else 49152, 4 if model_name == "tiny" else 2, 256)
    step = make_step(with_lora(lib, base_model(model_name), targets, r, dropout), batch, lib)
    if device() == "cuda":
        for _ in range(3):
            step()
        print(torch.cuda.max_memory_allocated() / 2**20)
        return
    from lorakit.memory import LiveTensorBytes

    with LiveTensorBytes() as live:  # the CPU allocator keeps no peak: count live tensor bytes
        for _ in range(3):
            step()
    print(live.peak / 2**20)


def peak_memory(model_name: str, quick: bool) -> list[dict]:
    rows = []
    for setup in SETUPS:
        if quick and setup.endswith("d.05"):
            continue
        mb = {}
        for lib in ("lorakit", "peft"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, lib, setup],
                                 capture_output=True, text=True, check=True)
            mb[lib] = float(out.stdout.strip().splitlines()[-1])
        rows.append({"model": model_name, "what": f"peak memory MB {setup}", "a_s": mb["lorakit"], "b_s": mb["peft"],
                     "ratio": mb["lorakit"] / mb["peft"], "spread": None})
    return rows


def peak_bytes() -> int:
    """This process's peak: CUDA's allocator peak on a GPU, else the peak resident set."""
    if device() == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def e2e_child(lib: str, seed: int, steps: int) -> None:
    """Run in a subprocess: one quickstart training run; prints tokens/s, the final
    validation loss and the process's peak memory as JSON."""
    import tempfile

    from lorakit.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"training.max_steps={steps}", f"training.output_dir={tmp}/run", "training.eval_every=null",
                     "training.save_every=null", f"training.seed={seed}"]
        if lib == "lorakit-float32":
            overrides.append("model.dtype=float32")
        if lib.endswith("-dora"):
            overrides.append("lora.use_dora=true")
        if lib.endswith("-compiled"):
            overrides.append("training.compile=true")
        cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
        if lib.startswith("lorakit"):
            from lorakit.train import train

            history = train(cfg).history
            steps_rows = [r for r in history if "tokens" in r]
            later = steps_rows[1:]  # the first step also pays for compiling, when there is any
            result = {"tokens_per_s": sum(r["tokens"] for r in steps_rows) / sum(r["seconds"] for r in steps_rows),
                      "tokens_per_s_after_first": sum(r["tokens"] for r in later) / sum(r["seconds"] for r in later),
                      "first_step_s": steps_rows[0]["seconds"],
                      "val_loss": [r["val_loss"] for r in history if "val_loss" in r][-1]}
        else:
            from peft_trainer_baseline import run_baseline

            result = run_baseline(cfg)
    print(json.dumps({**result, "peak_mb": peak_bytes() / 2**20}))


def matmul_peak(dtype: torch.dtype, n: int = 2048, iters: int = 10) -> float:
    """FLOP/s of an n×n matmul in ``dtype``: the peak MFU is measured against."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device()) for _ in range(2))
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device() == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def train_flops_per_token() -> float:
    """A LoRA step's matmul FLOPs per token on SmolLM2: forward 2N and backward to the inputs 2N,
    N the parameters of the transformer blocks (the head runs on labelled tokens only)."""
    from lorakit.config import ModelConfig
    from lorakit.targets import skeleton

    tree = skeleton(ModelConfig().name_or_path)
    blocks = sum(p.numel() for name, p in tree.named_parameters() if ".layers." in name)
    return 4 * blocks


def e2e_run(lib: str, seed: int, steps: int) -> dict:
    """One ``e2e_child`` run in a fresh process (so that its peak memory is its own)."""
    out = subprocess.run([sys.executable, __file__, "--e2e-child", lib, str(seed), str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(steps: int, seeds: int) -> list[dict]:
    """The quickstart config, lorakit train against PEFT + transformers.Trainer at its best (same
    compute dtype, batches grouped by length), and lorakit in float32 for the dtype's share;
    over ``seeds`` seeds (a 20-step run's validation loss moves by several hundredths with
    the data order alone), each run in a fresh process so that its peak memory is its own.
    MFU is against the matmul peak of the run's dtype, measured here first."""
    from lorakit.config import ModelConfig
    from lorakit.model import resolve_dtype

    auto = resolve_dtype(ModelConfig())
    peaks = {"auto": matmul_peak(auto), "float32": matmul_peak(torch.float32)}
    flops = train_flops_per_token()
    libs = ("lorakit", "peft", "lorakit-float32")
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for seed in range(seeds):
        for lib in libs if seed % 2 == 0 else libs[::-1]:
            runs[lib].append(e2e_run(lib, seed, steps))
    lk, pf, f32 = ({k: [r[k] for r in runs[lib]] for k in runs[lib][0]} for lib in libs)

    def mfu(tokens_per_s: float, peak: float) -> float:
        return tokens_per_s * flops / peak

    speed = {"model": "SmolLM2", "what": f"end to end quickstart ({auto}), {steps} steps × {seeds} seeds: tokens/s",
             "a_s": statistics.mean(lk["tokens_per_s"]), "b_s": statistics.mean(pf["tokens_per_s"]),
             "ratio": statistics.mean(lk["tokens_per_s"]) / statistics.mean(pf["tokens_per_s"]), "spread": None,
             "lorakit_val_loss": statistics.mean(lk["val_loss"]), "peft_val_loss": statistics.mean(pf["val_loss"]),
             "lorakit_val_losses": lk["val_loss"], "peft_val_losses": pf["val_loss"],
             "lorakit_mfu": mfu(statistics.mean(lk["tokens_per_s"]), peaks["auto"]),
             "peft_mfu": mfu(statistics.mean(pf["tokens_per_s"]), peaks["auto"]),
             "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()}}
    dtype = {"model": "SmolLM2", "what": f"end to end quickstart: lorakit {auto} / lorakit float32, tokens/s",
             "a_s": statistics.mean(lk["tokens_per_s"]), "b_s": statistics.mean(f32["tokens_per_s"]),
             "ratio": statistics.mean(lk["tokens_per_s"]) / statistics.mean(f32["tokens_per_s"]), "spread": None,
             "lorakit_val_loss": statistics.mean(lk["val_loss"]), "peft_val_loss": statistics.mean(f32["val_loss"]),
             "float32_val_losses": f32["val_loss"], "float32_mfu": mfu(statistics.mean(f32["tokens_per_s"]),
                                                                       peaks["float32"])}
    memory = {"model": "SmolLM2", "what": "end to end quickstart: peak memory MB (whole process on the CPU)",
              "a_s": max(lk["peak_mb"]), "b_s": max(pf["peak_mb"]), "ratio": max(lk["peak_mb"]) / max(pf["peak_mb"]),
              "spread": None, "float32_peak_mb": max(f32["peak_mb"])}
    return [speed, dtype, memory]


FLOOR_ROUNDS = 4


def quickstart_floor(batches: int, rounds: int) -> list[dict]:
    """lorakit's training step on the quickstart's first ``batches`` batches against the
    frozen model's own step on the same batches (``make_floor``: no adapter, lorakit's loss,
    the same dtype): once as transformers runs the model, the floor the speed issue names,
    and once with lorakit's own layers too (attention backward, RMSNorm, gated MLP), a floor
    lorakit's own speed-ups also lower. Wall time, rounds interleaved after a warm-up round
    that also builds every batch shape's matmul kernels."""
    from lorakit.activation_memory import keep_less
    from lorakit.attention import use_fast_backward
    from lorakit.batching import BatchOrder
    from lorakit.config import load_config
    from lorakit.data import build_examples
    from lorakit.inject import add_lora
    from lorakit.loss import CausalLMLoss
    from lorakit.model import DTYPE_NAMES, load_model, load_tokenizer, resolve_dtype
    from lorakit.train import SUPERVISED

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    tokenizer = load_tokenizer(cfg.model)
    examples = build_examples(cfg.data, tokenizer, "train")
    order = BatchOrder([SUPERVISED.length(e) for e in examples], cfg.training.batch_size, 1, cfg.training.seed,
                       cfg.data.group_by_length)
    data = [{k: v.to(device()) for k, v in SUPERVISED.collate([examples[i] for i in order.indices(m, 0)],
                                                                 tokenizer.pad_token_id).items()}
            for m in range(batches)]
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    dtype = resolve_dtype(cfg.model)

    def runner(adapters: bool, lorakit_layers: bool):
        torch.manual_seed(0)
        model = load_model(cfg.model.model_copy(update={"dtype": DTYPE_NAMES[dtype]}), device())
        if lorakit_layers:
            keep_less(model)
        if adapters:
            add_lora(model, cfg.lora)
        else:
            frozen_to_block0(model)
        if lorakit_layers:
            use_fast_backward(model, device(), dtype)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.lr)
        loss = CausalLMLoss(model, share_prefixes=True).train()

        def run():
            for batch in data:
                labelled = max(1, int((batch["labels"][:, 1:] != -100).sum()))
                loss(**batch, normalizer=labelled).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run

    lorakit, floor_hf, floor_lk = runner(True, True), runner(False, False), runner(False, True)
    t_lk, t_hf, t_fl = interleaved([lorakit, floor_hf, floor_lk], rounds, 1)
    rows = []
    for what, t_floor in (("the frozen model as transformers runs it", t_hf),
                          ("the frozen model with lorakit's own layers", t_fl)):
        ratios = [f / x for x, f in zip(t_lk, t_floor)]
        rows.append({"model": "SmolLM2", "what": f"quickstart step ({dtype}, {batches} batches) / {what}: tokens/s",
                     "a_s": tokens / statistics.median(t_lk), "b_s": tokens / statistics.median(t_floor),
                     "ratio": statistics.median(ratios), "spread": [min(ratios), max(ratios)]})
    return rows


def dora_end_to_end(steps: int) -> list[dict]:
    """The quickstart with DoRA (``lora.use_dora``), lorakit against PEFT's DoRA + Trainer,
    one run each in a fresh process: tokens/s and peak memory."""
    runs = {lib: e2e_run(lib, 0, steps) for lib in ("lorakit-dora", "peft-dora")}
    mine, theirs = runs["lorakit-dora"], runs["peft-dora"]
    return [{"model": "SmolLM2", "what": f"DoRA end to end quickstart, {steps} steps: tokens/s",
             "a_s": mine["tokens_per_s"], "b_s": theirs["tokens_per_s"],
             "ratio": mine["tokens_per_s"] / theirs["tokens_per_s"], "spread": None,
             "lorakit_val_loss": mine["val_loss"], "peft_val_loss": theirs["val_loss"]},
            {"model": "SmolLM2", "what": "DoRA end to end quickstart: peak memory MB (whole process on the CPU)",
             "a_s": mine["peak_mb"], "b_s": theirs["peak_mb"], "ratio": mine["peak_mb"] / theirs["peak_mb"],
             "spread": None}]


def compile_end_to_end(steps: int) -> list[dict]:
    """The quickstart with ``training.compile: true`` against the same run eager, one run
    each in a fresh process: tokens/s after the first step (which pays for compiling, its
    seconds reported apart) and the validation loss."""
    runs = {lib: e2e_run(lib, 0, steps) for lib in ("lorakit-compiled", "lorakit")}
    compiled, eager = runs["lorakit-compiled"], runs["lorakit"]
    return [{"model": "SmolLM2", "what": f"compiled / eager, quickstart, steps 2-{steps}: tokens/s",
             "a_s": compiled["tokens_per_s_after_first"], "b_s": eager["tokens_per_s_after_first"],
             "ratio": compiled["tokens_per_s_after_first"] / eager["tokens_per_s_after_first"], "spread": None,
             "lorakit_val_loss": compiled["val_loss"], "peft_val_loss": eager["val_loss"],
             "first_step_s": [compiled["first_step_s"], eager["first_step_s"]]}]


def show(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lorakit / PEFT on {device()} ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)")
    for column in ("model", "what", "lorakit", "against (PEFT unless named)", "ratio", "spread", "notes"):
        table.add_column(column)
    for r in rows:
        notes = []
        if "lorakit_step_per_fwd" in r:
            notes.append(f"step/fwd {r['lorakit_step_per_fwd']:.2f} vs {r['peft_step_per_fwd']:.2f}")
        if "zero_cost_ratio" in r:
            notes.append(f"a zero-cost adapter: {r['zero_cost_ratio']:.2f}")
        if "lorakit_overhead" in r:
            notes.append(f"overhead {r['lorakit_overhead']:+.1%} vs {r['peft_overhead']:+.1%}")
            notes.append("per process " + " / ".join(f"{x:.2f}" for x in r["per_process"]))
        if "lorakit_val_loss" in r:
            notes.append(f"mean val loss {r['lorakit_val_loss']:.4f} vs {r['peft_val_loss']:.4f}")
        if "first_step_s" in r:
            notes.append("first step {:.0f} s vs {:.0f} s".format(*r["first_step_s"]))
        if "lorakit_mfu" in r:
            notes.append(f"MFU {r['lorakit_mfu']:.1%} vs {r['peft_mfu']:.1%}")
        if "float32_mfu" in r:
            notes.append(f"float32 MFU {r['float32_mfu']:.1%}")
        spread = f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}" if r["spread"] else ""
        table.add_row(r["model"], r["what"], f"{r['a_s']:.4g}", f"{r['b_s']:.4g}", f"{r['ratio']:.2f}", spread,
                      "; ".join(notes))
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repetitions")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "LIB", "SETUP"), help=argparse.SUPPRESS)
    parser.add_argument("--unmerged-child", nargs=3, metavar=("MODEL", "REPS", "ITERS"), help=argparse.SUPPRESS)
    parser.add_argument("--e2e-child", nargs=3, metavar=("LIB", "SEED", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--e2e-steps", type=int, default=20, help="steps of the end-to-end comparison (0: skip)")
    parser.add_argument("--e2e-seeds", type=int, default=3, help="seeds of the end-to-end comparison")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end rows")
    parser.add_argument("--dora-steps", type=int, default=10, help="steps of the DoRA end-to-end rows (0: skip)")
    parser.add_argument("--dora-only", action="store_true", help="only the DoRA end-to-end rows")
    parser.add_argument("--compile-steps", type=int, default=10, help="steps of the compiled/eager rows (0: skip)")
    parser.add_argument("--compile-only", action="store_true", help="only the compiled/eager rows")
    parser.add_argument("--floor-batches", type=int, default=8,
                        help="quickstart batches of the step against the frozen model's (0: skip)")
    parser.add_argument("--floor-only", action="store_true", help="only the quickstart step against the frozen model's")
    parser.add_argument("--output", default="scripts/results/bench.json")
    args = parser.parse_args()
    if args.memory_child:
        return peak_memory_child(*args.memory_child)
    if args.unmerged_child:
        model_name, reps, iters = args.unmerged_child
        return unmerged_forward_child(model_name, int(reps), int(iters))
    if args.e2e_child:
        lib, seed, steps = args.e2e_child
        return e2e_child(lib, int(seed), int(steps))
    reps, iters = (3, 1) if args.quick else (5, 2)
    if args.e2e_only or args.dora_only or args.compile_only or args.floor_only:
        rows = (dora_end_to_end(args.dora_steps) if args.dora_only else
                compile_end_to_end(args.compile_steps) if args.compile_only else
                quickstart_floor(args.floor_batches, FLOOR_ROUNDS) if args.floor_only else
                end_to_end(args.e2e_steps, args.e2e_seeds))
        show(rows)
        Path(args.output).write_text(json.dumps({"device": device(), "machine": platform.platform(),
                                                 "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    rows = layer_level("tiny", reps, iters * 2, args.quick) + [qlora_step(reps, 1)] + peak_memory("tiny", args.quick)
    if not args.quick:
        rows += layer_level("smollm2", reps, 1, quick=True) + peak_memory("smollm2", quick=True)
        if args.e2e_steps:
            rows += end_to_end(args.e2e_steps, args.e2e_seeds)
        if args.floor_batches:
            rows += quickstart_floor(args.floor_batches, FLOOR_ROUNDS)
        if args.dora_steps:
            rows += dora_end_to_end(args.dora_steps)
        if args.compile_steps:
            rows += compile_end_to_end(args.compile_steps)
    show(rows)
    Path(args.output).write_text(json.dumps({"device": device(), "machine": platform.platform(),
                                             "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
