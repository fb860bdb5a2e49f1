"""Tiny random models shared by the tests (CPU, fp32, built from configs: nothing is downloaded)."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread, here and in the subprocesses the tests start (they inherit it). The test
# models are tiny: on a loaded 2-core machine a second thread mostly waits for a core, and small
# ops ran 10-40x slower with two threads than with one (the whole suite: ~19 min vs ~8 min).
# Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


class NanoAttention(nn.Module):
    """nanoGPT's attention: fused qkv Linear, .split, F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = NanoAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, layers: int = 3, block: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList([NanoBlock(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_llama(impl: str = "sdpa", layers: int = 3, dtype=torch.float32, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=impl, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_gpt2(impl: str = "sdpa", layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64, attn_implementation=impl,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def make_bert(impl: str = "sdpa", masked_lm: bool = False):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     attn_implementation=impl, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return (BertForMaskedLM if masked_lm else BertModel)(cfg).eval()


def make_vit(impl: str = "sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16,
                    patch_size=4, num_labels=5, attn_implementation=impl)
    return ViTForImageClassification(cfg).eval()


def make_nano():
    torch.manual_seed(0)
    return NanoGPT().eval()


def example_for(name: str, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return torch.randn(batch, 3, 16, 16, generator=g)
    return torch.randint(3, 50, (batch, 9), generator=g)


BUILDERS = {
    "llama": make_llama,
    "gpt2": make_gpt2,
    "bert": make_bert,
    "bert_mlm": lambda impl="sdpa": make_bert(impl, masked_lm=True),
    "vit": make_vit,
    "nanogpt": lambda impl="sdpa": make_nano(),
}


def perturb_routers(model, scale: float = 0.3, seed: int = 0):
    """Add N(0, scale) noise to every router parameter (any mechanism, on any device), so
    comparisons see routers away from identity; equal models get equal noise."""
    import limeify

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in limeify.routers(model).values():
            for p in router.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


def logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out[0]


@pytest.fixture
def llama():
    return make_llama()


def generate_with_and_without_cache(model, new_tokens: int):
    """Greedy generation from a fixed prompt, with and without the KV cache: the tokens must be equal.
    Returns the cached run's tokens (prompt included)."""
    prompt = torch.tensor([[5, 9, 13, 7, 21]])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == prompt.shape[1] + new_tokens
    assert torch.equal(with_cache, without)
    return with_cache


def reference_mix_logits(base, x, sites, coefs):
    """Logits of ``base`` with LIMe's mixing of raw K/V applied by forward hooks, written out in loops.

    The independent reference for the model-level mixing tests: it uses only the sites' module
    paths, slices and head counts, never limeify's own mixing code. ``coefs`` maps a layer ``l``
    to a function of the K/V projection's input (hidden states ``[..., D]``) returning
    ``C[..., g, j, h]``, shape ``[G, l+1, G]`` or per token ``[..., G, l+1, G]``: the weight of head
    ``h`` of layer ``j``'s raw K (or V) in head ``g`` of layer ``l``'s mixed one. Layers missing from
    ``coefs`` keep their raw K/V. Summed in float64.
    """
    raw = {"k": {}, "v": {}}

    def mix(role, layer, t, G, hidden):
        raw[role][layer] = t.detach().clone()
        if layer not in coefs:
            return t
        C = coefs[layer](hidden).double()
        lead, d = t.shape[:-1], t.shape[-1] // G
        out = torch.zeros(*lead, G, d, dtype=torch.float64)
        for g in range(G):
            for j in range(layer + 1):
                src = raw[role][j].view(*lead, G, d).double()
                for h in range(G):
                    out[..., g, :] += C[..., g, j, h, None] * src[..., h, :]
        return out.to(t.dtype).reshape(t.shape)

    def hook(mod, args, out, site, path):
        out = out.clone()
        for role, src in (("k", site.key), ("v", site.value)):
            if src.module == path:
                if src.start is None:
                    idx = torch.arange(out.shape[-1])
                else:  # blocks of [start, end), one every `step` features (per-head fused layouts)
                    idx = torch.tensor([src.start + b * (src.step or 0) + j
                                        for b in range(src.blocks) for j in range(src.end - src.start)])
                out[..., idx] = mix(role, site.layer, out[..., idx], site.num_kv_heads, args[0])
        return out

    handles = [base.get_submodule(path).register_forward_hook(functools.partial(hook, site=site, path=path))
               for site in sites for path in {site.key.module, site.value.module}]
    try:
        with torch.no_grad():
            return logits_of(base(x))
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (model, tokenizer), loaded once per session (~30 s from its GGUF file).

    Shared: tests must not modify the model.
    """
    from recipes.common import load_smollm2

    return load_smollm2()
