"""The "softmax" and "dynamic" lookup mechanisms: function preservation, formulas, cache, gradients."""

from __future__ import annotations

import copy

import pytest
import torch

import limeify
from limeify import LimeConfig, LimeError

from conftest import (BUILDERS, NanoGPT, example_for, generate_with_and_without_cache, logits_of, make_llama,
                      reference_mix_logits)

MECHS = ["softmax", "dynamic"]


def _lime(model, mechanism, init="identity", **kw):
    return limeify.limeify(model, LimeConfig(mechanism=mechanism, init=init, **kw))


def _randomize(model, scale=1.0, seed=7):
    """Random values for every router parameter (gates, logits, dynamic projections)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for r in limeify.routers(model).values():
            for p in r.parameters():
                p.copy_(torch.randn_like(p) * scale)


def _coef_fn(router):
    """Per-token source weights ``[..., G, l+1]`` from the router's parameters, written out here."""
    l, G = router.layer, router.num_kv_heads
    onehot = torch.zeros(l + 1, dtype=torch.float64)
    onehot[l] = 1.0
    alpha = None if router.alpha is None else router.alpha.detach().double()

    def gate(p):
        return p if alpha is None else onehot + alpha[:, None] * (p - onehot)

    if router.mechanism == "softmax":
        e = router.logits.detach().double().exp()
        w = gate(e / e.sum(-1, keepdim=True))
        return lambda hidden: w
    W, b = router.proj.weight.detach().double(), router.proj.bias.detach().double()

    def fn(hidden):
        z = (hidden.double() @ W.t() + b).view(*hidden.shape[:-1], G, l + 1)
        e = (z - z.max(-1, keepdim=True).values).exp()
        return gate(e / e.sum(-1, keepdim=True))

    return fn


