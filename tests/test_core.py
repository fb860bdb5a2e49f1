"""Core behaviour of limeify(): discovery, function preservation, mixing, generation, gradients."""

from __future__ import annotations

import copy
import dataclasses
import gc

import pytest
import torch
from torch import nn

import limeify
from limeify import LimeConfig, LimeError
from limeify.calls import ValueCache

from conftest import (BUILDERS, example_for, generate_with_and_without_cache, logits_of, make_gpt2, make_llama,
                      reference_mix_logits)


def limeify_any(model, x, config=None):
    example = x[:1] if not hasattr(model, "config") else None
    return limeify.limeify(model, config, example_inputs=example)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_init_preserves_function(arch, impl):
    model = BUILDERS[arch](impl)
    x = example_for(arch)
    with torch.no_grad():
        ref = logits_of(model(x))
    limeify_any(model, x)
    assert limeify.is_limeified(model)
    assert len(limeify.router_parameters(model)) == 2  # 3 layers: routers on 1 and 2
    with torch.no_grad():
        out = logits_of(model(x))
    assert (out - ref).abs().max().item() <= 1e-5


def test_discovered_sites_describe_gqa_and_fused_qkv():
    llama_sites = limeify.discover_sites(make_llama())
    assert [s.layer for s in llama_sites] == [0, 1, 2]
    s = llama_sites[1]
    assert (s.key.module, s.value.module) == ("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj")
    assert (s.num_kv_heads, s.num_heads, s.head_dim, s.key.start) == (2, 4, 8, None)
    assert s.attention == "model.layers.1.self_attn"
    g = limeify.discover_sites(make_gpt2())[2]
    assert g.key.module == g.value.module == "transformer.h.2.attn.c_attn"
    assert (g.key.start, g.key.end, g.value.start, g.value.end) == (32, 64, 64, 96)
    assert (g.num_kv_heads, g.head_dim) == (4, 8)


def test_router_shapes_follow_lime_layout():
    model = limeify.limeify(make_llama(layers=4))
    shapes = [tuple(w.shape) for w in limeify.router_parameters(model)]
    assert shapes == [(2, 4), (2, 6), (2, 8)]
    names = [n for n, _ in model.named_parameters() if "lime_router" in n]
    assert names == [f"model.layers.{i}.self_attn.lime_router.weight" for i in (1, 2, 3)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_routers_match_direct_mixing(arch):
    base = BUILDERS[arch]("eager")
    model = limeify.limeify(copy.deepcopy(base))
    torch.manual_seed(3)
    for w in limeify.router_parameters(model):
        w.data.normal_(0, 0.7)
    x = example_for(arch)
    with torch.no_grad():
        out = logits_of(model(x))
    assert "layer 2" in limeify.describe(model)
    sites = model._lime_state.sites
    # a static router [G, (l+1)G] holds R[g, j*G + h]: the weight of head h of layer j in head g
    coefs = {site.layer: (lambda hidden, R=w.detach(): R.view(R.shape[0], -1, R.shape[0]))
             for site, w in zip(sites[1:], limeify.router_parameters(model))}
    ref = reference_mix_logits(base, x, sites, coefs)
    assert (out - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        limeify.router_parameters(model)[0][0, 0] += 0.5
        changed = logits_of(model(x))
    assert (changed - out).abs().max().item() > 1e-4


def _randomize(model, scale=0.5, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in limeify.router_parameters(model):
            w.add_(torch.randn_like(w) * scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_cache_equals_recompute(arch):
    model = limeify.limeify(BUILDERS[arch]("sdpa"))
    _randomize(model)
    generate_with_and_without_cache(model, 20)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_matches_single_prompts(arch):
    model = limeify.limeify(BUILDERS[arch]("sdpa"))
    _randomize(model)
    prompts = [[5, 9, 13, 7, 21], [8, 30]]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(p)] for p in prompts])).long()
    batch = model.generate(ids, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        assert torch.equal(batch[i], alone[0, len(p):])


def _router_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x)
    out.loss.backward()
    return [w.grad.clone() for w in limeify.router_parameters(model)]


def test_every_router_gets_gradient():
    model = limeify.limeify(make_llama(layers=4)).train()
    grads = _router_grads(model, example_for("llama"))
    assert len(grads) == 3
    assert all(g.abs().sum() > 0 for g in grads)


