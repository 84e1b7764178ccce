"""The sparse-head loss equals transformers' full-logits loss, value and gradients."""

import torch

from conftest import build
from lorakit import LoraConfig, add_lora
from lorakit.inject import lora_modules
from lorakit.loss import CausalLMLoss, supports_sparse_head


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
