"""targets, inspect, data preview and the training-health guards."""

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import BUILDERS, build, byte_tokenizer, randomize_lora, tiny_config
from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.adapter_report import effective_rank, inspect_adapter, spectrum
from lorakit.cli import app
from lorakit.config import validate_config
from lorakit.inject import lora_modules
from lorakit.targets import describe_targets, layers, parse_spec, skeleton
from lorakit.train import TrainingError, train

runner = CliRunner()


@pytest.fixture
def gpt2_dir(tmp_path):
    BUILDERS["gpt2"]().save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2")


def test_targets_groups_layers_by_role_without_weights(tiny_model_dir, gpt2_dir):
    tree = skeleton(tiny_model_dir)
    assert all(p.is_meta for p in tree.parameters())
    roles = {layer.role for layer in layers(tree)}
    assert roles == {"attention q", "attention k", "attention v", "attention o", "mlp", "head"}
    assert {layer.role for layer in layers(skeleton(gpt2_dir))} >= {"fused qkv", "attention o", "mlp", "head"}
    found = describe_targets(tiny_model_dir, "q,v", r=4)
    added = sum(t.params for t in found.plan.values())
    assert len(found.plan) == 4 and added == 2 * (4 * (64 + 64) + 4 * (64 + 32)) and found.total > added
    # the plan counts exactly the parameters add_lora creates
    real = add_lora(skeleton(tiny_model_dir), LoraConfig(r=4, target_modules=["q", "v"]))
    assert added == sum(p.numel() for m in lora_modules(real).values() for p in (m.lora_A.weight, m.lora_B.weight))


def test_targets_command(gpt2_dir):
    result = runner.invoke(app, ["targets", gpt2_dir, "--target-modules", "q,v", "--r", "2"])
    assert result.exit_code == 0, result.output
    assert "fused qkv" in result.output and "c_attn" in result.output
    assert "2 of them on fused-qkv slices" in result.output
    bad = runner.invoke(app, ["targets", gpt2_dir, "--target-modules", "q_prj"])
    assert bad.exit_code == 2 and "c_attn" in bad.output


def test_parse_spec():
    assert parse_spec("q,v") == ["q", "v"] and parse_spec("all-linear") == "all-linear"
    assert parse_spec(r".*\.layers\.0\..*") == r".*\.layers\.0\..*" and parse_spec("q_proj") == ["q_proj"]


def test_spectrum_is_exact_from_thin_factors():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=gen), torch.randn(30, 6, generator=gen)
    expected = torch.linalg.svdvals((2.5 * B @ A).double())
    torch.testing.assert_close(spectrum(A, B, 2.5), expected[:6])
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0]), 0.9) == 1
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.99) == 4


def _distilled_rank2_adapter(path):
    """An r=16 adapter trained to reproduce a known rank-2 update."""
    model = add_lora(build("llama"), LoraConfig(r=16, alpha=16, target_modules=["q_proj"], layers=[0], dropout=0))
    layer = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(32, 2, generator=gen) @ torch.randn(2, 32, generator=gen) * 0.3
    opt = torch.optim.Adam([layer.lora_A.weight, layer.lora_B.weight], lr=1e-2)
    for _ in range(400):
        x = torch.randn(64, 32, generator=gen)
        loss = ((layer(x) - layer.base_layer(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, path)
    return target


def test_inspect_finds_the_rank_an_adapter_really_used(tmp_path):
    target = _distilled_rank2_adapter(tmp_path / "a")
    report = inspect_adapter(tmp_path / "a")
    (module,) = report.modules
    assert module.r == 16 and module.shape == (32, 32)
    assert module.rank90 == 2 and module.rank99 == 2
    assert report.recommended_rank == 2
    assert module.singular_values[:2] == pytest.approx(torch.linalg.svdvals(target).tolist()[:2], rel=0.05)


def test_inspect_command_checks_against_a_base(tmp_path, tiny_model_dir, gpt2_dir):
    model = add_lora(build("llama"), LoraConfig(r=4))
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    result = runner.invoke(app, ["inspect", str(tmp_path / "a"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "adapter_model.safetensors" in result.output and "rank@90%" in result.output
    assert (tmp_path / "p.png").stat().st_size > 1000
    wrong = runner.invoke(app, ["inspect", str(tmp_path / "a"), "--base", gpt2_dir])
    assert wrong.exit_code == 2 and "does not fit" in wrong.output and "q_proj" in wrong.output


def test_data_preview_highlights_and_warns(tiny_model_dir, tmp_path):
    raw = tiny_config(tmp_path, tiny_model_dir)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["data", "preview", str(path), "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "example 1" in result.output and "carry loss" in result.output and "warning" not in result.output
    cut = runner.invoke(app, ["data", "preview", str(path), "--set", "data.max_length=5"])
    assert "EOS token never carries loss" in cut.output and "64 rows are cut at max_length" in cut.output
    gone = runner.invoke(app, ["data", "preview", str(path), "--set", "data.max_length=4"])
    assert "64 of 64 examples had no trained token left" in gone.output
    everything = runner.invoke(app, ["data", "preview", str(path), "--set", "data.train_on_prompt=true"])
    assert "100% of tokens carry loss" in everything.output


def test_training_stops_when_an_adapter_gets_no_gradient(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.train as train_module

    real = train_module.load_model

    def load(cfg, device):
        model = real(cfg, device)
        q = model.model.layers[0].self_attn
        q.register_forward_hook(lambda mod, args, out: (out[0].detach(), *out[1:]))  # cut block 0's attention off
        return model

    monkeypatch.setattr(train_module, "load_model", load)
    with pytest.raises(TrainingError, match=r"2 of 4 adapted layers received no gradient .*layers\.0\.self_attn"):
        train(validate_config(tiny_config(tmp_path, tiny_model_dir), "test"))