def test_router_only_gradients_flow_across_layers():
    """With the base frozen, router 1 still gets the part of its gradient that passes through later mixes."""
    model = limeify.limeify(make_llama(layers=3)).train()
    for name, p in model.named_parameters():
        p.requires_grad_("lime_router" in name)
    _randomize(model, 0.3)
    x = example_for("llama")
    grads = _router_grads(model, x)
    w = limeify.router_parameters(model)[0]
    eps = 1e-3
    with torch.no_grad():
        idx = (0, 1)
        w[idx] += eps
        up = model(x, labels=x).loss
        w[idx] -= 2 * eps
        down = model(x, labels=x).loss
        w[idx] += eps
    numeric = (up - down) / (2 * eps)
    assert abs(numeric.item() - grads[0][idx].item()) < 2e-3 * max(1.0, abs(numeric.item()))


def test_gradcheck_float64():
    """gradcheck w.r.t. routers and the embedding table, so gradients also flow into every layer's raw K/V.

    The nanoGPT-style model computes everything in float64 (transformers' LLaMA keeps RMSNorm
    and RoPE in float32, which gradcheck cannot tolerate even without LIMe).
    """
    from conftest import NanoGPT

    torch.manual_seed(0)
    model = NanoGPT(vocab=6, dim=8, heads=2, layers=3, block=4).double()
    x = torch.tensor([[1, 4, 2, 5]])
    limeify.limeify(model, example_inputs=x)
    _randomize(model, 0.3)
    names = [n for n, _ in model.named_parameters() if "lime_router" in n] + ["wte.weight"]
    params = tuple(model.get_parameter(n).detach().clone().requires_grad_() for n in names)

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


