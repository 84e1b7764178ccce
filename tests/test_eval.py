"""lorakit eval and generate: offline metrics, prompts as in training, adapter switching."""

import json
import math
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_config, write_jsonl
from lorakit.cli import app
from lorakit.config import SAVED_CONFIG, validate_config
from lorakit.evaluation import EvalError, Switcher, generation_prompt, resolve_target, run_eval
from lorakit.metrics import score
from lorakit.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two tiny adapters trained on the arithmetic rows with different seeds."""
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        tmp = tmp_path_factory.mktemp(name)
        raw = tiny_config(tmp, tiny_model_dir, max_steps=3, seed=seed)
        raw["data"]["chat_template"] = True
        out[name] = train(validate_config(raw, "test")).adapter_dir
    return out


def test_rouge_matches_rouge_score_exactly():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mats", "running quickly home", "nothing in common"]
    refs = ["the cats sat on a mat", "he runs quick to home", "zebra"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {k: sum(scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)) / 3
                for k in ("rouge1", "rouge2", "rougeL")}
    assert score("rouge", preds, refs) == expected
    assert expected["rouge1"] > 0


def test_rouge_and_bleu_score_any_script():
    """rouge-score's own tokenizer keeps only a-z0-9: identical Russian or Chinese text
    scored 0. lorakit's words keep every script, each CJK character a word."""
    from lorakit.metrics import words

    same = ["Привет, мир", "你好世界", "café au lait"]
    assert score("rouge", same, same) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert score("bleu", ["你好世界朋友们好"], ["你好世界朋友们好"])["bleu"] == 1.0
    assert score("rouge", ["Привет мир"], ["Пока всем"])["rouge1"] == 0.0
    assert score("rouge", ["世界你好"], ["你好世界"])["rouge1"] == 1.0  # same characters, another order
    assert words("Привет, мир! 你好 l'été_2") == ["привет", "мир", "你", "好", "l", "été", "2"]


def test_bleu_and_exact_match_by_hand():
    # 7 predicted tokens, 6 reference tokens: precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty.
    bleu = score("bleu", ["the cat sat on the mat today"], ["the cat sat on the mat"])["bleu"]
    assert bleu == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    assert score("bleu", ["x"], ["y z"])["bleu"] == 0.0
    assert score("exact_match", [" Yes", "no", "maybe"], ["yes", "No", "perhaps"]) == {"exact_match": 2 / 3}


