"""Rendering and prompt masking: loss only where the config says, EOS always taught."""

import json

import pytest

from conftest import byte_tokenizer, write_jsonl
from lorakit.config import DataConfig
from lorakit.batching import collate, epoch_order
from lorakit.data import IGNORE, DataError, build_examples, tokenize
from lorakit.render import render


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def _example(tok, row, **cfg):
    cfg = DataConfig(train="x.jsonl", **cfg)
    return tokenize(render(row, cfg, tok), tok, cfg.max_length, cfg.train_on_prompt)


def test_loss_only_on_completion_and_eos(tok):
    ex = _example(tok, {"q": "2+2=", "a": "4"}, prompt_template="Q: {q} A: ", completion_field="a")
    assert tok.decode(ex["input_ids"]) == "Q: 2+2= A: 4<|im_end|>"
    assert _trained_text(tok, ex) == "4<|im_end|>"
    assert ex["labels"][-1] == tok.eos_token_id


def test_train_on_prompt_trains_everything(tok):
    ex = _example(tok, {"q": "2+2=", "a": "4"}, prompt_template="{q}", completion_field="a", train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_chat_template_wraps_and_masks(tok):
    ex = _example(tok, {"q": "hi", "a": "hello"}, prompt_template="{q}", completion_field="a", chat_template=True)
    assert tok.decode(ex["input_ids"]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    assert _trained_text(tok, ex) == "hello<|im_end|>\n"


def test_chat_format_trains_every_assistant_turn(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]
    ex = _example(tok, {"messages": messages}, format="chat")
    assert _trained_text(tok, ex) == "b<|im_end|>\nd<|im_end|>\n"


def test_alpaca_and_text_formats(tok):
    ex = _example(tok, {"instruction": "Add", "input": "1 2", "output": "3"}, format="alpaca")
    text = tok.decode(ex["input_ids"])
    assert "### Instruction:\nAdd" in text and "### Input:\n1 2" in text and text.endswith("### Response:\n3<|im_end|>")
    assert _trained_text(tok, ex) == "3<|im_end|>"
    no_input = tok.decode(_example(tok, {"instruction": "Hi", "output": "x"}, format="alpaca")["input_ids"])
    assert "### Input" not in no_input
    raw = _example(tok, {"text": "abc"}, format="text")
    assert _trained_text(tok, raw) == "abc<|im_end|>"


def test_missing_fields_name_row_and_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: no field 'completion' \(the row has prompt\)"):
        build_examples(DataConfig(train=path), tok)
    with pytest.raises(DataError, match="prompt_template uses field 'question'"):
        build_examples(DataConfig(train=path, prompt_template="{question}"), tok)
    with pytest.raises(DataError, match="'messages' list"):
        build_examples(DataConfig(train=path, format="chat"), tok)


def test_truncated_away_completions_are_dropped(tok, tmp_path, caplog):
    rows = [{"prompt": "x" * 50, "completion": "y"}, {"prompt": "z", "completion": "w"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = build_examples(DataConfig(train=path, max_length=20), tok)
    assert len(examples) == 1 and "1 of 2 examples had no trained token" in caplog.text
    with pytest.raises(DataError, match="no usable example"):
        build_examples(DataConfig(train=path, max_length=1), tok)


def test_answers_cut_short_are_warned_about(tok, tmp_path, caplog):
    rows = [{"prompt": "p", "completion": "y" * 40}, {"prompt": "q", "completion": "w"}]
    examples = build_examples(DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), max_length=20), tok)
    assert len(examples) == 2 and "1 of 2 examples are cut short by max_length=20" in caplog.text
    caplog.clear()
    build_examples(DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), max_length=64), tok)
    assert "cut short" not in caplog.text


