"""DPO and ORPO: the losses and gradients against TRL's, the reference model, the data,
and whole runs through the command line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import byte_tokenizer, write_jsonl
from lorakit import LoraConfig, add_lora, load_adapter
from lorakit.cli import app
from lorakit.config import Config, DataConfig
from lorakit.inject import lora_modules
from lorakit.pairs import build_pairs, collate_pairs
from lorakit.preference import PreferenceLoss, sequence_logps

runner = CliRunner()
ROWS = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5 or so"},
        {"prompt": "7+1=", "chosen": "8", "rejected": "nine"}]


def _config(objective: str, **section) -> Config:
    raw = {"data": {"train": "unused", "format": "preference"}, "training": {"max_steps": 1, "objective": objective}}
    if section:
        raw[objective] = section
    return Config.model_validate(raw)


def _peft_model(model_dir: str):
    """The tiny model with a PEFT LoRA whose B is not zero (so policy and reference differ)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft


def _lorakit_twin(model_dir: str, peft, config: Config, tmp_path) -> PreferenceLoss:
    """lorakit's model with PEFT's adapter as it is now: the reference (the model at step 0)."""
    from transformers import AutoModelForCausalLM

    peft.save_pretrained(tmp_path / "start", selected_adapters=["default"])
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "start")
    loss = PreferenceLoss(model, config)
    loss.freeze_reference()
    return loss


def _train_both(peft, mine: PreferenceLoss) -> None:
    """The same 'training step' on both: a fixed change to every A and B after the reference froze."""
    params = dict(mine.model.named_parameters())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in sorted(peft.named_parameters()):
            if ".default." in name and "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
                params[_name(name)].copy_(p)


def _name(peft_name: str) -> str:
    return peft_name.replace(".default", "").removeprefix("base_model.model.")


def _grads(model) -> dict[str, torch.Tensor]:
    return {_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def _trl_leaves_no_state():
    """TRL's trainer sets Accelerate's process-wide state; later runs in this process need a clean one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("_trl_leaves_no_state")
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trl(kind, tiny_model_dir, tmp_path):
    """TRL's DPOTrainer (PEFT model, adapters disabled as reference) and lorakit on the same
    rows: the same token ids and labels, the same loss, the same gradients of A and B."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    peft = _peft_model(tiny_model_dir)
    mine = _lorakit_twin(tiny_model_dir, peft, _config("dpo", beta=0.2, loss=kind), tmp_path)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, beta=0.2, loss_type=[kind],
                     report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=peft, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=byte_tokenizer())
    _train_both(peft, mine)  # TRL's reference is a copy of the adapter it was given, as lorakit's is
    theirs = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, theirs)
    trl_loss.backward()

    data = DataConfig(train=write_jsonl(tmp_path / "pairs.jsonl", ROWS), format="preference")
    pairs = build_pairs(data, byte_tokenizer())
    batch = collate_pairs(pairs, byte_tokenizer().pad_token_id)
    labels = theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, -100)
    width = batch["input_ids"].shape[1]
    # Same tokens where it matters: ids under the attention mask and the labelled positions.
    trl_rows = {tuple(ids[m.bool()].tolist()): tuple(lab[m.bool()].tolist())
                for ids, m, lab in zip(theirs["input_ids"], theirs["attention_mask"], labels)}
    mine_rows = {tuple(ids[m.bool()].tolist()): tuple(lab[m.bool()].tolist())
                 for ids, m, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])}
    assert trl_rows == mine_rows and width > 0

    loss = mine(**{k: theirs[k] for k in ("input_ids", "attention_mask")}, labels=labels)
    loss.backward()
    assert abs(trl_loss.item() - 0.6931) > 1e-3  # policy and reference differ
    torch.testing.assert_close(loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    expected, got = _grads(peft), _grads(mine.model)
    assert set(expected) == set(got) and len(got) == 8
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=1e-5, msg=name)
    # And the ids lorakit's own collation gives score the same.
    torch.testing.assert_close(mine(**batch).detach(), trl_loss.detach(), atol=1e-6, rtol=1e-6)


