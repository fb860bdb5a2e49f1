"""Discovery cases found by the coverage sweep (benchmarks/coverage.py), each against a reference mix written here.

* layers of one stack whose K/V differ in shape (Gemma 4's sliding vs full layers with other
  head sizes, a model pooling its tokens halfway) become one stack per shape;
* a model that runs its encoder's layers without calling the encoder;
* producers returning a tuple (I-BERT's quantized linear: (output, scaling factor));
* a rotary table that is an embedding of positions (RoFormer), not a K projection;
* two attention ops with their own K/V in one module (LiLT's text and layout streams).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import limeify
from conftest import perturb_routers




def reference(base, run, sites, mats):
    """``run(base)`` with every site's raw K/V replaced by its stack's mix, written out in loops.

    ``mats[layer]``: ``[G, depth+1, G]``, the weight of head h of depth j's raw K (or V) in head g
    of this layer's, over the depths of the site's own stack. Contiguous K/V slices only.
    """
    raw: dict = {}

    def mix(site, role, t):
        slots = raw.setdefault((site.stack, role), {})
        slots[site.position] = t
        if site.layer not in mats:
            return t
        G = site.num_kv_heads
        lead, d = t.shape[:-1], t.shape[-1] // G
        out = torch.zeros(*lead, G, d, dtype=torch.float64)
        for g in range(G):
            for j in range(site.position + 1):
                src = slots[j].view(*lead, G, d).double()
                for h in range(G):
                    out[..., g, :] += mats[site.layer][g, j, h].double() * src[..., h, :]
        return out.to(t.dtype).reshape(t.shape)

    def hook(site, role, src):
        def fn(mod, args, out):
            extras = None
            if isinstance(out, tuple):
                out, extras = out[0], out[1:]
            if src.start is None:
                new = mix(site, role, out)
            else:
                new = out.clone()
                new[..., src.start:src.end] = mix(site, role, out[..., src.start:src.end])
            return new if extras is None else (new, *extras)
        return fn

    handles = [base.get_submodule(src.module).register_forward_hook(hook(site, role, src))
               for site in sites for role, src in (("k", site.key), ("v", site.value))]
    try:
        with torch.no_grad():
            return run(base)
    finally:
        for h in handles:
            h.remove()


def _mats(model):
    return {layer: w.detach().view(r.num_kv_heads, r.layer + 1, r.num_kv_heads)
            for (layer, r), w in zip(limeify.routers(model).items(), limeify.router_parameters(model))}


def _check(base, run, example_inputs=None, atol=1e-5):
    """Identity exact, perturbed routers change the output and equal the reference."""
    model = limeify.limeify(copy.deepcopy(base), example_inputs=example_inputs)
    with torch.no_grad():
        assert torch.equal(run(model), run(base))
        perturb_routers(model)
        got = run(model)
    assert not torch.allclose(got, run(base), atol=1e-4)
    torch.testing.assert_close(got, reference(base, run, limeify.attention_sites(model), _mats(model)), rtol=1e-5, atol=atol)
    return model


def make_gemma4():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(0)
    cfg = Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, sliding_window=4, vocab_size_per_layer_input=64,
                           hidden_size_per_layer_input=8, per_layer_config={"01": {"head_dim": 16}, "03": {"head_dim": 16}},
                           layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma4ForCausalLM(cfg).eval()


def test_layers_with_other_kv_shapes_are_stacks_of_their_own():
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = _check(make_gemma4(), lambda m: m(x).logits)
    sites = limeify.attention_sites(model)
    assert [(s.stack, s.depth, s.head_dim) for s in sites] == [
        ("model.layers.*.self_attn", 0, 8), ("model.layers.*.self_attn#1", 0, 16),
        ("model.layers.*.self_attn", 1, 8), ("model.layers.*.self_attn#1", 1, 16)]
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


class Attn(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class Encoder(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attn() for _ in range(n))


class Pooling(nn.Module):
    """Four layers, tokens halved after the second: two stacks of two layers each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.encoder = Encoder(4)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x[:, ::2] if i == 2 else x)
        return x


def test_pooled_tokens_split_the_stack_and_uncalled_encoder_is_not_the_enclosing_module():
    # Pooling also runs its encoder's layers itself and never calls the encoder.
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model = _check(Pooling(), lambda m: m(x), example_inputs=x)
    sites = limeify.attention_sites(model)
    assert [s.stack for s in sites] == ["encoder.layers.*"] * 2 + ["encoder.layers.*#1"] * 2
    assert {s.enclosing for s in sites} == {""}


def test_tuple_returning_producers():
    from transformers import IBertConfig, IBertModel

    torch.manual_seed(0)
    base = IBertModel(IBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)).eval()
    x = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    _check(base, lambda m: m(input_ids=x).last_hidden_state)


def make_roformer():
    from transformers import RoFormerConfig, RoFormerModel

    torch.manual_seed(0)
    return RoFormerModel(RoFormerConfig(vocab_size=64, embedding_size=32, hidden_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)).eval()


def test_rotary_position_table_is_no_k_producer():
    base = make_roformer()
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = _check(base, lambda m: m(input_ids=x).last_hidden_state)
    assert limeify.attention_sites(model)[1].key.module == "encoder.layer.1.attention.self.key"


def test_two_attention_ops_in_one_module_are_two_stacks():
    from transformers import LiltConfig, LiltModel

    torch.manual_seed(0)
    base = LiltModel(LiltConfig(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, channel_shrink_ratio=4)).eval()
    x = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = _check(base, lambda m: m(input_ids=x).last_hidden_state)
    sites = limeify.attention_sites(model)
    stacks = {s.stack for s in sites}
    assert stacks == {"encoder.layer.*.attention.self.key", "encoder.layer.*.attention.self.layout_key"}
    keys = sorted(k for k in model.state_dict() if "lime_router" in k)
    assert keys == sorted(f"encoder.layer.{s.position}.attention.self.lime_router.{s.layer}.weight"
                          for s in sites if s.position > 0)


def test_sweep_cases_unlimeify_cleanly():
    base = make_roformer()
    model = limeify.unlimeify(limeify.limeify(copy.deepcopy(base)))
    assert model.state_dict().keys() == base.state_dict().keys()
    assert not model.get_submodule("encoder.layer.1.attention.self.key")._forward_hooks