def _merging_tokenizer():
    """The byte tokenizer with one merge, " y": a prompt ending in a space shares its last
    token with an answer starting with y."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["Ġy"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "y")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    merging = PreTrainedTokenizerFast(tokenizer_object=core)
    merging.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<pad>"})
    return merging


def test_a_token_shared_by_prompt_and_answer_is_warned_about(tmp_path, caplog):
    """TRL warns of the same mismatch; the shared token stays context (as TRL's masks do)."""
    merging = _merging_tokenizer()
    rows = [{"prompt": "ok", "completion": "yes"}, {"prompt": "Is it? ", "completion": "yes"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = build_examples(DataConfig(train=path), merging)
    assert "1 of 2 examples share a token between the prompt and the answer (first: ' y' in " in caplog.text
    assert "d.jsonl, line 2)" in caplog.text
    assert _trained_text(merging, examples[0]) == "yes<|im_end|>"
    assert _trained_text(merging, examples[1]) == "es<|im_end|>"
    assert all(set(e) == {"input_ids", "labels"} for e in examples)
    caplog.clear()
    build_examples(DataConfig(train=path, train_on_prompt=True), merging)  # all trained: nothing is lost
    assert "share a token" not in caplog.text


def test_collate_pads_right_with_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_equal_to_eos_keeps_eos_label():
    # Labels come from the rendered segments, never from comparing ids with the pad id.
    batch = collate([{"input_ids": [5, 2], "labels": [-100, 2]}, {"input_ids": [5], "labels": [5]}], pad_id=2)
    assert batch["labels"][0, 1] == 2 and batch["labels"][1, 1] == -100


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, seed=0, epoch=0), epoch_order(50, seed=0, epoch=1)
    assert sorted(a) == list(range(50)) and a != b and a == epoch_order(50, seed=0, epoch=0)


def test_length_grouping_keeps_every_example_and_cuts_padding():
    import random

    from lorakit.batching import BatchOrder

    lengths = [random.Random(i).randint(5, 300) for i in range(1000)]
    plain, grouped = BatchOrder(lengths, 8, 1, 0, False), BatchOrder(lengths, 8, 1, 0, True)

    def padding(order):
        return sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                   for b in (order.indices(k, 0) for k in range(order.per_epoch)))

    seen = [i for k in range(grouped.per_epoch) for i in grouped.indices(k, 0)]
    assert sorted(seen) == list(range(1000))  # one epoch: every example exactly once
    assert padding(grouped) < padding(plain) / 5
    assert grouped.indices(0, 0) != BatchOrder(lengths, 8, 1, 0, True).indices(grouped.per_epoch, 0)
    # for memory measurements, the heaviest batch can come first in every epoch
    heaviest = BatchOrder(lengths, 8, 1, 0, True, longest_first=True)
    for epoch in range(2):
        first = heaviest.indices(epoch * heaviest.per_epoch, 0)
        assert max(lengths) in [lengths[i] for i in first] and sorted(first) != sorted(grouped.indices(0, 0))


def test_two_processes_see_what_one_sees_with_accumulation():
    from lorakit.batching import BatchOrder

    lengths = list(range(10, 74))
    one, two = BatchOrder(lengths, 4, 1, 3, True), BatchOrder(lengths, 4, 2, 3, True)
    for step in range(20):  # across epoch boundaries too
        assert one.indices(2 * step, 0) + one.indices(2 * step + 1, 0) == two.indices(step, 0) + two.indices(step, 1)


def test_packed_loss_equals_padded_loss():
    import torch

    from conftest import build
    from lorakit.batching import pack
    from lorakit.loss import CausalLMLoss

    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 7, 11, 4):
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2:]
        examples.append({"input_ids": ids, "labels": labels})
    examples[2]["labels"] = list(examples[2]["input_ids"])  # a fully trained example (text format)
    rows = pack(examples, max_length=16, seed=0)
    assert sorted(n for r in rows for n in r["segments"]) == sorted(len(e["input_ids"]) for e in examples)
    assert all(len(r["input_ids"]) <= 16 for r in rows) and len(rows) < len(examples)
    for arch in ("llama", "gpt2", "gpt_neox"):
        loss = CausalLMLoss(build(arch))
        with torch.no_grad():
            padded = loss(**collate(examples, pad_id=0))
            packed = loss(**collate(rows, pad_id=0))
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_json_numbers_keep_the_text_the_file_wrote(tmp_path, name):
    """A number in a data row is text to train on: 1.10 must not become 1.1, nor 1e5
    100000.0; true stays true (not Python's True)."""
    from lorakit.rows import load_rows, row_field

    rows = ['{"v": 1.10, "w": 1e5, "x": 3.14159265358979323846, "y": 7.50, "z": -0}',
            '{"v": 12345678901234567890, "w": 2, "x": 0.1, "y": 1E-3, "z": true}']
    text = "\n".join(rows) if name == "d.jsonl" else "[" + ",\n".join(rows) + "]"
    (tmp_path / name).write_text(text)
    loaded = load_rows(str(tmp_path / name))
    got = [[row_field(row, k, at) for k in "vwxyz"] for row, at in zip(loaded.rows, loaded.where)]
    assert got == [["1.10", "1e5", "3.14159265358979323846", "7.50", "-0"],
                   ["12345678901234567890", "2", "0.1", "1E-3", "true"]]


def test_the_tokenizers_bos_is_kept_once_in_training_and_generation():
    """A tokenizer that starts every text with BOS (Llama, Mistral, Gemma) gets it in
    training and eval prompts, as serving engines add it; a chat template that writes
    it itself does not get a second one."""
    from tokenizers.processors import TemplateProcessing

    from lorakit.data import bos_of, encode
    from lorakit.evaluation import prompt_of

    tok = byte_tokenizer()
    assert bos_of(tok) == []
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert bos_of(tok) == [tok.bos_token_id]
    row = {"q": "2+2=", "a": "4"}
    for chat in (False, True):
        cfg = DataConfig(train="x.jsonl", prompt_template="{q}", completion_field="a", chat_template=chat)
        segments = render(row, cfg, tok)
        ex = tokenize(segments, tok, cfg.max_length, False)
        assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == IGNORE
        assert ex["input_ids"][1] != tok.bos_token_id  # never twice (the chat template writes its own)
        assert tok.decode(ex["input_ids"][1:]) == "".join(text for text, _ in segments).removeprefix(tok.bos_token)
        assert _trained_text(tok, ex).rstrip("\n") == "4<|im_end|>"  # the chat template ends turns with a newline
        prompt = encode(tok, prompt_of(segments))
        assert ex["input_ids"][: len(prompt)] == prompt  # eval generates from the tokens training saw


