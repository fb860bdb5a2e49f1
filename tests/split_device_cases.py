"""Stacks split over two devices by an accelerate device map, run by test_split_devices.py in a
process of their own: importing ``spare_device`` registers a second device for the process.

The second device is ``spare`` (see spare_device.py): an op that mixes it with the CPU raises,
as it would with two GPUs, so a K/V that limeify forgot to move fails loudly. The reference is
the same base, not dispatched (all on the CPU), limeified with the same router weights; float64,
so both sides do the same arithmetic and agree to rounding of the order of summation.
"""

from __future__ import annotations

import copy

import spare_device  # noqa: F401  (registers the second device first)
import torch
from accelerate import dispatch_model

import limeify
from limeify import LimeConfig

from conftest import example_for, make_gpt2, make_llama, perturb_routers

SPARE = spare_device.DEVICE
CPU = torch.device("cpu")
# float64: the two sides differ only where the backend's kernels round differently (2e-16 on
# GPT-2's logits) or gradients from two devices are summed in another order.
TOL = dict(rtol=1e-12, atol=1e-14)


def _dispatch(model, device_map: dict, tmp_path):
    # main_device="cpu": accelerate would otherwise run the "cpu" entries on the spare device.
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=tmp_path / "offload")


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits.cpu()


def _assert_same_grads(model, reference):
    ref = dict(reference.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            assert ref[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad.cpu(), ref[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        compared += 1
    assert compared


LLAMA_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": SPARE, "model.layers.2": "disk", "model.norm": SPARE, "lm_head": "cpu"}


def test_llama_over_cpu_spare_and_disk(tmp_path):
    """Layer 1 on the second device, layer 2 offloaded to disk (it runs on the CPU): the stack's
    K/V live on the CPU, where layer 0 ran, and layer 1's travel there and back."""
    base = make_llama(dtype=torch.float64)
    x = example_for("llama")
    model = limeify.limeify(_dispatch(copy.deepcopy(base), LLAMA_MAP, tmp_path))
    assert model.model.layers[1].self_attn.k_proj.weight.device == SPARE
    assert model.model.layers[2].self_attn.k_proj.weight.is_meta
    assert [s.layer for s in limeify.attention_sites(model)] == [0, 1, 2]
    assert {layer: r.weight.device for layer, r in limeify.routers(model).items()} == {1: SPARE, 2: CPU}
    torch.testing.assert_close(_logits(model, x), _logits(base, x), **TOL)  # identity at init

    reference = perturb_routers(limeify.limeify(copy.deepcopy(base)))
    perturb_routers(model)
    assert not torch.allclose(_logits(reference, x), _logits(base, x), atol=1e-3)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), **TOL)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(x, **greedy).cpu(), reference.generate(x, **greedy))

    for m in (model, reference):
        limeify.mark_only_routers_trainable(m, verbose=False)
        m(x, labels=x).loss.backward()
    _assert_same_grads(model, reference)

    limeify.save_lime(model, tmp_path / "adapter")
    again = limeify.load_lime(_dispatch(copy.deepcopy(base), LLAMA_MAP, tmp_path), tmp_path / "adapter")
    assert limeify.routers(again)[1].weight.device == SPARE
    torch.testing.assert_close(_logits(again, x), _logits(reference, x), **TOL)
    unsplit = limeify.load_lime(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(unsplit, x), _logits(reference, x), **TOL)


def test_home_on_the_second_device_per_token_routers_checkpointed(tmp_path):
    """Layer 0 on the second device, so the stack's K/V live there; layer 1 (no router) sends
    its raw K/V over, layer 2's per-token mix is computed there. Every parameter trains, under
    non-reentrant activation checkpointing, so layer 1's gradient from layer 2's mix must come
    back across the devices."""
    base = make_llama(dtype=torch.float64)
    x = example_for("llama")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": SPARE,
                  "model.layers.1": "cpu", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    config = LimeConfig(mechanism="dynamic", layers=[2])
    model = limeify.limeify(_dispatch(copy.deepcopy(base), device_map, tmp_path), config)
    reference = limeify.limeify(copy.deepcopy(base), config)
    for m in (model, reference):
        perturb_routers(m)
        m.train()
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), **TOL)
    for m in (model, reference):
        m(x, labels=x).loss.backward()
    _assert_same_grads(model, reference)
    assert model.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_gpt2_fused_qkv_alternating_devices(tmp_path):
    """GPT-2's K and V are slices of one fused projection; layers alternate between devices."""
    base = make_gpt2(layers=4).double()
    x = example_for("gpt2")
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
                  "transformer.h.1": SPARE, "transformer.h.2": "cpu", "transformer.h.3": SPARE,
                  "transformer.ln_f": "cpu", "lm_head": "cpu"}
    model = perturb_routers(limeify.limeify(_dispatch(copy.deepcopy(base), device_map, tmp_path)))
    reference = perturb_routers(limeify.limeify(copy.deepcopy(base)))
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), **TOL)
    for m in (model, reference):
        m(x, labels=x).loss.backward()
    _assert_same_grads(model, reference)
