"""Quantized bases (torchao int8 on CPU): discovery finds the quantized projections, identity is
exact against the quantized model, router gradients flow, and LoRA + LIMe train on top (QLoRA-style)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchao import quantization

import limeify

from conftest import example_for, make_llama

CONFIGS = {"int8-weight-only": quantization.Int8WeightOnlyConfig, "int8-dynamic": quantization.Int8DynamicActivationInt8WeightConfig}


def _quantized(name):
    model = make_llama()
    quantization.quantize_(model, CONFIGS[name]())
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_limeify_a_quantized_base(name):
    base = _quantized(name)
    assert type(base.model.layers[0].self_attn.k_proj.weight) is not torch.nn.Parameter  # a tensor subclass
    x = example_for("llama")
    model = limeify.limeify(copy.deepcopy(base))
    assert [s.key.module for s in limeify.attention_sites(model)] == [f"model.layers.{i}.self_attn.k_proj" for i in range(3)]
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)
    limeify.mark_only_routers_trainable(model, verbose=False)
    with torch.no_grad():
        for w in limeify.router_parameters(model):
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(w.shape[1])) * 0.3)
        before = model(x).logits
    assert not torch.allclose(before, base(x).logits, atol=1e-4)
    if name == "int8-dynamic":
        return  # quantizing activations cuts autograd in every later projection: an inference-only base
    model(x, labels=x).loss.backward()
    grads = [w.grad for w in limeify.router_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_lora_and_routers_on_a_quantized_base():
    from peft import LoraConfig

    base = _quantized("int8-weight-only")
    x = example_for("llama")
    peft = limeify.get_lime_peft_model(copy.deepcopy(base), peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert torch.equal(peft(x).logits, base(x).logits)  # LoRA B = 0 and identity routers
    peft(x, labels=x).loss.backward()
    trained = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert any("lime_router" in n for n in trained) and any("lora_A" in n for n in trained)
    assert all(g is not None and torch.isfinite(g).all() for g in trained.values())
    assert any(g.abs().sum() > 0 for n, g in trained.items() if "lime_router" in n)