def test_orpo_equals_trl_formula(tiny_model_dir, tmp_path):
    """TRL's ORPO odds-ratio term and mean log-probs (its own functions) with the NLL of the
    chosen answers: lorakit's loss and gradients equal that composition."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    peft = _peft_model(tiny_model_dir)
    mine = _lorakit_twin(tiny_model_dir, peft, _config("orpo", **{"lambda": 0.3}), tmp_path)
    _train_both(peft, mine)
    data = DataConfig(train=write_jsonl(tmp_path / "pairs.jsonl", ROWS), format="preference")
    batch = collate_pairs(build_pairs(data, byte_tokenizer()), byte_tokenizer().pad_token_id)

    logits = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    chosen, rejected = logps.chunk(2)
    fake = SimpleNamespace(beta=0.3, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    n = len(ROWS)
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].flatten(0, 1), batch["labels"][:n, 1:].flatten())
    trl_loss = nll - losses.mean()
    trl_loss.backward()

    loss = mine(**batch)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    expected, got = _grads(peft), _grads(mine.model)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=1e-5, msg=name)


def test_the_reference_is_the_model_at_step_0(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                     LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    loss = PreferenceLoss(model, _config("dpo"))
    loss.freeze_reference()
    data = DataConfig(train=write_jsonl(tmp_path / "pairs.jsonl", ROWS), format="preference")
    batch = collate_pairs(build_pairs(data, byte_tokenizer()), byte_tokenizer().pad_token_id)
    base = sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)[0]
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.3)
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(loss.reference_logps(batch), base, atol=1e-6, rtol=1e-6)
    model.train()  # as in training: the reference pass switches dropout (0.05 here) off, not the mode
    torch.testing.assert_close(loss.reference_logps(batch), base, atol=1e-6, rtol=1e-6)
    assert model.training and all(m.dropout == 0.05 for m in lora_modules(model).values())
    model.eval()
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert not torch.allclose(sequence_logps(model, batch)[0], base, atol=1e-3)
    # At step 0 the policy is the reference: the loss is log 2 and every reward is zero.
    fresh = PreferenceLoss(model, _config("dpo"))
    fresh.freeze_reference()
    torch.testing.assert_close(fresh(**batch), torch.tensor(0.6931472), atol=1e-6, rtol=0)
    assert torch.equal(fresh.stats[:3], torch.zeros(3))


def test_pairs_render_like_supervised_rows(tmp_path):
    """Chat prompts and TRL's conversational answers; only the final answer is labelled."""
    tok = byte_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"},
                        {"role": "user", "content": "1+1"}],
             "chosen": [{"role": "assistant", "content": "2"}], "rejected": "3"}]
    data = DataConfig(train=write_jsonl(tmp_path / "p.jsonl", rows), format="preference", chat_template=True)
    pair = build_pairs(data, tok)[0]
    for key, answer in (("chosen", "2"), ("rejected", "3")):
        labelled = [t for t in pair[key]["labels"] if t != -100]
        assert tok.decode(labelled) == answer + "<|im_end|>\n"
        assert "yes?" in tok.decode(pair[key]["input_ids"])


# --- whole runs -------------------------------------------------------------------------

def _pairs(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.randint(1, 3))})
    return rows


def _dpo_config(tmp_path, model_dir: str, objective: str = "dpo", **training) -> dict:
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q", "v"]},
        "data": {"train": write_jsonl(tmp_path / "train.jsonl", _pairs(64, 0)),
                 # pairs it trains on: a tiny random model learns them, but hardly generalises
                 "validation": write_jsonl(tmp_path / "val.jsonl", _pairs(64, 0)[:16]),
                 "format": "preference", "max_length": 32},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 16, "batch_size": 8, "lr": 2e-2,
                     "objective": objective, "eval_every": 8, **training},
    }


