"""Models dispatched by accelerate with weights offloaded to disk (a device map mixing "cpu" and "disk").

The reference is the same base, not dispatched, limeified with the same router weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import limeify
from limeify import LimeError

from conftest import example_for, make_llama

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture
def ckpt(tmp_path):
    base = make_llama()
    base.save_pretrained(tmp_path / "ckpt")
    return base, tmp_path


def _dispatched(tmp_path, name):
    model = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=DEVICE_MAP, offload_folder=tmp_path / name).eval()
    assert model.model.layers[2].self_attn.k_proj.weight.is_meta  # really offloaded
    return model


def _same_routers(model, reference, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (layer, r), (_, ref) in zip(limeify.routers(model).items(), limeify.routers(reference).items()):
            noise = torch.randn(ref.weight.shape, generator=g) * 0.3
            ref.weight.add_(noise)
            r.weight.add_(noise)


def test_limeify_a_dispatched_offloaded_model(ckpt):
    base, tmp_path = ckpt
    x = example_for("llama")
    model = limeify.limeify(_dispatched(tmp_path, "offload"))
    assert [s.layer for s in limeify.attention_sites(model)] == [0, 1, 2]  # offloaded layers traced too
    assert all(not p.is_meta for r in limeify.routers(model).values() for p in r.parameters())
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)
    reference = limeify.limeify(copy.deepcopy(base))
    _same_routers(model, reference)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
        assert not torch.allclose(model(x).logits, base(x).logits, atol=1e-4)
        assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False), reference.generate(x, max_new_tokens=5, do_sample=False))
    limeify.mark_only_routers_trainable(model, verbose=False)
    limeify.mark_only_routers_trainable(reference, verbose=False)
    for m in (model, reference):
        m(x, labels=x).loss.backward()
    for (layer, r), (_, ref) in zip(limeify.routers(model).items(), limeify.routers(reference).items()):
        assert r.weight.grad.abs().sum() > 0
        torch.testing.assert_close(r.weight.grad, ref.weight.grad, rtol=0, atol=0)

    limeify.save_lime(model, tmp_path / "adapter")
    reloaded = limeify.load_lime(_dispatched(tmp_path, "offload2"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, reference(x).logits)


def test_routers_offloaded_with_their_layers_refuse_to_train(ckpt):
    from accelerate import dispatch_model

    base, tmp_path = ckpt
    x = example_for("llama")
    reference = limeify.limeify(copy.deepcopy(base))
    model = limeify.limeify(copy.deepcopy(base))
    _same_routers(model, reference)
    dispatch_model(model, device_map=DEVICE_MAP, offload_dir=tmp_path / "offload")  # limeify, then offload
    assert limeify.routers(model)[2].weight.is_meta
    with torch.no_grad():  # inference is exact: accelerate loads the routers with their layer
        assert torch.equal(model(x).logits, reference(x).logits)
    with pytest.raises(LimeError, match=r"layers \[1, 2\] are offloaded.*Limeify after dispatching"):
        limeify.mark_only_routers_trainable(model)