def _reference(base, x, sites, coef_fns):
    """The shared loop reference, with each head reading only the same head of every source layer."""
    def per_head(fn, G):  # [..., G, l+1] -> [..., G, l+1, G], zero off the head diagonal
        eye = torch.eye(G, dtype=torch.float64)[:, None, :]
        return lambda hidden: fn(hidden)[..., None] * eye

    G = {site.layer: site.num_kv_heads for site in sites}
    return reference_mix_logits(base, x, sites, {layer: per_head(fn, G[layer]) for layer, fn in coef_fns.items()})


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mechanism", MECHS)
def test_identity_init_preserves_function(mechanism, arch, impl):
    model = BUILDERS[arch](impl)
    x = example_for(arch)
    with torch.no_grad():
        ref = logits_of(model(x))
    _lime(model, mechanism)
    rs = limeify.routers(model)
    assert sorted(rs) == [1, 2] and all(r.mechanism == mechanism for r in rs.values())
    with torch.no_grad():
        out = logits_of(model(x))
    assert (out - ref).abs().max().item() <= 1e-5
    # Gates closed, but the rest of the router is not trivial: opening one gate changes the output.
    with torch.no_grad():
        rs[2].alpha[0] = 1.0
        if mechanism == "dynamic":
            rs[2].proj.weight.normal_()
        moved = logits_of(model(x))
    assert (moved - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("init", ["identity", "paper"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mechanism", MECHS)
def test_random_routers_match_direct_mixing(mechanism, arch, init):
    base = BUILDERS[arch]("eager")
    model = _lime(copy.deepcopy(base), mechanism, init)
    _randomize(model)
    x = example_for(arch)
    with torch.no_grad():
        out = logits_of(model(x))
    coef_fns = {layer: _coef_fn(r) for layer, r in limeify.routers(model).items()}
    ref = _reference(base, x, model._lime_state.sites, coef_fns)
    assert (out - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        ident = _reference(base, x, model._lime_state.sites, {})
    assert (out - ident).abs().max().item() > 1e-3  # the mixing did something


def test_softmax_mixing_matrix_is_block_diagonal_and_paper_init_is_uniform():
    model = _lime(make_llama(layers=4), "softmax")
    _randomize(model)
    r = limeify.routers(model)[2]
    M = r.mixing_matrix()
    G = 2
    assert M.shape == (G, 3 * G)
    w = _coef_fn(r)(None)
    for g in range(G):
        for j in range(3):
            for gp in range(G):
                expected = w[g, j].item() if gp == g else 0.0
                assert abs(M[g, j * G + gp].item() - expected) < 1e-6
    assert [tuple(m.shape) for m in limeify.router_parameters(model)] == [(2, 4), (2, 6), (2, 8)]
    ident = _lime(make_llama(layers=4), "softmax")
    for layer, m in enumerate(limeify.router_parameters(ident), start=1):
        eye = torch.zeros(G, (layer + 1) * G)
        eye[:, layer * G :] = torch.eye(G)
        assert torch.equal(m, eye)
    paper = _lime(make_llama(layers=4), "softmax", "paper")
    for layer, m in enumerate(limeify.router_parameters(paper), start=1):
        assert torch.allclose(m.sum(1), torch.ones(G)) and torch.allclose(m.max(1).values, torch.full((G,), 1 / (layer + 1)))
    assert not any(n.endswith("alpha") for n, _ in paper.named_parameters())


def test_dynamic_weights_depend_on_token_and_are_computed_once_per_layer():
    model = _lime(make_llama(layers=3), "dynamic")
    _randomize(model)
    r = limeify.routers(model)[2]
    calls = []
    h = r.proj.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    try:
        x = example_for("llama")
        with torch.no_grad():
            model(x)
        assert len(calls) == 1  # K computed the weights, V reused them
        model.train()
        model(x, labels=x).loss.backward()
        assert len(calls) == 2
    finally:
        h.remove()
    hidden = torch.randn(2, 5, 32)
    w = r.token_weights(hidden)
    assert w.shape == (2, 5, 2, 3)
    assert (w[0, 0] - w[0, 1]).abs().max() > 1e-3
    torch.testing.assert_close(w, _coef_fn(r)(hidden).float())
    M = r.mixing_matrix(hidden)
    assert M.shape == (2, 6)
    torch.testing.assert_close(M[1, 1::2], w[..., 1, :].mean((0, 1)))
    assert (M[1, 0::2] == 0).all()
    with pytest.raises(LimeError, match="depend on the token"):
        r.mixing_matrix()
    paper = _lime(make_llama(layers=3), "dynamic", "paper")
    assert paper.model.layers[1].self_attn.lime_router.alpha is None
    assert paper.model.layers[1].self_attn.lime_router.proj.weight.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mechanism", MECHS)
def test_generate_with_cache_equals_recompute(mechanism, arch):
    model = _lime(BUILDERS[arch]("sdpa"), mechanism)
    _randomize(model)
    with_cache = generate_with_and_without_cache(model, 16)
    # and the logits of the cached steps equal a full recompute
    with torch.no_grad():
        full = logits_of(model(with_cache))
        step = model(with_cache[:, :-3], use_cache=True)
        for i in range(3, 0, -1):
            pos = with_cache.shape[1] - i
            step = model(with_cache[:, pos : pos + 1], cache=step.cache, use_cache=True)
            assert (step.logits[:, -1] - full[:, pos]).abs().max().item() <= 1e-5


def _params(model):
    return {n: p for n, p in model.named_parameters() if "lime_router" in n}


def _router_grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in _params(model).items()}


@pytest.mark.parametrize("mechanism", MECHS)
def test_gradcheck_float64(mechanism):
    torch.manual_seed(0)
    model = NanoGPT(vocab=6, dim=8, heads=2, layers=3, block=4).double()
    x = torch.tensor([[1, 4, 2, 5]])
    limeify.limeify(model, LimeConfig(mechanism=mechanism), example_inputs=x)
    _randomize(model, 0.7)
    names = list(_params(model)) + ["wte.weight"]
    assert len(names) == (6 if mechanism == "dynamic" else 4) + 1
    params = tuple(model.get_parameter(n).detach().clone().requires_grad_() for n in names)

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mechanism", MECHS)
def test_identity_init_gates_get_gradient(mechanism):
    model = _lime(make_llama(layers=3), mechanism).train()
    grads = _router_grads(model, example_for("llama"))
    alphas = [g for n, g in grads.items() if n.endswith("alpha")]
    assert len(alphas) == 2 and all(g.abs().sum() > 0 for g in alphas)


@pytest.mark.parametrize("mechanism", MECHS)
def test_nonreentrant_checkpointing_same_gradients(mechanism):
    x = example_for("llama")
    model = _lime(make_llama(layers=4), mechanism).train()
    _randomize(model, 0.5)
    plain = _router_grads(model, x)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = _router_grads(model, x)
    assert plain.keys() == ckpt.keys() and len(plain) >= 6
    for n in plain:
        assert plain[n].abs().sum() > 0
        assert (plain[n] - ckpt[n]).abs().max().item() <= 1e-6, n


@pytest.mark.parametrize("mechanism", MECHS)
def test_router_only_gradients_match_finite_differences(mechanism):
    """Base frozen: router 1's gradient includes the paths through later layers' mixes."""
    model = _lime(make_llama(layers=3), mechanism).train()
    for name, p in model.named_parameters():
        p.requires_grad_("lime_router" in name)
    _randomize(model, 0.5)
    x = example_for("llama")
    grads = _router_grads(model, x)
    prefix = "model.layers.1.self_attn.lime_router."
    checks = [prefix + "alpha", prefix + ("logits" if mechanism == "softmax" else "proj.weight")]
    for name in checks:  # directional derivative along the gradient: numeric should equal |grad|
        p, g = model.get_parameter(name), grads[name]
        u, eps = g / g.norm(), 0.05
        with torch.no_grad():
            p += eps * u
            up = model(x, labels=x).loss
            p -= 2 * eps * u
            down = model(x, labels=x).loss
            p += eps * u
        numeric = ((up - down) / (2 * eps)).item()
        assert g.norm().item() > 1e-4, name
        assert abs(numeric - g.norm().item()) < 0.03 * g.norm().item(), (name, numeric, g.norm().item())


@pytest.mark.parametrize("mechanism", MECHS)
def test_state_dict_round_trip(mechanism):
    model = _lime(make_llama(), mechanism)
    _randomize(model)
    x = example_for("llama")
    with torch.no_grad():
        ref = model(x).logits
    other = _lime(make_llama(), mechanism)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x).logits, ref)


def test_dynamic_needs_hidden_size_for_hand_written_sites():
    sites = [s.__class__(**{**s.__dict__, "hidden_size": None}) for s in limeify.discover_sites(make_llama())]
    with pytest.raises(LimeError, match="hidden_size"):
        _lime(make_llama(), "dynamic", sites=sites)
    model = limeify.limeify(make_llama(), LimeConfig(mechanism="dynamic", sites=sites, mechanism_kwargs={"hidden_size": 32}))
    assert limeify.routers(model)[1].hidden_size == 32