def test_eval_adapter_writes_scores_and_predictions(adapters, tmp_path):
    out = tmp_path / "eval"
    results = run_eval(resolve_target(str(adapters["a"])), ["rouge", "exact_match", "perplexity"],
                       limit=5, max_new_tokens=4, batch_size=2, output=out, compare_base=True)
    assert set(results) == {"base", "model", "gain"}
    assert results["model"]["perplexity"] == pytest.approx(math.exp(results["model"]["loss"]))
    assert results["gain"]["loss"] == pytest.approx(results["model"]["loss"] - results["base"]["loss"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"] == 5 and "rouge1" in saved["model"]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 5 and {"prediction", "reference"} <= set(predictions[0])


def test_perplexity_on_rows_cut_at_max_length_is_warned_about(adapters, tmp_path, caplog):
    target = resolve_target(str(adapters["a"]))
    rows = tmp_path / "long.jsonl"
    # in the chat template: 30 prompt tokens, then the answer, cut after its first token by max_length 32
    rows.write_text(json.dumps({"question": "1+1+1+1+1+1", "answer": "66"}) + "\n")
    run_eval(target, ["perplexity"], data_file=str(rows))
    assert "1 of 1 rows are cut at the training's max_length=32" in caplog.text
    rows.write_text(json.dumps({"question": "1+" * 40, "answer": "41"}) + "\n")  # nothing of the answer left
    with pytest.raises(EvalError, match="no row keeps an answer token within the training's max_length=32"):
        run_eval(target, ["perplexity"], data_file=str(rows))
    caplog.clear()
    run_eval(target, ["perplexity"], limit=2)
    assert "are cut" not in caplog.text


def test_eval_errors(adapters, tmp_path):
    target = resolve_target(str(adapters["a"]))
    with pytest.raises(EvalError, match="unknown metric 'rogue'; known metrics: rouge, bleu, exact_match, perplexity"):
        run_eval(target, ["rogue"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1="}])
    result = runner.invoke(app, ["eval", str(adapters["a"]), "--data", bad, "--output", str(tmp_path / "e")])
    assert result.exit_code == 2 and "bad.jsonl, line 1: no field 'answer'" in result.output
    result = runner.invoke(app, ["eval", str(adapters["a"]), "--metric", "rogue"])
    assert result.exit_code == 2 and "'rouge'" in result.output  # the choices are listed


def test_eval_merged_model_matches_adapter(adapters, tmp_path):
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(adapters["a"]), "--output", str(merged)]).exit_code == 0
    kw = dict(limit=4, max_new_tokens=4, batch_size=4)
    from_adapter = run_eval(resolve_target(str(adapters["a"]), dtype="float32"), ["rouge", "perplexity"], **kw)
    from_merged = run_eval(resolve_target(str(merged), dtype="float32"), ["rouge", "perplexity"], **kw)
    assert from_merged["model"]["loss"] == pytest.approx(from_adapter["model"]["loss"], abs=1e-4)


def test_eval_computes_in_the_training_dtype_by_default(adapters):
    """``auto`` is bfloat16 where it is fast (the adapter's factors stay float32); scores stay close to float32's."""
    from lorakit.model import bf16_is_fast, load_model

    auto, exact = resolve_target(str(adapters["a"])), resolve_target(str(adapters["a"]), dtype="float32")
    assert auto.model.dtype == "auto" and exact.model.dtype == "float32"
    expected = torch.bfloat16 if bf16_is_fast() else torch.float32
    assert load_model(auto.model).dtype == expected
    kw = dict(limit=4, max_new_tokens=4, batch_size=4)
    fast, slow = (run_eval(t, ["perplexity"], **kw)["model"]["loss"] for t in (auto, exact))
    assert fast == pytest.approx(slow, rel=2e-2)


def test_generation_prompt_follows_training_format(adapters):
    target = resolve_target(str(adapters["a"]))
    from lorakit.model import load_tokenizer

    tok = load_tokenizer(target.model)
    assert generation_prompt("3+4=", target.data, tok) == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"


def test_generate_says_when_a_prompt_cannot_fill_the_training_template(adapters, tmp_path, caplog):
    """A template over two fields cannot be filled from one prompt: generate says it uses
    the prompt whole (silent, it looked like the adapter had learned nothing)."""
    two = tmp_path / "two"
    shutil.copytree(adapters["a"], two)
    saved = yaml.safe_load((two / SAVED_CONFIG).read_text())
    saved["data"]["prompt_template"] = "{question} (from {source})"
    (two / SAVED_CONFIG).write_text(yaml.safe_dump(saved))
    Switcher(str(two), {})
    assert "trained with prompt_template fields question, source: one text cannot fill them" in caplog.text
    caplog.clear()
    Switcher(str(adapters["a"]), {})
    assert "cannot fill" not in caplog.text


def test_switching_adapters_without_reloading(adapters):
    switcher = Switcher(str(adapters["a"]), {"b": str(adapters["b"])})
    model = switcher.model
    first = switcher.answer("3+4=", 6)
    switcher.use("b")
    assert switcher.model is model and switcher.active == "b"
    only_b = Switcher(str(adapters["b"]), {})
    assert switcher.answer("3+4=", 6) == only_b.answer("3+4=", 6)
    ids = switcher.tokenizer("3+4=", return_tensors="pt").input_ids
    logits_b = switcher.model(input_ids=ids).logits
    switcher.use("main")
    assert switcher.answer("3+4=", 6) == first
    assert (switcher.model(input_ids=ids).logits - logits_b).abs().max() > 1e-4  # the outputs did switch
    with pytest.raises(EvalError, match="no adapter named 'c'; loaded: main, b"):
        switcher.use("c")


def test_generate_command(adapters):
    result = runner.invoke(app, ["generate", str(adapters["a"]), "--prompt", "1+2=", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", str(adapters["a"]), "--adapter", f"b={adapters['b']}",
                                 "--max-new-tokens", "3"], input="1+2=\n:use b\n2+2=\n")
    assert result.exit_code == 0, result.output
    assert "using adapter b" in result.output
    bad = runner.invoke(app, ["generate", str(adapters["a"]), "--adapter", "nodir", "--prompt", "x"])
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output


def test_merge_command_errors(adapters, tmp_path):
    bad = runner.invoke(app, ["merge", str(adapters["a"]), "--output", str(tmp_path / "m"), "--weights", "a,b"])
    assert bad.exit_code == 2 and "expected numbers" in bad.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    refused = runner.invoke(app, ["merge", str(adapters["a"]), "--output", str(tmp_path / "full")])
    assert refused.exit_code == 2 and "--force" in refused.output
    missing = runner.invoke(app, ["merge", str(tmp_path / "nothing"), "--output", str(tmp_path / "m")])
    assert missing.exit_code == 2 and "no such adapter directory" in missing.output


def test_eval_merge_inspect_input_errors(adapters, tmp_path):
    no_data = runner.invoke(app, ["eval", str(tmp_path)])  # a directory with no model and no data
    assert no_data.exit_code == 2 and "no data to evaluate on: pass --data FILE" in no_data.output
    for flag, value, message in (("--dtype", "int8", "float32"), ("--into", "nf4", "dequantized")):
        bad = runner.invoke(app, ["merge", str(adapters["a"]), "--output", str(tmp_path / "m"), flag, value])
        assert bad.exit_code == 2 and message in bad.output and value in bad.output
    not_adapter = runner.invoke(app, ["inspect", str(tmp_path)])
    assert not_adapter.exit_code == 2 and "no adapter_config.json here" in not_adapter.output


def test_generation_feeds_the_head_contiguous_rows(tiny_model_dir):
    """generate's first step slices the last position out of the hidden states; the head gets
    a contiguous copy (torch's CPU linear is ~70× slower on the slice in bfloat16) and no
    hook is left behind."""
    from lorakit.config import ModelConfig
    from lorakit.evaluation import generate
    from lorakit.model import load_model, load_tokenizer

    target = ModelConfig(name_or_path=tiny_model_dir, dtype="float32")
    model, tokenizer = load_model(target), load_tokenizer(target)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    prompts = ["1+2=", "10+20+30="]  # different lengths: a padded batch
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert False in seen  # transformers' own call hands the head a slice
    seen.clear()
    generate(model, tokenizer, prompts, 3, 2)
    assert seen and all(seen)
    assert not head._forward_pre_hooks
