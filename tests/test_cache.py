"""The mixing functions, in both buffer layouts, against a direct computation.

A call under grad uses the ``[M, d, L*G]`` layout and one under no_grad the ``[M, L*G, d]``
one (limeify/buffers.py); the model-level tests only ever differentiate the first, so here
both are driven directly, values and gradients, in float64.
"""

from __future__ import annotations

import pytest
import torch

from limeify.buffers import SCRATCH_SHAPES, SCRATCH_TOKENS, ScratchPool
from limeify.calls import ValueCache
from limeify.mixing import record, static_mix, token_mix

LAYERS, HEADS, D, LEAD = 3, 2, 4, (2, 5)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    raws = [torch.randn(*LEAD, HEADS * D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(LAYERS)]
    weights = [torch.randn(HEADS, (l + 1) * HEADS, generator=g, dtype=torch.float64, requires_grad=True) for l in range(LAYERS)]
    coefs = [torch.randn(*LEAD, HEADS, l + 1, generator=g, dtype=torch.float64, requires_grad=True) for l in range(LAYERS)]
    return raws, weights, coefs


def _reference(raws, weights, coefs, mechanism):
    """Per layer: stack every earlier layer's heads and mix them, written out with einsum."""
    heads = [r.reshape(*LEAD, HEADS, D) for r in raws]
    outs = [raws[0]]
    for l in range(1, LAYERS):
        stacked = torch.stack(heads[: l + 1], dim=-3)  # [..., J, G, d]
        if mechanism == "static":
            w = weights[l].view(HEADS, l + 1, HEADS)  # [g, j, h]
            out = torch.einsum("gjh,...jhd->...gd", w, stacked)
        else:
            out = torch.einsum("...gj,...jgd->...gd", coefs[l], stacked)
        outs.append(out.reshape(raws[l].shape))
    return outs


def _limeify_path(raws, weights, coefs, mechanism, sources_last):
    cache = ValueCache(None, LAYERS, grad=sources_last)
    outs = []
    for role in ("k", "v"):  # two roles share one cache, as K and V do
        outs = [record(raws[0], cache, role, 0, HEADS)]
        for l in range(1, LAYERS):
            if mechanism == "static":
                outs.append(static_mix(weights[l], raws[l], cache, role, l))
            else:
                outs.append(token_mix(coefs[l], raws[l], cache, role, l))
    return outs


@pytest.mark.parametrize("sources_last", [False, True])
@pytest.mark.parametrize("mechanism", ["static", "token"])
def test_mix_and_gradients_match_direct_computation(mechanism, sources_last):
    raws, weights, coefs = _inputs(0)
    ref = _reference(raws, weights, coefs, mechanism)
    got = _limeify_path(raws, weights, coefs, mechanism, sources_last)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-12)

    probe = [torch.randn_like(r) for r in ref]
    leaves = raws + (weights[1:] if mechanism == "static" else coefs[1:])
    want = torch.autograd.grad(sum((r * p).sum() for r, p in zip(ref, probe)), leaves)
    have = torch.autograd.grad(sum((o * p).sum() for o, p in zip(got, probe)), leaves)
    for w, h in zip(want, have):
        torch.testing.assert_close(h, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sources_last", [False, True])
def test_no_grad_mix_equals_grad_mix(sources_last):
    raws, weights, coefs = _inputs(1)
    with torch.no_grad():
        plain = _limeify_path(raws, weights, coefs, "static", sources_last)
    tracked = _limeify_path(raws, weights, coefs, "static", sources_last)
    for p, t in zip(plain, tracked):
        assert torch.equal(p, t)


def test_scratch_buffers_are_reused_by_small_no_grad_forwards_and_give_the_same_mix():
    raws, weights, coefs = _inputs(2)
    ref = _reference(raws, weights, coefs, "static")
    scratch = ScratchPool()
    seen = []
    with torch.no_grad():
        for _ in range(2):
            cache = ValueCache(None, LAYERS, grad=False, scratch=scratch)
            outs = [record(raws[0], cache, "k", 0, HEADS)]
            outs += [static_mix(weights[l], raws[l], cache, "k", l) for l in range(1, LAYERS)]
            seen.append(cache.buffers["k"].tensor)
            for r, o in zip(ref, outs):
                torch.testing.assert_close(o, r, rtol=0, atol=1e-12)
    assert seen[0] is seen[1] and len(scratch) == 1


def test_scratch_buffer_kept_for_backward_is_never_handed_to_a_later_forward():
    raws, weights, coefs = _inputs(3)
    ref = _reference(raws, weights, coefs, "static")
    scratch = ScratchPool()
    cache = ValueCache(None, LAYERS, grad=False, scratch=scratch)
    with torch.no_grad():
        record(raws[0], cache, "k", 0, HEADS)
    # Grad switched on inside a forward that started without it: the mix saves the buffer.
    outs = [static_mix(weights[l], raws[l], cache, "k", l) for l in range(1, LAYERS)]
    assert not len(scratch)
    with torch.no_grad():  # a later small forward with other K/V must get a buffer of its own
        other = ValueCache(None, LAYERS, grad=False, scratch=scratch)
        for l in range(LAYERS):
            record(torch.randn_like(raws[l]), other, "k", l, HEADS)
    assert other.buffers["k"].tensor is not cache.buffers["k"].tensor
    probe = [torch.randn_like(o) for o in outs]
    want = torch.autograd.grad(sum((r * p).sum() for r, p in zip(ref[1:], probe)), weights[1:])
    have = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probe)), weights[1:])
    for w, h in zip(want, have):
        torch.testing.assert_close(h, w, rtol=0, atol=1e-12)


def test_scratch_keeps_few_shapes_and_skips_large_forwards():
    scratch = ScratchPool()
    with torch.no_grad():
        for tokens in range(1, SCRATCH_SHAPES + 4):
            record(torch.randn(tokens, HEADS * D), ValueCache(None, LAYERS, grad=False, scratch=scratch), "k", 0, HEADS)
        assert len(scratch) == SCRATCH_SHAPES
        before = scratch.keys()
        record(torch.randn(SCRATCH_TOKENS + 1, HEADS * D), ValueCache(None, LAYERS, grad=False, scratch=scratch), "k", 0, HEADS)
    assert scratch.keys() == before
