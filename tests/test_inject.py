"""Injection on real (tiny) architectures: targets, roles, fused slices, trainable state."""

import pytest
import torch

from conftest import build, logits, randomize_lora
from lorakit import (
    LoraConfig,
    LoraError,
    LoRALinear,
    add_lora,
    count_parameters,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lorakit.inject import find_targets, lora_modules

# What roles q and v resolve to: (leaf name, slice roles) per architecture.
QV_TARGETS = {
    "llama": {("q_proj", ()), ("v_proj", ())},
    "qwen2": {("q_proj", ()), ("v_proj", ())},
    "mistral": {("q_proj", ()), ("v_proj", ())},
    "opt": {("q_proj", ()), ("v_proj", ())},
    "gpt2": {("c_attn", ("q", "v"))},
    "phi3": {("qkv_proj", ("q", "v"))},
    "gpt_neox": {("query_key_value", ("q", "v"))},
}


def test_roles_resolve_per_architecture(arch):
    targets = find_targets(build(arch), LoraConfig())
    assert len(targets) == 2 * len(QV_TARGETS[arch])  # two blocks
    assert {(n.rsplit(".", 1)[-1], tuple(s)) for n, s in targets.items()} == QV_TARGETS[arch]


@pytest.mark.parametrize("spec", [["q", "v"], ["q", "k", "v", "o"], "all-linear"])
def test_fresh_adapter_leaves_logits_unchanged(arch, ids, spec):
    base = build(arch)
    expected = logits(base, ids)
    add_lora(base, LoraConfig(target_modules=spec))
    assert torch.equal(logits(base, ids), expected)


def test_merged_equals_unmerged_and_unmerge_restores(arch, ids):
    model = build(arch)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    add_lora(model, LoraConfig(target_modules=["q", "k", "v", "o"]))
    randomize_lora(model)
    unmerged = logits(model, ids)
    assert not torch.allclose(unmerged, logits(build(arch), ids), atol=1e-4)
    merge_lora(model)
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-4)
    unmerge_lora(model)
    for name, module in lora_modules(model).items():
        w0 = weights[name + ".weight"]
        assert (module.base_layer.weight - w0).abs().max() <= 1e-6


def test_unload_gives_plain_model_with_original_keys(arch, ids):
    model = build(arch)
    keys = set(model.state_dict())
    add_lora(model, LoraConfig(target_modules="all-linear"))
    randomize_lora(model)
    expected = logits(model, ids)
    plain = unload_lora(model)
    assert not lora_modules(plain)
    assert set(plain.state_dict()) == keys
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-4)


def test_gradients_reach_only_adapters(arch, ids):
    model = build(arch).train()
    add_lora(model, LoraConfig(dropout=0.1))
    randomize_lora(model)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None) == is_lora, name
        if is_lora:
            assert param.grad.abs().sum() > 0, name


