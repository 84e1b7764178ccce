"""The bfloat16 CPU attention backward: the same gradients as torch's fused kernel, to its precision."""

from __future__ import annotations

import pytest
import torch

from conftest import BUILDERS, build
from lorakit import attention as attn


def _inputs(heads=4, kv_heads=2, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, heads, length, 16, generator=gen)
    k = torch.randn(3, kv_heads, length, 16, generator=gen)
    v = torch.randn(3, kv_heads, length, 16, generator=gen)
    return q, k, v


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _grads(fn, q, k, v, mask, dtype, upstream):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, _ = fn(_Module(), *leaves, mask, scaling=0.25)
    out.backward(upstream.to(dtype))
    return out.float(), [t.grad.float() for t in leaves]


def _right_padded(lengths, length):
    keys = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return (torch.ones(length, length, dtype=torch.bool).tril()[None] & keys[:, None, :])[:, None]


MASKS = {
    "causal (no mask)": lambda n: None,
    "padding": lambda n: _right_padded([n, n - 3, n - 7], n),
    "float additive": lambda n: torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9)[None, None],
    "a row that sees nothing": lambda n: _right_padded([n, n, n], n).clone().index_fill_(2, torch.tensor([0]), False),
}


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("block_bytes", [32 << 20, 3 * 4 * 4 * 12 * 5])  # one block of rows, or blocks of 5 rows
def test_gradients_match_the_fused_kernel_to_its_precision(monkeypatch, mask_name, block_bytes):
    monkeypatch.setattr(attn, "_BLOCK_BYTES", block_bytes)
    q, k, v = _inputs()
    mask = MASKS[mask_name](q.shape[2])
    upstream = torch.randn(3, q.shape[2], 4, 16, generator=torch.Generator().manual_seed(1))
    if mask_name == "a row that sees nothing":
        upstream[:, 0] = 0  # the fused kernel's output there is not defined; only its gradient is
    _assert_like_the_fused_kernel(q, k, v, mask, upstream)


def _assert_like_the_fused_kernel(q, k, v, mask, upstream):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _, exact = _grads(sdpa_attention_forward, q.double(), k.double(), v.double(), mask, torch.float64, upstream)
    fused_out, fused = _grads(sdpa_attention_forward, q, k, v, mask, torch.bfloat16, upstream)
    ours_out, ours = _grads(attn.attention, q, k, v, mask, torch.bfloat16, upstream)
    assert torch.equal(ours_out.nan_to_num(), fused_out.nan_to_num())  # the forward is torch's own
    for name, e, f, o in zip("qkv", exact, fused, ours):
        assert torch.isfinite(o).all(), name
        scale = e.abs().max()
        assert (o - e).abs().max() <= 2 * max((f - e).abs().max(), 1e-2 * scale), name


def test_queries_after_a_shared_prefix_get_the_same_gradients(monkeypatch):
    """Rows after a cached prefix (lorakit.prefix): 12 queries, 5 more keys before them."""
    monkeypatch.setattr(attn, "_BLOCK_BYTES", 3 * 4 * 4 * 17 * 5)  # blocks of 5 query rows
    q, _, _ = _inputs(length=12)
    _, k, v = _inputs(length=17, seed=2)
    own = torch.arange(12)[None, :] < torch.tensor([12, 9, 5])[:, None]  # right padding of each row's own tokens
    keys = torch.cat([torch.ones(3, 5, dtype=torch.bool), own], 1)
    mask = (torch.ones(12, 17, dtype=torch.bool).tril(5)[None] & keys[:, None, :])[:, None]
    upstream = torch.randn(3, 12, 4, 16, generator=torch.Generator().manual_seed(1))
    leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    assert _uses_ours(attn.attention(_Module(), *leaves, mask)[0])
    _assert_like_the_fused_kernel(q, k, v, mask, upstream)


@pytest.mark.parametrize("compiling", [False, True])
def test_other_cases_are_torch_attention_itself(monkeypatch, compiling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    q, k, v = _inputs()
    cases = [(torch.float32, True), (torch.bfloat16, False)] + ([(torch.bfloat16, True)] if compiling else [])
    for dtype, grad in cases:
        leaves = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        ours, _ = attn.attention(_Module(), *leaves, None)
        theirs, _ = sdpa_attention_forward(_Module(), *leaves, None)
        assert torch.equal(ours, theirs)
        assert not _uses_ours(ours)


def _uses_ours(out: torch.Tensor) -> bool:
    """Whether lorakit's attention backward is in ``out``'s graph."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_AttentionBackward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def test_training_in_bfloat16_on_the_cpu_uses_ours():
    leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in _inputs()]
    assert _uses_ours(attn.attention(_Module(), *leaves, None)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt", "gpt2"])
def test_a_model_trains_alike_with_it(arch):
    """Loss and input gradients of a bfloat16 model, switched or not."""
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    runs = []
    for switch in (False, True):
        model = build(arch).to(torch.bfloat16)
        if switch:
            attn.use_fast_backward(model, "cpu", torch.bfloat16)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        runs.append((out.loss.float(), embeds.grad.float()))
    (loss0, grad0), (loss1, grad1) = runs
    assert torch.equal(loss0, loss1)  # the forward is unchanged
    assert (grad0 - grad1).abs().max() <= 0.05 * grad0.abs().max()


def test_models_on_another_attention_are_left_alone():
    model = BUILDERS["llama"]()
    model.set_attn_implementation("eager")
    attn.use_fast_backward(model, "cpu", torch.bfloat16)
    assert model.config._attn_implementation == "eager"


def test_training_on_the_cpu_in_bfloat16_uses_it(tmp_path, tiny_model_dir):
    from lorakit.config import validate_config
    from lorakit.train import train
    from conftest import tiny_config

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=2)
    raw["model"]["dtype"] = "bfloat16"
    seen = []
    original = attn._Attention.backward

    def spy(ctx, grad):
        seen.append(grad.dtype)
        return original(ctx, grad)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(attn._Attention, "backward", staticmethod(spy))
        train(validate_config(raw, "test"))
    assert seen and all(d == torch.bfloat16 for d in seen)
