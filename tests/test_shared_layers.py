"""A module run several times in one forward (ALBERT's shared layer, a looped block): a site and a router per call.

The reference is written out here: hooks on the K/V projections count the calls of the
forward and mix each call's raw K/V with the earlier calls' by the router matrices, in loops.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import limeify
from conftest import perturb_routers
from limeify import LimeConfig, LimeError

ALBERT_CALLS = 3


def make_albert():
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=ALBERT_CALLS,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AlbertModel(cfg).eval()


class Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(out.transpose(1, 2).reshape(b, t, c))


class Looped(nn.Module):
    """One block applied ``calls`` times (a weight-shared, universal-transformer-style LM)."""

    def __init__(self, calls: int = 4, checkpoint_every: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.block = Block()
        self.head = nn.Linear(32, 64)
        self.calls, self.checkpoint_every = calls, checkpoint_every

    def forward(self, input_ids):
        x = self.embed(input_ids)
        i = 0
        while i < self.calls:
            n = self.checkpoint_every or 1
            if self.checkpoint_every and self.training:
                x = checkpoint(self._run, x, n, use_reentrant=False)
            else:
                x = self._run(x, n)
            i += n
        return self.head(x)

    def _run(self, x, n):
        for _ in range(n):
            x = self.block(x)
        return x




def reference(base, run, k_path, v_path, heads, mats):
    """``run(base)`` with each call's K/V replaced by ``mats[call]`` applied to calls 0..call (loops).

    ``mats[l]`` is ``[G, l+1, G]``: weight of head h of call j's raw K (or V) in head g of call l's.
    Calls without a matrix keep their raw K/V. Differentiable in ``mats``.
    """
    raw = {"k": [], "v": []}

    def hook(role):
        def fn(mod, args, out):
            calls = raw[role]
            calls.append(out)
            layer = len(calls) - 1
            if layer not in mats:
                return out
            lead, d = out.shape[:-1], out.shape[-1] // heads
            heads_out = []
            for g in range(heads):
                acc = torch.zeros(*lead, d, dtype=out.dtype)
                for j in range(layer + 1):
                    src = calls[j].view(*lead, heads, d)
                    for h in range(heads):
                        acc = acc + mats[layer][g, j, h] * src[..., h, :]
                heads_out.append(acc)
            return torch.stack(heads_out, dim=-2).reshape(out.shape)
        return fn

    handles = [base.get_submodule(k_path).register_forward_hook(hook("k")),
               base.get_submodule(v_path).register_forward_hook(hook("v"))]
    try:
        return run(base)
    finally:
        for h in handles:
            h.remove()


def _mats(model):
    out = {}
    for (layer, router), w in zip(limeify.routers(model).items(), limeify.router_parameters(model)):
        G = router.num_kv_heads
        out[limeify.attention_sites(model)[layer].position] = w.detach().clone().view(G, router.layer + 1, G)
    return out


ALBERT_ATTN = "encoder.albert_layer_groups.0.albert_layers.0.attention"


def test_albert_sites_per_call_identity_and_reference_mix():
    base = make_albert()
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = limeify.limeify(copy.deepcopy(base))
    sites = limeify.attention_sites(model)
    assert [s.attention for s in sites] == [ALBERT_ATTN] * ALBERT_CALLS
    assert [s.position for s in sites] == list(range(ALBERT_CALLS)) and {s.enclosing for s in sites} == {"encoder"}
    keys = [k for k in model.state_dict() if "lime_router" in k]
    assert keys == [f"{ALBERT_ATTN}.lime_router.{layer}.weight" for layer in range(1, ALBERT_CALLS)]
    run = lambda m: m(input_ids=x).last_hidden_state  # noqa: E731
    with torch.no_grad():
        assert torch.equal(run(model), run(base))
        perturb_routers(model)
        got = run(model)
        assert not torch.allclose(got, run(base), atol=1e-4)
        want = reference(base, run, f"{ALBERT_ATTN}.key", f"{ALBERT_ATTN}.value", 4, _mats(model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    limeify.unlimeify(model)
    assert model.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(run(model), run(base))


def test_looped_block_gradients_match_reference():
    base = Looped()
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    model = perturb_routers(limeify.limeify(copy.deepcopy(base), example_inputs=x))
    assert len(limeify.attention_sites(model)) == 4 and limeify.attention_sites(model)[0].enclosing == ""
    model(x).logsumexp(-1).sum().backward()
    mats = {k: v.requires_grad_(True) for k, v in _mats(model).items()}
    reference(base, lambda m: m(x), "block.k", "block.v", 4, mats).logsumexp(-1).sum().backward()
    for layer, w in zip(limeify.routers(model), limeify.router_parameters(model)):
        depth = limeify.attention_sites(model)[layer].position
        torch.testing.assert_close(w.grad, mats[depth].grad.view_as(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_calls_give_the_same_gradients(every):
    """Regions of one call or of two calls each (two calls: told apart by their inputs)."""
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    plain = perturb_routers(limeify.limeify(Looped(), example_inputs=x)).train()
    ckpt = Looped(checkpoint_every=every)
    ckpt.load_state_dict(Looped().state_dict())
    ckpt = perturb_routers(limeify.limeify(ckpt.eval(), example_inputs=x)).train()
    for m in (plain, ckpt):
        m(x).logsumexp(-1).sum().backward()
    for a, b in zip(limeify.router_parameters(plain), limeify.router_parameters(ckpt)):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_more_calls_than_traced_raise():
    x = torch.randint(0, 64, (1, 5))
    model = limeify.limeify(Looped(), example_inputs=x)
    model.calls = 5
    with pytest.raises(LimeError, match="ran 5 times in one call, more than the 4"):
        model(x)


def test_shared_sites_by_hand_need_the_enclosing_module():
    x = torch.randint(0, 64, (1, 5))
    model = Looped()
    sites = limeify.discover_sites(model, example_inputs=x)
    with pytest.raises(LimeError, match="enclosing="):
        limeify.limeify(model, LimeConfig(sites=[dataclasses.replace(s, enclosing=None) for s in sites]))
    assert not limeify.is_limeified(model) and not any(m._forward_hooks for m in model.modules())
    limeify.limeify(model, LimeConfig(sites=sites))
    assert torch.equal(model(x), limeify.unlimeify(model)(x))


def test_albert_adapter_and_checkpoint_round_trips(tmp_path):
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = perturb_routers(limeify.limeify(make_albert()))
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
    limeify.save_lime(model, tmp_path / "adapter")
    loaded = limeify.load_lime(make_albert(), tmp_path / "adapter")
    limeify.save_pretrained(model, tmp_path / "ckpt")
    # Routers found in a plain save_pretrained of the limeified model, keyed lime_router.<depth>.
    model.save_pretrained(tmp_path / "plain")
    for other in (loaded, limeify.from_pretrained(tmp_path / "ckpt"), limeify.from_pretrained(tmp_path / "plain")):
        with torch.no_grad():
            assert torch.equal(other(input_ids=x).last_hidden_state, want)


def test_albert_lora_with_routers_trains_each_call():
    from peft import LoraConfig

    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    peft_model = limeify.get_lime_peft_model(make_albert(), peft_config=LoraConfig(r=2, target_modules=["query", "value"]))
    routers = limeify.routers(peft_model)
    assert sorted(routers) == [1, 2] and len({id(r) for r in routers.values()}) == 2
    peft_model(input_ids=x).last_hidden_state.square().sum().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers.values())
