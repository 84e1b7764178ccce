"""The sparse-head loss equals transformers' full-logits loss, value and gradients."""

import pytest
import torch

import lorakit.loss as loss_module
from conftest import build
from lorakit import LoraConfig, add_lora
from lorakit.inject import lora_modules
from lorakit.batching import collate, length_batches
from lorakit.loss import CausalLMLoss, evaluate_loss, head_loss, supports_sparse_head


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # a masked prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_sparse_loss_equals_full_logits_loss(arch):
    model = add_lora(build(arch), LoraConfig(target_modules="all-linear", dropout=0.0))
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    wrapped = CausalLMLoss(model)
    assert wrapped.sparse
    batch = _batch()
    full = model(**batch).loss
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    sparse = wrapped(**batch)
    sparse.backward()
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4)


def test_heads_with_extra_math_keep_the_model_loss():
    model = build("llama")
    model.config.final_logit_softcapping = 30.0
    assert not supports_sparse_head(model)
    batch = _batch()
    assert torch.equal(CausalLMLoss(model)(**batch), model(**batch).loss)


def _head_case(dtype: torch.dtype, train_head: bool):
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 96, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(96, 16, generator=gen))
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(23, 16, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, 96, (23,), generator=gen)
    return head, hidden, targets


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_loss_equals_full_logits(monkeypatch, dtype, train_head):
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 96 * 5)  # 5 rows a chunk: 23 rows need 5 chunks
    head, hidden, targets = _head_case(dtype, train_head)
    expected = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
    expected.backward()
    grads = [hidden.grad.clone()] + ([head.weight.grad.clone()] if train_head else [])
    hidden.grad, head.weight.grad = None, None
    loss = head_loss(head, hidden, targets)
    (loss * 3).backward()  # the incoming gradient scales what forward stored
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(hidden.grad, 3 * grads[0], **tol)
    assert hidden.grad.dtype == dtype
    if train_head:  # the direct formula: the weight gets its gradient too
        torch.testing.assert_close(head.weight.grad, 3 * grads[1], **tol)
    else:
        assert head.weight.grad is None and loss.grad_fn.name().endswith("_ChunkedHeadLossBackward")
    with torch.no_grad():  # evaluation takes the chunked, gradient-free path
        torch.testing.assert_close(head_loss(head, hidden, targets), expected, **tol)


def test_chunked_head_never_builds_the_whole_logits(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 96 * 4)
    head, hidden, targets = _head_case(torch.float32, False)
    largest = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                largest.append(out.numel())
            return out

    with Watch():
        head_loss(head, hidden, targets).backward()
    assert 4 * 96 in largest  # chunks of 4 rows' logits ...
    assert max(largest) < 23 * 96  # ... and never all 23 rows' at once


def test_heads_that_are_not_plain_linear_use_the_direct_formula():
    head, hidden, targets = _head_case(torch.float32, False)
    wrapped = add_lora(torch.nn.Sequential(head), LoraConfig(target_modules=["0"], r=2, dropout=0.0))[0]
    torch.nn.init.normal_(wrapped.lora_B.weight, std=0.5)
    expected = torch.nn.functional.cross_entropy(wrapped(hidden).float(), targets)
    torch.testing.assert_close(head_loss(wrapped, hidden, targets), expected)
    assert not torch.allclose(expected, torch.nn.functional.cross_entropy(head(hidden), targets))


def test_chunked_head_loss_under_autocast_matches_the_direct_formula(monkeypatch):
    """Mixed precision (Accelerate's bf16) runs the head's matmuls in bfloat16 either way."""
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 96 * 5)
    head, hidden, targets = _head_case(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
    expected.backward()
    grad, hidden.grad = hidden.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(head, hidden, targets)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hidden.grad, grad, atol=2e-2, rtol=2e-2)
    assert hidden.grad.dtype == torch.float32


def test_length_batches_group_similar_lengths_within_limits():
    lengths = [30, 5, 60, 6, 7, 250, 8, 9, 31]
    budgeted = length_batches(lengths, batch_size=4, max_tokens=100)
    assert sorted(i for b in budgeted for i in b) == list(range(len(lengths)))  # every example once
    assert [[lengths[i] for i in b] for b in budgeted] == [[5, 6, 7, 8], [9, 30, 31], [60], [250]]
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in budgeted if len(b) > 1)
    assert [[lengths[i] for i in b] for b in length_batches(lengths, batch_size=4)] == \
        [[5, 6, 7, 8], [9, 30, 31, 60], [250]]


