"""Batched greedy decoding (lorakit.generation) against each prompt decoded alone by transformers."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ARCHS, build, randomize_lora

from lorakit import generation
from lorakit.config import LoraConfig
from lorakit.generation import _shared_prefix, greedy
from lorakit.inject import add_lora

PREFIX = [5, 9, 17, 33, 60]
TAILS = [[7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41], [50, 51, 52, 53, 54, 55], [70, 71, 72],
         [80, 81, 82, 83, 84, 85, 86, 87, 88]]
NEW = 6


def _alone(model, prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    """transformers' greedy decoding, one prompt at a time (no padding), cut before a stop."""
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 do_sample=False, eos_token_id=stops or None, pad_token_id=0)[0, len(prompt):].tolist()
            cut = next((i for i, t in enumerate(out) if t in stops), len(out))
            answers.append(out[:cut])
    return answers


def _model(arch: str) -> torch.nn.Module:
    model = build(arch).double()
    if arch == "llama":  # eval decodes through the adapter's layers
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        randomize_lora(model)
        model.double()
    model.generation_config.eos_token_id = None  # stops are passed explicitly
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_each_prompt_alone(arch, monkeypatch):
    """A shared prefix, prompt passes joined into one decoding batch, and rows that stop
    early and leave it: every row gets exactly the tokens it gets decoded alone (float64)."""
    model = _model(arch)
    prompts = [PREFIX + tail for tail in TAILS]
    free = _alone(model, prompts, [])
    # a stop token some rows produce and others do not, so rows end at different steps
    counts = {t: sum(t in row for row in free) for t in {t for row in free for t in row}}
    stop = min(counts, key=lambda t: (abs(counts[t] - len(prompts) / 2), t))
    assert 0 < counts[stop] < len(prompts)
    monkeypatch.setattr(generation, "PROMPT_TOKENS", 24)  # several prompt passes to join
    for stops in ([], [stop]):
        expected = _alone(model, prompts, stops)
        assert greedy(model, prompts, NEW, stops, batch_size=4, pad_id=0) == expected
    assert greedy(model, [p[2:] for p in prompts], NEW, [stop], batch_size=8, pad_id=0) == _alone(
        model, [p[2:] for p in prompts], [stop])  # the shared prefix capped by the shortest prompt


def test_shared_prefix_leaves_each_row_a_token_and_respects_sliding_windows():
    from transformers import MistralConfig

    prompts = [PREFIX + [1, 2], PREFIX + [1], PREFIX + [1, 3, 4]]
    assert _shared_prefix(prompts, MistralConfig(sliding_window=None), 4) == len(PREFIX)  # [1] keeps its token
    assert _shared_prefix(prompts[:1], MistralConfig(sliding_window=None), 4) == 0
    assert _shared_prefix(prompts, MistralConfig(sliding_window=12), 4) == len(PREFIX)
    # padding after the prefix would push real tokens out of a window the rows outgrow
    assert _shared_prefix(prompts, MistralConfig(sliding_window=11), 4) == 0


def test_sliding_window_model_outgrowing_its_window_decodes_as_alone(monkeypatch):
    """No shared prefix there: the passes are joined with left padding only."""
    from conftest import _DECODER
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=8, **_DECODER)).double().eval()
    monkeypatch.setattr(generation, "PROMPT_TOKENS", 24)
    prompts = [PREFIX + tail for tail in TAILS]
    assert greedy(model, prompts, NEW, [], batch_size=8, pad_id=0) == _alone(model, prompts, [])


def test_generation_config_settings_greedy_ignores_are_named(caplog):
    model = _model("gpt2")
    model.generation_config.repetition_penalty = 1.3
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        greedy(model, [PREFIX], 2, [], batch_size=1, pad_id=0)
        greedy(model, [PREFIX], 2, [], batch_size=1, pad_id=0)
        model.generation_config.no_repeat_ngram_size = 2
        greedy(model, [PREFIX], 2, [], batch_size=1, pad_id=0)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "applies none of it" in warnings[0]  # once per model and settings
    assert "repetition_penalty" in warnings[0] and "no_repeat_ngram_size" in warnings[1]


def test_model_without_position_ids_decodes_rows_one_at_a_time():
    """Padded rows need their positions passed; a forward that cannot take them gets no padding."""
    inner = _model("gpt2")
    batches = []

    class NoPositions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config

        @property
        def device(self) -> torch.device:
            return inner.device

        def get_output_embeddings(self) -> torch.nn.Module:
            return inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0):
            batches.append(input_ids.shape[0])
            return inner(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                         logits_to_keep=logits_to_keep)

    prompts = [PREFIX + tail for tail in TAILS]
    assert greedy(NoPositions(), prompts, NEW, [], batch_size=4, pad_id=0) == _alone(inner, prompts, [])
    assert set(batches) == {1}