def test_bias_and_modules_to_save_train_too(ids):
    model = build("qwen2").train()  # Qwen2 q/k/v have biases
    add_lora(model, LoraConfig(bias="lora_only", modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in trainable
    assert "model.layers.0.self_attn.k_proj.bias" not in trainable
    assert "lm_head.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None

    everything = build("qwen2")
    add_lora(everything, LoraConfig(bias="all"))
    assert everything.model.layers[0].self_attn.k_proj.bias.requires_grad


def test_parameter_counts_follow_formula(arch):
    model = build(arch)
    _, total = count_parameters(model)
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable, total_after = count_parameters(model)
    expected = sum(
        m.r * len(m.slice_sizes) * m.in_features + m.r * sum(m.slice_sizes)
        for m in lora_modules(model).values()
    )
    assert trainable == expected > 0
    assert total_after == total + trainable


def test_slice_parameter_count_on_fused_qkv():
    model = build("gpt2")  # c_attn: 32 -> 96
    add_lora(model, LoraConfig(r=2, target_modules=["q", "v"]))
    trainable, _ = count_parameters(model)
    # per block: A (2 slices · r, 32) + B (2 slices · 32 rows, r)
    assert trainable == 2 * (2 * 2 * 32 + 2 * 32 * 2)


def _qkv(arch, model, ids):
    """Query, key and value states of block 0 as each architecture splits them."""
    captured = {}
    layer = {"gpt2": lambda m: m.transformer.h[0].attn.c_attn,
             "phi3": lambda m: m.model.layers[0].self_attn.qkv_proj,
             "gpt_neox": lambda m: m.gpt_neox.layers[0].attention.query_key_value}[arch](model)
    handle = layer.register_forward_hook(lambda mod, inp, out: captured.setdefault("out", out))
    logits(model, ids)
    handle.remove()
    out, cfg = captured["out"], model.config
    if arch == "gpt2":
        return out.split(cfg.n_embd, dim=-1)
    if arch == "phi3":
        hd = cfg.hidden_size // cfg.num_attention_heads
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        return out[..., :q], out[..., q:q + kv], out[..., q + kv:]
    heads = cfg.num_attention_heads
    return out.view(*out.shape[:-1], heads, -1).chunk(3, dim=-1)


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gpt_neox"])
def test_fused_slices_touch_only_their_projection(arch, ids):
    base = build(arch)
    q0, k0, v0 = _qkv(arch, base, ids)
    add_lora(base, LoraConfig(target_modules=["q", "v"]))
    randomize_lora(base)
    q1, k1, v1 = _qkv(arch, base, ids)
    assert torch.equal(k1, k0)
    assert not torch.allclose(q1, q0) and not torch.allclose(v1, v0)


def test_names_regex_and_layers():
    model = build("llama")
    by_name = find_targets(model, LoraConfig(target_modules=["down_proj", "self_attn.o_proj"]))
    assert sorted(by_name) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.o_proj")]
    regex = find_targets(model, LoraConfig(target_modules=r"model\.layers\.1\..*_proj"))
    assert len(regex) == 7 and all(".layers.1." in n for n in regex)
    only_one = find_targets(model, LoraConfig(layers=[1]))
    assert sorted(only_one) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    head = find_targets(model, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in head and len(head) == 14


def test_no_match_lists_linear_layers():
    with pytest.raises(LoraError) as err:
        add_lora(build("gpt2"), LoraConfig(target_modules=["q_prj"]))
    message = str(err.value)
    assert "'q_prj'" in message and "c_attn" in message and "c_fc" in message
    with pytest.raises(LoraError, match=r"lora.layers \[7\] do not exist in LlamaForCausalLM: its blocks are 0-1"):
        add_lora(build("llama"), LoraConfig(layers=[7]))


def test_partial_spec_typo_is_an_error():
    with pytest.raises(LoraError, match="'v_prj'"):
        add_lora(build("llama"), LoraConfig(target_modules=["q_proj", "v_prj"]))


def test_double_injection_is_refused():
    model = add_lora(build("llama"), LoraConfig())
    with pytest.raises(LoraError, match="already has LoRA"):
        add_lora(model, LoraConfig())


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    for bad in ({"r": 0}, {"alpha": -1}, {"dropout": 1.0}, {"target_modules": []},
                {"target_modules": "("}, {"bias": "some"}, {"rank": 4}):
        with pytest.raises(ValidationError):
            LoraConfig(**bad)


def test_wrappers_are_lora_linear_at_original_paths():
    model = add_lora(build("llama"), LoraConfig())
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    names = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names


def test_remove_lora_restores_the_base(ids):
    model = build("gpt2")
    expected = logits(model, ids)
    add_lora(model, LoraConfig(target_modules="all-linear"))
    randomize_lora(model)
    merge_lora(model)  # removal must take a merged update back out too
    from lorakit.inject import remove_lora

    remove_lora(model)
    assert not lora_modules(model) and not hasattr(model, "lorakit_config")
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    add_lora(model, LoraConfig())  # a fresh adapter can go on again


def _without_shared_inputs(model):
    for module in lora_modules(model).values():
        module.shared_input = None
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt", "phi3"])
def test_shared_input_groups_equal_separate_projections(arch, ids):
    """q/k/v (and gate/up) compute A·x together; loss and every gradient match the plain formula."""
    import copy

    grouped = build(arch)  # eval: OPT's own dropout would differ between the two; grads still flow
    add_lora(grouped, LoraConfig(target_modules="all-linear", dropout=0.1))  # dropout: grouped
    randomize_lora(grouped)
    plain = _without_shared_inputs(copy.deepcopy(grouped))
    groups = {id(m.shared_input) for m in lora_modules(grouped).values() if m.shared_input is not None}
    assert len(groups) == {"phi3": 0, "opt": 2}.get(arch, 4)  # per block: attention (+ MLP gate/up)
    undropped = add_lora(build(arch), LoraConfig(target_modules="all-linear", dropout=0.0))
    assert all(m.shared_input is None for m in lora_modules(undropped).values())  # nothing to share
    losses = [m(input_ids=ids, labels=ids).loss for m in (grouped, plain)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(grouped.named_parameters(), plain.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_input_members_share_one_dropout_mask():
    layer_q, layer_v = (LoRALinear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.5) for _ in range(2))
    from lorakit.lora import SharedInput

    layer_q.shared_input = layer_v.shared_input = SharedInput([layer_q, layer_v])
    for layer in (layer_q, layer_v):
        layer.train()
        torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    torch.manual_seed(5)
    from lorakit.fastpath import dropout

    dropped = dropout(x, 0.5)
    torch.manual_seed(5)
    outputs = [layer_q(x), layer_v(x)]
    for layer, out in zip((layer_q, layer_v), outputs):
        expected = layer.base_layer(x) + layer.scaling * dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T
        torch.testing.assert_close(out, expected)
    # a member that runs again, or on another input, gets its own projection, never a stale one
    y = torch.randn(3, 16)
    for layer in (layer_q, layer_q):
        layer.eval()
        with torch.enable_grad():
            expected = layer.base_layer(y) + layer.scaling * y @ layer.lora_A.weight.T @ layer.lora_B.weight.T
            torch.testing.assert_close(layer(y), expected)


def test_hooks_on_a_base_layer_still_run(ids):
    """The adapter applies a plain base's weight directly, unless the base has hooks."""
    model = add_lora(build("llama"), LoraConfig(dropout=0.0))
    base = lora_modules(model)["model.layers.0.self_attn.q_proj"].base_layer
    seen = []
    base.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(input_ids=ids)
    assert seen == [torch.Size([*ids.shape, base.out_features])]