def _train(tmp_path, raw: dict, *extra: str):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return runner.invoke(app, ["train", str(path), *extra])


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_preference_run_learns_and_its_adapter_is_like_any_other(objective, tiny_model_dir, tmp_path):
    result = _train(tmp_path, _dpo_config(tmp_path, tiny_model_dir, objective))
    assert result.exit_code == 0, result.output
    records = _metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 16 and {"rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(steps[0])
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [8, 16] and "val_accuracy" in val[0]
    if objective == "dpo":
        assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0
        assert val[-1]["val_margin"] > 0 and val[-1]["val_accuracy"] > 0.5
    assert sum(r["loss"] for r in steps[-4:]) < sum(r["loss"] for r in steps[:4])
    assert (tmp_path / "run" / "loss.png").is_file()
    adapter = tmp_path / "run" / "adapter"
    for args in (["merge", str(adapter), "-o", str(tmp_path / "merged")],
                 ["eval", str(adapter), "--metric", "rouge", "--limit", "4", "--max-new-tokens", "3"],
                 ["generate", str(adapter), "-p", "1+2=", "--max-new-tokens", "2"],
                 ["export", str(adapter), "--to", "vllm", "-o", str(tmp_path / "vllm")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)


def test_dpo_from_an_sft_adapter_precomputed_and_resumed(tiny_model_dir, tmp_path):
    """lora.init_from: the SFT adapter is the start and the reference (loss log 2 at step 0);
    precomputed reference log-probs give the same run; a stopped run resumes bit for bit."""
    from safetensors.torch import load_file

    from conftest import tiny_config

    (tmp_path / "sft").mkdir()
    sft = tiny_config(tmp_path / "sft", tiny_model_dir, max_steps=6)
    sft["lora"]["r"] = 2
    assert _train(tmp_path, sft).exit_code == 0
    raw = _dpo_config(tmp_path, tiny_model_dir, scheduler="constant", save_every=4, max_steps=8)
    raw["lora"] = {"init_from": str(tmp_path / "sft" / "run" / "adapter")}
    result = _train(tmp_path, raw)
    assert result.exit_code == 0 and "sft" in result.output, result.output
    first = _metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4) and first["margin"] == pytest.approx(0, abs=1e-6)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in adapter.items() if "lora_A" in k} == {2}
    saved = yaml.safe_load((tmp_path / "run" / "adapter" / "training_config.yaml").read_text())
    assert saved["lora"]["r"] == 2 and saved["lora"]["init_from"].endswith("adapter")

    raw["training"].update(output_dir=str(tmp_path / "pre"))
    raw["dpo"] = {"precompute_reference": True}
    assert _train(tmp_path, raw).exit_code == 0
    pre = load_file(tmp_path / "pre" / "adapter" / "adapter_model.safetensors")
    for key in adapter:
        torch.testing.assert_close(pre[key], adapter[key], atol=1e-5, rtol=1e-4)

    raw["training"].update(output_dir=str(tmp_path / "stopped"), max_steps=4)
    assert _train(tmp_path, raw).exit_code == 0
    raw["training"]["max_steps"] = 8
    result = _train(tmp_path, raw, "--resume")
    assert result.exit_code == 0, result.output
    resumed = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], pre[k]) for k in pre)


@pytest.mark.slow  # a real 2-process run (gloo)
def test_two_processes_equal_one_with_accumulation(tiny_model_dir, tmp_path):
    """DPO's step mean over pairs and its statistics are reduced across processes exactly as
    accumulation sums them in one."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    raw = _dpo_config(tmp_path, tiny_model_dir, max_steps=4, batch_size=4, grad_accum=2, eval_every=None)
    assert _train(tmp_path, raw).exit_code == 0
    raw["training"].update(grad_accum=1, output_dir=str(tmp_path / "two"))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(tmp_path / "two.yaml"), "--num-processes",
                           "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ([r for r in _metrics(tmp_path / d) if "loss" in r] for d in ("run", "two"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("loss", "margin", "accuracy", "rewards_chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    first, second = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("run", "two"))
    assert all(torch.allclose(first[k], second[k], rtol=1e-5, atol=1e-7) for k in first)


def test_plan_counts_pairs_and_both_answers(tiny_model_dir, tmp_path):
    from lorakit.config import validate_config
    from lorakit.plan import make_plan
    from lorakit.train import train

    raw = _dpo_config(tmp_path, tiny_model_dir, max_steps=None, epochs=1, eval_every=None)
    cfg = validate_config(raw, "test")
    plan = make_plan(cfg)
    pairs = build_pairs(cfg.data, byte_tokenizer())
    assert plan.examples == len(pairs) == 64 and plan.steps_per_epoch == 64 // 8
    assert plan.tokens_per_epoch == sum(len(p[k]["input_ids"]) for p in pairs for k in ("chosen", "rejected"))
    assert train(cfg).steps == plan.steps