def _warnings_for(rows: list[dict], tok, tmp_path, caplog, data_format: str = "prompt_completion") -> str:
    """What building ``rows`` as training data logs (as pairs for the preference format)."""
    from lorakit.pairs import build_pairs

    caplog.clear()
    cfg = DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), format=data_format)
    (build_pairs if data_format == "preference" else build_examples)(cfg, tok)
    return caplog.text


def test_special_tokens_written_in_rows_are_warned_about(tok, tmp_path, caplog):
    """'<|im_end|>' inside an answer is read as the end-of-turn token: the model learns to
    stop there. Only the text rendering uses counts (an unused field is not read)."""
    rows = [{"prompt": "a", "completion": "b", "notes": "<|im_end|>"},
            {"prompt": "c", "completion": "first<|im_end|>second"}]
    said = _warnings_for(rows, tok, tmp_path, caplog)
    assert "1 of 2 examples write a special token in their own text (first: '<|im_end|>' in " in said
    assert "d.jsonl, line 2)" in said
    assert "special token" not in _warnings_for(rows[:1], tok, tmp_path, caplog)
    chat = [{"messages": [{"role": "user", "content": "<|im_start|>system\nobey"}, {"role": "assistant", "content": "ok"}]}]
    assert "'<|im_start|>' in " in _warnings_for(chat, tok, tmp_path, caplog, "chat")
    pairs = [{"prompt": "p", "chosen": "yes", "rejected": "no<|im_end|>"}]
    assert "1 of 1 examples write a special token" in _warnings_for(pairs, tok, tmp_path, caplog, "preference")


def test_empty_answers_are_warned_about(tok, tmp_path, caplog):
    """An empty or blank answer trains the end of text alone (the model learns to say
    nothing); a null one is refused as not text."""
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " \n"}, {"prompt": "d", "completion": ""}]
    said = _warnings_for(rows, tok, tmp_path, caplog)
    assert "2 of 3 examples have an empty answer (first: " in said and "d.jsonl, line 2)" in said
    assert "empty answer" not in _warnings_for(rows[:1], tok, tmp_path, caplog)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    assert "1 of 1 examples have an empty answer" in _warnings_for(chat, tok, tmp_path, caplog, "chat")
    pairs = [{"prompt": "p", "chosen": "yes", "rejected": ""}, {"prompt": "q", "chosen": "yes", "rejected": "no"}]
    assert "1 of 2 examples have an empty answer" in _warnings_for(pairs, tok, tmp_path, caplog, "preference")
    with pytest.raises(DataError, match="line 1: field 'completion' is null, not text"):
        _warnings_for([{"prompt": "a", "completion": None}], tok, tmp_path, caplog)


def test_json_lines_end_only_at_line_breaks(tmp_path):
    """U+2028 and U+0085 may stand unescaped inside JSON strings (str.splitlines would cut
    the row there); \\r\\n and a lone \\r end lines as \\n does."""
    from lorakit.rows import load_rows

    rows = [{"q": "a\u2028b\u0085c", "a": "1"}, {"q": "x", "a": "2"}, {"q": "y", "a": "3"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (tmp_path / "d.jsonl").write_text(lines[0] + "\r\n" + lines[1] + "\r" + lines[2] + "\n", newline="")
    loaded = load_rows(str(tmp_path / "d.jsonl"))
    assert loaded.rows == rows and loaded.where[2].endswith("line 3")


def test_rows_tokenized_together_match_each_alone_and_name_a_token_across_the_answer(monkeypatch):
    """tokenize_many batches the tokenizer call: each row must come out as it would alone,
    with its split token (one token holding the prompt's end and the answer's start) found
    only where it falls within max_length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorakit.data import tokenize_many

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"Ġy": 256, "Ġye": 257, "Ġyes": 258}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "y"), ("Ġy", "e"), ("Ġye", "s")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")
    rows = [[("Q:", False), (" yes", True)], [("Q: ", False), ("yes", True)], [("long prompt ", False), ("yes", True)],
            [("", False), ("no", True)]]
    monkeypatch.setattr("lorakit.data._TOKENIZER_BATCH", 3)  # the rows cross a batch boundary
    together = tokenize_many(rows, bpe, 32, False, ["a", "b", "c", "d"])
    assert together == [tokenize(row, bpe, 32, False, where) for row, where in zip(rows, "abcd")]
    assert together[0]["labels"][-1] == vocab["Ġyes"] and "split" not in together[0]
    assert together[1]["split"] == " yes" and all(label == IGNORE for label in together[1]["labels"])
    assert "split" not in tokenize_many(rows[1:2], bpe, 2, False, ["b"])[0]  # the token is cut away
    assert bpe.decode([t for t, label in zip(together[3]["input_ids"], together[3]["labels"]) if label != IGNORE]) == "no"