def test_validation_loss_is_the_mean_over_tokens_in_batches_of_similar_length():
    torch.manual_seed(0)
    model = add_lora(build("llama"), LoraConfig(target_modules="all-linear", dropout=0.0))
    wrapped = CausalLMLoss(model)
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 3, 14, 4, 12, 5):
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    total = count = 0.0
    for e in examples:  # one at a time: no padding at all
        batch = {"input_ids": torch.tensor([e["input_ids"]]), "attention_mask": torch.ones(1, len(e["input_ids"])),
                 "labels": torch.tensor([e["labels"]])}
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            total += wrapped(**batch).item() * n
        count += n
    widths = []
    wrapped.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    assert evaluate_loss(wrapped, examples, batch_size=2, pad_id=0, device="cpu") == pytest.approx(total / count, rel=1e-5)
    assert widths == [(2, 4), (2, 9), (2, 14)]  # sorted: 3 and 4, 5 and 9, 12 and 14 tokens


def _prefixed_rows(prefix: int, rows: int = 5) -> list[dict]:
    """Examples that start with the same ``prefix`` tokens, then a prompt tail and an
    answer of their own (different lengths)."""
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(3, 128, (prefix,), generator=gen)
    examples = []
    for i in range(rows):
        tail = torch.randint(3, 128, (4 + i,), generator=gen)
        answer = torch.randint(3, 128, (3 + 2 * i,), generator=gen)
        examples.append({"input_ids": torch.cat([shared, tail, answer]).tolist(),
                         "labels": [-100] * (prefix + len(tail)) + answer.tolist()})
    return examples


def test_a_shared_prefix_computed_once_gives_each_row_its_own_loss_and_gradients(arch, monkeypatch):
    model = add_lora(build(arch), LoraConfig(target_modules="all-linear", dropout=0.0))
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    examples = _prefixed_rows(33)  # 4 more rows × 33 tokens: worth sharing
    batch = collate(examples, 0)
    calls = []
    once = loss_module.hidden_after_prefix
    monkeypatch.setattr(loss_module, "hidden_after_prefix", lambda *a: calls.append(a[-1]) or once(*a))

    def loss_and_grads(share: bool):
        model.zero_grad()
        loss = CausalLMLoss(model, share_prefixes=share)(**batch)
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    separate, expected = loss_and_grads(False)
    assert calls == []
    shared, grads = loss_and_grads(True)
    assert calls == [33]
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4)
    # validation (no gradients) takes the same path
    assert evaluate_loss(CausalLMLoss(model), examples, 5, 0, "cpu") == pytest.approx(float(separate), abs=1e-5)
    assert calls == [33, 33]


def test_a_prefix_is_shared_only_where_it_is_exact_and_pays():
    from lorakit.prefix import shared_length

    batch = collate(_prefixed_rows(33, rows=6), 0)
    assert shared_length(**batch) == 33
    assert shared_length(**collate(_prefixed_rows(20), 0)) == 0  # 4 × 20 tokens saved: not worth a pass of its own
    labels = batch["labels"].clone()
    labels[2, 30] = 5  # one row trains on a token inside the prefix: the position before it is not shared
    assert shared_length(batch["input_ids"], batch["attention_mask"], labels) == 29
    ids = batch["input_ids"].clone()
    ids[4, 31] = 6  # one row differs at 31
    assert shared_length(ids, batch["attention_mask"], batch["labels"]) == 31
    short = collate(_prefixed_rows(33, rows=6) + [{"input_ids": list(range(3, 40)), "labels": [-100] * 37}], 0)
    assert shared_length(**short) == 0  # a row that shares nothing


def test_no_prefix_is_shared_where_computing_it_apart_could_change_it():
    """RoPE that picks its frequencies from the call's longest position (dynamic NTK,
    LongRoPE) would give a short prefix pass other keys; a sliding window counts cache slots."""
    from transformers import LlamaConfig, MistralConfig, MistralForCausalLM

    from lorakit.generation import _shared_prefix
    from lorakit.prefix import computed_alike

    mask = torch.ones(5, 60, dtype=torch.long)
    assert CausalLMLoss(build("llama")).may_share(mask)
    dynamic = build("llama")
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not CausalLMLoss(dynamic).may_share(mask)
    assert not computed_alike(LlamaConfig(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 32,
                                                           "long_factor": [2.0] * 32, "rope_theta": 1e4,
                                                           "original_max_position_embeddings": 1024}), 10)
    assert computed_alike(LlamaConfig(), 10)
    windowed = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                                sliding_window=48))
    assert CausalLMLoss(windowed).may_share(mask[:, :48]) and not CausalLMLoss(windowed).may_share(mask)
    prompts = [[5] * 30 + [6], [5] * 30 + [7, 8]]
    assert _shared_prefix(prompts, LlamaConfig(), 8) == 30
    assert _shared_prefix(prompts, dynamic.config, 8) == 0
