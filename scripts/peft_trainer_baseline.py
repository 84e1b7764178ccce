"""The peer to beat: a lorakit config trained with PEFT + transformers.Trainer.

Same model and compute dtype, same tokenized data (lorakit's own rendering and prompt
masking), same LoRA layers, rank, alpha, dropout and hyperparameters; only the training
engine differs. Trainer groups batches by length, its own best setting for this data. Prints real (non-padding) tokens/s and the final validation loss.

    python scripts/peft_trainer_baseline.py configs/quickstart.yaml [--set training.max_steps=20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def validation_loss(model, examples: list[dict], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss, computed the same way for both engines."""
    from lorakit.batching import collate
    from lorakit.data import IGNORE

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / count


def run_baseline(cfg) -> dict:
    """Train ``cfg`` with PEFT + Trainer; returns tokens/s, seconds and validation loss."""
    import peft
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lorakit.batching import collate
    from lorakit.data import build_examples
    from lorakit.inject import find_targets
    from lorakit.model import load_model, load_tokenizer

    t = cfg.training
    tokenizer = load_tokenizer(cfg.model)
    train_set = build_examples(cfg.data, tokenizer, "train")
    val_set = build_examples(cfg.data, tokenizer, "validation") if cfg.data.validation else []
    model = load_model(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    targets = sorted(find_targets(model, cfg.lora))  # the very layers lorakit adapts
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        use_dora=cfg.lora.use_dora))
    tokens = {"n": 0}

    def collator(examples):
        batch = collate(examples, tokenizer.pad_token_id)
        tokens["n"] += int(batch["attention_mask"].sum())
        return batch

    class StepClock(TrainerCallback):
        """Times the training steps only, as lorakit's tokens/s does (not Trainer's setup)."""

        start = end = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = self.start or time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
            max_steps=t.max_steps, learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm or 0.0, seed=t.seed, logging_steps=t.log_every,
            save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            # PEFT + Trainer at its best: batches of similar length (the model already computes
            # in bf16 where that is fast: cfg.model.dtype is auto, as lorakit's).
            train_sampling_strategy="group_by_length",
        )
        clock = StepClock()
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          callbacks=[clock])
        trainer.train()
        seconds = clock.end - clock.start
    val = validation_loss(model, val_set, t.batch_size, tokenizer.pad_token_id) if val_set else float("nan")
    return {"tokens_per_s": tokens["n"] / seconds, "seconds": seconds, "val_loss": val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    from lorakit.config import load_config

    print(run_baseline(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
