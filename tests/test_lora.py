"""The maths of one LoRA layer: identity at init, merge/unmerge, gradients, counts."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraError, LoRALinear


def _layer(d_in=16, d_out=12, r=4, **kw) -> LoRALinear:
    return LoRALinear(nn.Linear(d_in, d_out), r=r, alpha=8, **kw)


def test_fresh_adapter_is_identity():
    layer = _layer()
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0


def test_forward_is_base_plus_scaled_BA():
    layer = _layer()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    W = layer.base_layer.weight
    expected = x @ (W + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).T + layer.base_layer.bias
    assert layer.scaling == 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16)])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("hooked", [False, True])
def test_every_forward_path_is_the_formula(shape, grad, hooked):
    # A bare base takes the fast path (B·a accumulated in place into the base's output);
    # a hooked one is called as a module and gets an out-of-place sum.
    layer = _layer()
    nn.init.normal_(layer.lora_B.weight)
    if hooked:
        layer.base_layer.register_forward_hook(lambda module, args, out: out)
    x = torch.randn(*shape, requires_grad=True)
    W, A, B = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + layer.base_layer.bias + 2.0 * (x @ A.T) @ B.T
    with torch.set_grad_enabled(grad):
        out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.shape == expected.shape
    if grad:
        g = torch.randn_like(expected)
        want = torch.autograd.grad(expected, (x, A, B), g)
        got = torch.autograd.grad(out, (x, A, B), g)
        for w, h in zip(want, got):
            torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_dropout_follows_training_mode_not_autograd(grad):
    # Dropout belongs to train mode, with or without autograd (a no-grad forward of a
    # training model, as some evaluation loops run, still drops); eval mode never drops.
    layer = _layer(dropout=1.0)  # every adapter input dropped: the update vanishes
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    W, A, B = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    with torch.set_grad_enabled(grad):
        layer.train()
        torch.testing.assert_close(layer(x), layer.base_layer(x))
        layer.eval()
        expected = x @ W.T + layer.base_layer.bias + 2.0 * (x @ A.T) @ B.T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bf16 base", "autocast"])
def test_mixed_precision_forward_is_the_formula(mode):
    # float32 adapters beside a bfloat16 base, or under autocast: the in-place path must
    # step aside (its dtypes differ) and the sum come back in the base's dtype.
    layer = _layer()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    W, A, B = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + layer.base_layer.bias + 2.0 * (x @ A.T) @ B.T
    if mode == "bf16 base":
        layer.base_layer.to(torch.bfloat16)
        out = layer(x.bfloat16())
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert A.grad.dtype == B.grad.dtype == torch.float32 and A.grad.abs().sum() > 0


def test_rslora_scaling():
    assert _layer(r=4, use_rslora=True).scaling == 8 / math.sqrt(4)
    assert _layer(r=4).scaling == 8 / 4


def test_merge_with_hand_set_weights():
    layer = LoRALinear(nn.Linear(3, 2, bias=False), r=1, alpha=2)  # scaling 2
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 0.0, 2.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [3.0]]))
    layer.merge()
    expected = torch.tensor([[2.0, 0.0, 4.0], [6.0, 0.0, 12.0]])
    assert torch.equal(layer.base_layer.weight, expected)


@pytest.mark.parametrize("shape", [(16,), (4, 16), (2, 3, 16)])
def test_merge_unmerge_roundtrip_and_idempotence(shape):
    layer = _layer()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(*shape)
    before = layer(x)
    assert before.shape == (*shape[:-1], 12)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    layer.merge()  # no double add
    assert layer.merged
    assert layer(x).shape == before.shape
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight(), atol=1e-6, rtol=0)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_merge_refuses_nan():
    layer = _layer()
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    with pytest.raises(LoraError, match="NaN"):
        layer.merge()
    assert not layer.merged


def test_gaussian_init_std():
    layer = LoRALinear(nn.Linear(4096, 8), r=4, alpha=4, init="gaussian")
    assert abs(layer.lora_A.weight.std().item() - 1 / 4) < 0.01


def test_unknown_init_is_an_error():
    for init in ("svd", "pissa_niter_x"):
        with pytest.raises(LoraError, match="unknown LoRA init"):
            _layer(init=init)


def test_conv1d_fan_in_fan_out():
    conv = Conv1D(12, 16)  # (d_in=16, d_out=12), weight stored as (16, 12)
    layer = LoRALinear(conv, r=4, alpha=8, fan_in_fan_out=True)
    assert (layer.in_features, layer.out_features) == (16, 12)
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (12, 4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_dropout_zero_never_calls_dropout(monkeypatch):
    import lorakit.fastpath

    def boom(*a, **k):
        raise AssertionError("dropout called")

    monkeypatch.setattr(lorakit.fastpath._Draw, "new", boom)
    layer = _layer(dropout=0.0).train()
    layer(torch.randn(2, 16))  # no call
    with pytest.raises(AssertionError, match="dropout called"):
        _layer(dropout=0.1).train()(torch.randn(2, 16))


def test_dropout_only_in_training():
    layer = _layer(dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_slices_write_only_their_rows():
    rows = [torch.arange(0, 4), torch.arange(8, 12)]  # q and v of a fused [q|k|v] of 12
    layer = LoRALinear(nn.Linear(16, 12), r=2, alpha=4, out_slices=rows)
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (8, 2)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    diff = (layer(x) - layer.base_layer(x)).abs().sum((0, 1))
    assert torch.all(diff[4:8] == 0) and torch.all(diff[:4] > 0) and torch.all(diff[8:] > 0)
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[4:8]) == 0
    # Each slice's block is its own B_i·A_i: slice 0 never sees slice 1's A rows.
    expected_v = layer.scaling * layer.lora_B.weight[4:] @ layer.lora_A.weight[2:]
    torch.testing.assert_close(delta[8:], expected_v)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("d_in", "d_out", "r", "expected"), [(100, 100, 1, 200), (512, 64, 8, 4608)])
def test_parameter_count_formula(d_in, d_out, r, expected):
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=r)
    n = sum(p.numel() for p in (layer.lora_A.weight, layer.lora_B.weight))
    assert n == expected == r * (d_in + d_out)
    if (d_in, d_out) == (512, 64):
        assert round(1 - n / (d_in * d_out), 2) == 0.86  # the seeds' 86% reduction


@pytest.mark.parametrize("p", [0.05, 0.15, 0.5])  # drops drawn where they fall, up to 0.15; a draw each above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_is_inverted_dropout_at_rate_p(p, dtype):
    from lorakit.fastpath import dropout

    x = torch.ones(1000, 1000, dtype=dtype, requires_grad=True)
    out = dropout(x, p)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 5e-3  # 1e6 draws: sd 2e-4 at p=0.5
    assert torch.allclose(out[kept].float(), torch.tensor(1 / (1 - p)), rtol=1e-2)  # survivors scaled
    out.float().sum().backward()
    assert torch.equal(x.grad != 0, kept)  # gradient flows through the same mask
    assert not torch.equal(dropout(x, p), dropout(x, p))  # a new mask each call


@pytest.mark.parametrize("p", [0.001, 0.05, 0.1, 0.3])
def test_dropout_drops_each_element_independently(p):
    """The drop rate holds in every part of the mask, and runs of kept elements between
    drops are geometric, as independent drops make them (mean 1/p - 1, variance (1-p)/p²)."""
    from lorakit.fastpath import _FEW_DROPS, _drops, _keep_mask

    def keep_mask(n: int, seed: int) -> torch.Tensor:  # up to _FEW_DROPS dropout keeps the drops' positions
        if p > _FEW_DROPS:
            return _keep_mask(torch.empty(n), p, seed)
        return torch.ones(n).index_fill_(0, _drops(n, p, seed), 0)

    n = 2_000_000
    keep = keep_mask(n, seed=7)
    for part in keep.chunk(4):  # the end of the mask as well as its start
        assert abs(1 - part.mean().item() - p) < 6 * (p * (1 - p) / len(part)) ** 0.5
    drops = torch.nonzero(keep == 0).squeeze(1)
    runs = (drops[1:] - drops[:-1] - 1).double()
    assert abs(runs.mean().item() - (1 / p - 1)) < 6 * runs.std().item() / len(runs) ** 0.5
    assert abs(runs.var().item() / ((1 - p) / p**2) - 1) < 0.25
    assert torch.equal(keep, keep_mask(n, seed=7))  # the seed fixes the mask


@pytest.mark.parametrize("p", [0.05, 0.3])  # the drops kept for backward; the seed redrawn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_down_is_dropout_then_down_projection(dtype, p):
    """Forward and both gradients equal ``dropout(x)·Aᵀ`` through autograd with the same mask."""
    from lorakit.fastpath import dropout, dropped_down

    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    A = torch.randn(6, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(64, 6, dtype=dtype)
    torch.manual_seed(3)
    out = dropped_down(x, A, p)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), A.grad.clone())
    x.grad = A.grad = None
    torch.manual_seed(3)  # the same seed draws the same mask
    expected = dropout(x, p) @ A.t()
    expected.backward(grad)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    for a, b in zip(got, (expected.detach(), x.grad, A.grad)):
        torch.testing.assert_close(a, b, **tol)
    assert 0 < (x.grad == 0).float().mean() < 0.6  # dropped inputs get no gradient


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_keeps_no_mask_for_backward(p):
    """Neither dropout nor the adapter's down-projection keeps a mask for backward: up to a
    rate of 0.15 they keep the dropped positions (int32, about p·n of them), above it only
    the seed the mask is redrawn from. The down-projection keeps its dropped input in place
    of x: one x-sized tensor either way."""
    from lorakit.fastpath import dropout, dropped_down

    x = torch.randn(256, 64, requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True)

    def saved_by(fn) -> list[torch.Tensor]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return [t for t in saved if t is not None]

    def is_drops(t: torch.Tensor) -> bool:
        return t.dtype == torch.int32 and abs(t.numel() - p * x.numel()) < 6 * (p * x.numel()) ** 0.5

    of_dropout, of_down = saved_by(lambda: dropout(x, p)), saved_by(lambda: dropped_down(x, A, p))
    assert sum(t.numel() for t in of_down if t.is_floating_point()) == x.numel() + A.numel()
    kept = next(t for t in of_down if t.shape == x.shape)
    assert not torch.equal(kept, x) and torch.equal(kept[kept != 0], x.detach()[kept != 0])
    expected_drops = 0 if p > 0.15 else 1
    assert len(of_dropout) == sum(map(is_drops, of_dropout)) == expected_drops
    assert len(of_down) - 2 == sum(map(is_drops, of_down)) == expected_drops


def test_dropout_beyond_int32_positions_keeps_int64(monkeypatch):
    """A tensor too large for int32 positions keeps them as int64 (the limit lowered to test it)."""
    import lorakit.fastpath
    from lorakit.fastpath import dropped_down

    monkeypatch.setattr(lorakit.fastpath, "_INT32_INDICES", 100)
    x = torch.randn(64, 48, requires_grad=True)
    A = torch.randn(6, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(3)
        out = dropped_down(x, A, 0.05)
    assert [t.dtype for t in saved if t is not None and not t.is_floating_point()] == [torch.int64]
    out.sum().backward()
    dropped = x.grad == 0
    assert 0 < dropped.float().mean() < 0.15
    monkeypatch.setattr(lorakit.fastpath, "_INT32_INDICES", 2**31)
    torch.manual_seed(3)  # the same draw with int32 positions: the same result
    assert torch.equal(dropped_down(x, A, 0.05), out)
