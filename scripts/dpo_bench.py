"""DPO on the quickstart pairs: lorakit against TRL's DPOTrainer with a PEFT model, side by side.

Same base (bf16 where lorakit's ``dtype: auto`` picks it), same starting adapter
(``lora.init_from``: PEFT loads it trainable and TRL keeps a copy as the reference, as
lorakit does), same pairs rendered the same way (TRL gets each prompt as the user turn
lorakit renders with the chat template), same beta, learning rate, batch and steps. Each
run is a fresh process; the table reports seconds per step (after the first) and the
peak resident memory, and their ratios.

    python scripts/dpo_bench.py [--steps 8] [--output scripts/results/bench-dpo.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart-dpo.yaml"


def _config(steps: int, out: str):
    from lorakit.config import load_config

    return load_config(CONFIG, [f"training.max_steps={steps}", f"training.output_dir={out}",
                                "training.eval_every=null", "training.save_every=null", "data.validation=null"])


def lorakit_child(steps: int) -> dict:
    from lorakit.train import train

    with tempfile.TemporaryDirectory() as tmp:
        history = train(_config(steps, f"{tmp}/run")).history
    seconds = [r["seconds"] for r in history if "seconds" in r]
    return {"seconds_per_step": sum(seconds[1:]) / len(seconds[1:]), "loss": history[-1]["loss"]}


def trl_child(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lorakit.model import DTYPE_NAMES, load_model, load_tokenizer, resolve_dtype
    from lorakit.rows import load_rows

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(steps, f"{tmp}/run")
        t, data = cfg.training, cfg.data
        tokenizer = load_tokenizer(cfg.model)
        dtype = resolve_dtype(cfg.model, False)
        base = load_model(cfg.model.model_copy(update={"dtype": DTYPE_NAMES[dtype]}))
        model = PeftModel.from_pretrained(base, cfg.lora.init_from, is_trainable=True)
        rows = [{"prompt": [{"role": "user", "content": data.prompt_template.format(**row)}],
                 "chosen": [{"role": "assistant", "content": row["chosen"]}],
                 "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in load_rows(data.train).rows]
        args = DPOConfig(output_dir=f"{tmp}/trl", per_device_train_batch_size=t.batch_size, max_steps=steps,
                         learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps,
                         beta=cfg.dpo.beta, loss_type=[cfg.dpo.loss], max_length=data.max_length, report_to="none",
                         use_cpu=not torch.cuda.is_available(), bf16=dtype == torch.bfloat16, logging_steps=1,
                         save_strategy="no", seed=t.seed, dataloader_num_workers=0)
        stamps = []

        class Clock(TrainerCallback):
            def on_step_end(self, *args, **kwargs):
                stamps.append(time.perf_counter())

        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
        steps_s = [b - a for a, b in zip([start, *stamps], stamps)]
        loss = [r["loss"] for r in trainer.state.log_history if "loss" in r][-1]
    return {"seconds_per_step": sum(steps_s[1:]) / len(steps_s[1:]), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", choices=["lorakit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--output", default="scripts/results/bench-dpo.json")
    args = parser.parse_args()
    if args.child:
        result = (lorakit_child if args.child == "lorakit" else trl_child)(args.steps)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    results = {}
    for lib in ("lorakit", "trl"):
        out = subprocess.run([sys.executable, __file__, "--child", lib, "--steps", str(args.steps)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{lib} failed:\n{out.stderr[-3000:]}")
        results[lib] = json.loads(out.stdout.strip().splitlines()[-1])
    mine, theirs = results["lorakit"], results["trl"]
    summary = {"steps": args.steps, **results,
               "speed_ratio": theirs["seconds_per_step"] / mine["seconds_per_step"],
               "memory_ratio": mine["peak_mb"] / theirs["peak_mb"]}
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"DPO, {args.steps} steps of {CONFIG.name}:")
    for lib, r in results.items():
        print(f"  {lib:8s} {r['seconds_per_step']:6.2f} s/step  peak {r['peak_mb']:7.0f} MB  loss {r['loss']:.4f}")
    print(f"  lorakit is {summary['speed_ratio']:.2f}x TRL's speed at {summary['memory_ratio']:.2f}x its memory")


if __name__ == "__main__":
    main()
