"""Attention written in other forms: per-head fused qkv (GPT-NeoX, Falcon), ALiBi scores through
``baddbmm`` (Bloom), multi-head latent attention (DeepSeek-V3), a user's ``einsum`` attention.
Tiny random configs, routers perturbed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import limeify

from conftest import perturb_routers, reference_mix_logits


def make_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)).eval()


def make_falcon(alibi: bool):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    extra = dict(alibi=True, new_decoder_architecture=False, multi_query=True) if alibi else dict(
        alibi=False, new_decoder_architecture=True, num_kv_heads=2)
    return FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                          **extra)).eval()


def make_deepseek_v3():
    """Multi-head latent attention, dense (no MoE layer), 3 layers."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           first_k_dense_replace=3, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                           topk_group=1, max_position_embeddings=64)
    return DeepseekV3ForCausalLM(cfg).eval()


def make_codegen():
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(0)
    return CodeGenForCausalLM(CodeGenConfig(vocab_size=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64,
                                            n_ctx=64, bos_token_id=1, eos_token_id=2)).eval()


def make_persimmon():
    from transformers import PersimmonConfig, PersimmonForCausalLM

    torch.manual_seed(0)
    return PersimmonForCausalLM(PersimmonConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=64)).eval()


def make_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=3, n_head=4)).eval()


class EinsumAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, c // self.heads) for proj in (self.q, self.k, self.v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (c // self.heads) ** 0.5
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
        return self.o(out.reshape(b, t, c))


class EinsumModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList([EinsumAttention() for _ in range(3)])
        self.head = nn.Linear(32, 64)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


BUILD = {"neox": make_neox, "falcon-alibi": lambda: make_falcon(True), "falcon-rope": lambda: make_falcon(False),
         "bloom": make_bloom, "deepseek-v3": make_deepseek_v3, "codegen": make_codegen, "persimmon": make_persimmon,
         "einsum": EinsumModel}
# What discovery must find: (K producer of layer 1, K features per block, blocks)
EXPECTED = {"neox": ("gpt_neox.layers.1.attention.query_key_value", 8, 4),
            "falcon-alibi": ("transformer.h.1.self_attention.query_key_value", 8, 1),
            "falcon-rope": ("transformer.h.1.self_attention.query_key_value", 8, 2),
            "bloom": ("transformer.h.1.self_attention.query_key_value", 8, 4),
            # MLA: each head's [k_nope | v] block of kv_b_proj; the shared rotary part of K is not routed
            "deepseek-v3": ("model.layers.1.self_attn.kv_b_proj", 8, 4),
            "codegen": ("transformer.h.1.attn.qkv_proj", 8, 4),  # [q | v | k] per partition
            "persimmon": ("model.layers.1.self_attn.query_key_value", 8, 4),
            "einsum": ("layers.1.k", None, 1)}


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits




@pytest.mark.parametrize("name", BUILD)
def test_discovery_identity_and_reference_mix(name):
    base = BUILD[name]()
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = limeify.limeify(copy.deepcopy(base), example_inputs=x if name == "einsum" else None)
    sites = limeify.attention_sites(model)
    path, width, blocks = EXPECTED[name]
    assert len(sites) == 3 and sites[1].key.module == path and sites[1].key.blocks == blocks
    assert width is None or sites[1].key.end - sites[1].key.start == width
    assert torch.equal(_logits(model, x), _logits(base, x))
    perturb_routers(model)
    got = _logits(model, x)
    assert not torch.allclose(got, _logits(base, x), atol=1e-4)
    # The mix written out in loops, reading the raw K/V features the sites name (cross-head static routers).
    coefs = {}
    for layer, w in zip(limeify.routers(model), limeify.router_parameters(model)):
        G = sites[layer].num_kv_heads
        C = w.detach().double().view(G, layer + 1, G)
        coefs[layer] = lambda hidden, C=C: C
    torch.testing.assert_close(got, reference_mix_logits(base, x, sites, coefs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in BUILD if n != "einsum"])
def test_generate_with_and_without_kv_cache(name):
    model = perturb_routers(limeify.limeify(BUILD[name]()))
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_flex_attention_llama_equals_its_sdpa_twin():
    from conftest import make_llama

    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    flex = limeify.limeify(make_llama(impl="flex_attention"))
    sdpa = perturb_routers(limeify.limeify(make_llama(impl="sdpa")))
    assert limeify.attention_sites(flex) == limeify.attention_sites(sdpa)
    assert torch.equal(_logits(flex, x), _logits(make_llama(impl="flex_attention"), x))
    with torch.no_grad():
        for a, b in zip(limeify.router_parameters(flex), limeify.router_parameters(sdpa)):
            a.copy_(b)
    torch.testing.assert_close(_logits(flex, x), _logits(sdpa, x), rtol=1e-5, atol=1e-5)