def test_nonreentrant_checkpointing_same_gradients_and_reentrant_raises():
    x = example_for("llama")
    model = limeify.limeify(make_llama(layers=4)).train()
    _randomize(model, 0.3)
    plain = _router_grads(model, x)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = _router_grads(model, x)
    for a, b in zip(plain, ckpt):
        assert (a - b).abs().max().item() <= 1e-6
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    with pytest.raises(LimeError, match="use_reentrant"):
        _router_grads(model, x)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    sd = model.state_dict()
    return list(sd) == list(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


def test_unlimeify_restores_model_exactly():
    model = make_llama()
    x = example_for("llama")
    snap = _snapshot(model)
    with torch.no_grad():
        ref = model(x).logits
    limeify.limeify(model)
    _randomize(model)
    limeify.unlimeify(model)
    assert not limeify.is_limeified(model)
    assert _same(model, snap)
    assert not model._forward_hooks and not model.model._forward_hooks and not model.model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_errors_leave_model_untouched():
    model = make_llama()
    snap = _snapshot(model)
    with pytest.raises(LimeError, match="unlimeify"):
        limeify.limeify(limeify.limeify(copy.deepcopy(model)))
    with pytest.raises(LimeError, match="not limeified"):
        limeify.unlimeify(model)
    no_attention = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(LimeError, match="found no attention"):
        limeify.limeify(no_attention, example_inputs=torch.randn(2, 8))
    assert not limeify.is_limeified(no_attention)
    good = limeify.discover_sites(model)
    bad_heads = [s.__class__(**{**s.__dict__, "num_kv_heads": 3}) for s in good]
    bad_module = [s.__class__(**{**s.__dict__, "attention": "model.nope"}) for s in good]
    for sites, match in ((bad_heads, "output features"), (bad_module, "not a submodule"), ([], "empty")):
        with pytest.raises(LimeError, match=match):
            limeify.limeify(model, LimeConfig(sites=sites))
        assert not limeify.is_limeified(model)
        assert _same(model, snap)
    with pytest.raises(LimeError, match="out of range"):
        limeify.limeify(model, LimeConfig(layers=[0, 1]))
    assert _same(model, snap) and not model.model.layers[1].self_attn._forward_hooks


def test_overlapping_fused_slices_raise_and_leave_model_untouched():
    model = make_gpt2()
    snap = _snapshot(model)
    good = limeify.discover_sites(model)
    shifted = [dataclasses.replace(s, value=dataclasses.replace(s.value, start=s.value.start - 8, end=s.value.end - 8))
               for s in good]
    with pytest.raises(LimeError, match="overlap"):
        limeify.limeify(model, LimeConfig(sites=shifted))
    assert not limeify.is_limeified(model) and _same(model, snap)
    assert not any(m._forward_hooks for m in model.modules())


def _live_caches():
    gc.collect()
    return sum(isinstance(o, ValueCache) for o in gc.get_objects())


def test_value_cache_does_not_outlive_a_forward():
    model = limeify.limeify(make_llama()).train()
    x = example_for("llama")
    tracker = next(iter(model._lime_state.trackers.values()))
    before = _live_caches()
    with torch.no_grad():
        for _ in range(3):  # a few forwards: any cache that outlives its forward stays counted
            model.eval()(x)
    assert not tracker.has_open_call() and _live_caches() == before
    model.train()
    for _ in range(3):
        model(x, labels=x).loss.backward()
    assert not tracker.has_open_call() and _live_caches() == before

    boom = model.model.layers[1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                with pytest.raises(RuntimeError, match="boom"):
                    model(x)
            assert not tracker.has_open_call()
            assert _live_caches() == before
    finally:
        boom.remove()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_plain_tensor_example_inputs_find_the_same_sites(name):
    """A bare input_ids tensor works for causal LMs: discovery asks for no KV cache itself."""
    model = BUILDERS[name]()
    assert limeify.discover_sites(model, example_inputs=example_for(name)[:1]) == limeify.discover_sites(model)


def test_nanogpt_user_module_is_traced_with_fx():
    from conftest import make_nano

    model = make_nano()
    x = example_for("nanogpt")
    sites = limeify.discover_sites(model, example_inputs=x[:1])
    assert [(s.key.module, s.key.start, s.key.end) for s in sites] == [(f"blocks.{i}.attn.c_attn", 32, 64) for i in range(3)]
    assert all(s.num_kv_heads == 4 and s.head_dim == 8 for s in sites)


def test_no_grad_and_inference_mode_forwards_alternate_on_reused_buffers():
    model = limeify.limeify(make_llama()).eval()
    _randomize(model)
    x = example_for("llama")[:1, :4]  # decoding-sized: few tokens
    with torch.no_grad():
        ref = model(x).logits
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            assert torch.equal(model(x).logits, ref)
    assert len(next(iter(limeify.injection.lime_state(model).trackers.values())).scratch)  # small forwards reused buffers


def test_hand_written_sites_from_the_readme():
    from conftest import make_nano

    from limeify import AttentionSite, KVSource

    base = make_nano()
    x = example_for("nano")
    sites = [
        AttentionSite(layer=i, attention=f"blocks.{i}.attn",
                      key=KVSource(f"blocks.{i}.attn.c_attn", start=32, end=64),
                      value=KVSource(f"blocks.{i}.attn.c_attn", start=64, end=96),
                      num_kv_heads=4, head_dim=8, stack="blocks.*.attn", depth=i)
        for i in range(3)
    ]
    by_hand = limeify.limeify(copy.deepcopy(base), LimeConfig(sites=sites, init="paper"))
    torch.manual_seed(0)
    discovered = limeify.limeify(copy.deepcopy(base), LimeConfig(init="paper"), example_inputs=x)
    found = limeify.attention_sites(discovered)
    assert [(s.key, s.value, s.stack, s.depth, s.num_kv_heads, s.head_dim) for s in found] == \
        [(s.key, s.value, s.stack, s.depth, s.num_kv_heads, s.head_dim) for s in sites]
    with torch.no_grad():
        for a, b in zip(limeify.router_parameters(by_hand), limeify.router_parameters(discovered)):
            a.copy_(b)
        assert torch.equal(logits_of(by_hand(x)), logits_of(discovered(x)))
        assert not torch.allclose(logits_of(by_hand(x)), logits_of(base(x)), atol=1e-4)


def test_an_unexpected_discovery_failure_is_a_lime_error_naming_the_stack(monkeypatch):
    import limeify.discovery as discovery

    real = discovery._site

    def broken(graph, i, *args):
        if i == 1:
            raise AttributeError("'NoneType' object has no attribute 'shape'")
        return real(graph, i, *args)

    monkeypatch.setattr(discovery, "_site", broken)
    model = make_llama()
    with pytest.raises(LimeError, match=r"stack 'model.layers.\*.self_attn'.*AttributeError.*LimeConfig\(sites=") as info:
        limeify.limeify(model)
    assert isinstance(info.value.__cause__.__cause__, AttributeError) and not limeify.is_limeified(model)
