"""Smaller activations for backward with the same outputs (lorakit.activation_memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import build
from torch import nn

from lorakit.activation_memory import keep_less, rms_norm, silu_mul

RMS_ARCHS = ["llama", "qwen2", "mistral", "phi3"]


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "RMSNorm" in type(m).__name__]


@pytest.mark.parametrize("arch", RMS_ARCHS)
def test_switched_norms_give_the_models_output_to_the_bit(arch):
    model = build(arch).to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    switched = keep_less(model)
    assert switched["rms_norm"] == len(_norms(model)) == 5  # two per block, one final
    assert switched["silu_mul"] == (0 if arch == "phi3" else 2)  # Phi-3 fuses gate and up in one layer
    assert torch.equal(model(input_ids=ids).logits, before)


def test_gradients_as_close_to_float64_as_transformers_and_float32_kept_nowhere():
    model = build("llama").to(torch.bfloat16)
    norm = _norms(model)[0]
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
    norm.weight.requires_grad_(True)
    x = (torch.randn(4, 7, norm.weight.numel(), generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def grads(fn, dtype):
        xi = x.to(dtype, copy=True).requires_grad_(True)
        w = norm.weight.detach().to(dtype, copy=True).requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(xi, w)
        out.backward(grad.to(dtype))
        return xi.grad.double(), w.grad.double(), saved

    def theirs(xi, w):
        wide = xi.to(torch.float32)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return w * normed.to(xi.dtype)

    ref_x, ref_w, _ = grads(lambda xi, w: w * (xi * torch.rsqrt(xi.pow(2).mean(-1, keepdim=True)
                                                                + norm.variance_epsilon)), torch.float64)
    hf_x, hf_w, hf_saved = grads(theirs, torch.bfloat16)
    our_x, our_w, our_saved = grads(lambda xi, w: rms_norm(xi, w, norm.variance_epsilon), torch.bfloat16)
    assert (our_x - ref_x).abs().max() <= 1.5 * (hf_x - ref_x).abs().max()
    assert (our_w - ref_w).abs().max() <= 1.5 * (hf_w - ref_w).abs().max()
    wide = [t for t in hf_saved if t.dtype == torch.float32 and t.shape == x.shape]
    assert wide  # transformers keeps a float32 copy of the input ...
    assert not [t for t in our_saved if t.dtype == torch.float32 and t.shape == x.shape]  # ... lorakit does not


def test_norms_it_cannot_reproduce_keep_their_own_code():
    class OffsetRMSNorm(nn.Module):  # Gemma's formula: the weight is an offset from 1
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(8, dtype=torch.bfloat16)), 1e-6

        def forward(self, x):
            wide = x.float()
            return ((wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)) * (1 + self.weight.float())
                    ).to(x.dtype)

    assert keep_less(nn.Sequential(OffsetRMSNorm())) == {"rms_norm": 0, "silu_mul": 0}
    # float32: transformers' norm keeps nothing extra; the MLP's saving holds in any dtype
    assert keep_less(build("llama")) == {"rms_norm": 0, "silu_mul": 2}
    assert keep_less(build("gpt2").to(torch.bfloat16)) == {"rms_norm": 0, "silu_mul": 0}  # LayerNorm, GELU MLP


def test_silu_mul_gradients_equal_autograds_to_the_bit_and_keep_two_tensors():
    gen = torch.Generator().manual_seed(3)
    gate, up, grad = (torch.randn(4, 6, 16, generator=gen).to(torch.bfloat16) for _ in range(3))

    def run(fn):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(g, u)
        out.backward(grad)
        return out, g.grad, u.grad, {t.data_ptr() for t in saved}

    theirs, ours = run(lambda g, u: torch.nn.functional.silu(g) * u), run(silu_mul)
    for a, b in zip(theirs[:3], ours[:3]):
        assert torch.equal(a, b)
    assert len(theirs[3]) == 3 and len(ours[3]) == 2  # gate, silu(gate), up against gate, up


def test_bfloat16_training_switches_norms_and_mlps(tmp_path, tiny_model_dir, monkeypatch):
    """Training in bfloat16 runs on the switched modules, with the losses of transformers' own."""
    from conftest import tiny_config

    from lorakit import train as train_module
    from lorakit.config import validate_config

    raw = tiny_config(tmp_path, tiny_model_dir, max_steps=3)
    raw["model"]["dtype"] = "bfloat16"
    counts = []
    real = train_module.keep_less
    monkeypatch.setattr(train_module, "keep_less", lambda model: counts.append(real(model)) or counts[-1])
    ours = train_module.train(validate_config(raw, "test"))
    raw["training"]["output_dir"] = str(tmp_path / "theirs")
    monkeypatch.setattr(train_module, "keep_less", lambda model: {})
    theirs = train_module.train(validate_config(raw, "test"))
    assert counts == [{"rms_norm": 5, "silu_mul": 2}]
    losses = [[r["loss"] for r in result.history if "loss" in r] for result in (ours, theirs)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=2e-2)


def test_switched_norms_survive_train_and_eval(tiny_model_dir):
    """With the ``kernels`` package installed, transformers re-swaps its layers at every
    train() and eval(), which would quietly drop lorakit's norms: lorakit loads with
    transformers' hub kernels off."""
    from lorakit.config import ModelConfig
    from lorakit.model import load_model

    model = load_model(ModelConfig(name_or_path=tiny_model_dir, dtype="bfloat16"))
    assert keep_less(model)["rms_norm"] == 5
    model.train()
    model.eval()
    model.train()
    norms = _norms(model)
    x = torch.randn(2, 3, norms[0].weight.numel(), dtype=torch.bfloat16, requires_grad=True)
    assert [type(norm(x).grad_fn).__name__ for norm in norms] == ["_RMSNormBackward"] * 5
