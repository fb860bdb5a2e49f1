"""nn.MultiheadAttention and the nn.TransformerEncoder built on it: limeify exposes the packed
in-projection as a K/V producer (limeify/restructure.py). Identity is bit-exact against the base's
standard path, perturbed routers match a reference written here with F.linear and explicit
attention, and unlimeify gives back the original modules and fused fast paths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import limeify
from conftest import perturb_routers
from limeify import LimeConfig, LimeError
from limeify.restructure import LimeMultiheadAttention

D, H, T, B, VOCAB = 32, 4, 7, 2, 64


class EncoderModel(nn.Module):
    """A user model on nn.TransformerEncoder (post-norm, ReLU), ids in, logits out."""

    def __init__(self, batch_first: bool = True, dropout: float = 0.0, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, H, 64, dropout=dropout, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids, mask=None, src_key_padding_mask=None, is_causal=None):
        x = self.embed(ids)
        x = x if self.batch_first else x.transpose(0, 1)
        x = self.encoder(x, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return self.head(x if self.batch_first else x.transpose(0, 1))


class Block(nn.Module):
    def __init__(self, need_weights: bool, **mha) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=True, **mha)

    def forward(self, x, mask):
        h = self.norm(x)
        return x + self.attn(h, h, h, attn_mask=mask, need_weights=self.need_weights)[0]


class MHAModel(nn.Module):
    """A user model calling nn.MultiheadAttention directly (pre-norm blocks, causal mask)."""

    def __init__(self, need_weights: bool, layers: int = 3, **mha) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(need_weights, **mha) for _ in range(layers)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        # boolean (True: masked), which unlike a float mask allows the base's fused kernel
        mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)


def _ids(seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _padding():
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, 4:] = True  # right padding: the fused path may turn the batch into a NestedTensor
    return kpm


MASKS = {"none": lambda: {}, "causal": lambda: {"mask": nn.Transformer.generate_square_subsequent_mask(T), "is_causal": True},
         "padding": lambda: {"src_key_padding_mask": _padding()}}




def _standard(model, *args, **kwargs):
    """Eval output on nn.MultiheadAttention's standard path (PyTorch's fused kernels off)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _fused(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def _train_out(model, *args, seed=3, **kwargs):
    model.train()
    torch.manual_seed(seed)  # the same dropout masks for base and limeified model
    out = model(*args, **kwargs)
    model.eval()
    return out


# PyTorch's own difference between its fused eval kernels and its standard path on these models,
# measured on the logits: nn.TransformerEncoder 4.2e-7 to 4.8e-7 (batch_first; with
# batch_first=False there is no fused path), nn.MultiheadAttention alone 2.4e-7 (need_weights)
# and 4.8e-7. A limeified model always computes the standard path: about twice the largest.
FUSED_TOL = 1e-6


@pytest.mark.parametrize("masks", sorted(MASKS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_identity_is_bit_exact(batch_first, masks):
    base = EncoderModel(batch_first, dropout=0.1).eval()
    ids, kw = _ids(), MASKS[masks]()
    model = limeify.limeify(copy.deepcopy(base), example_inputs=((ids,), kw))
    sites = limeify.attention_sites(model)
    assert [s.key.module for s in sites] == [f"encoder.layers.{i}.self_attn.lime_in_proj" for i in range(3)]
    assert [(s.key.start, s.value.start, s.num_kv_heads, s.head_dim) for s in sites] == [(D, 2 * D, H, D // H)] * 3
    assert isinstance(model.encoder.layers[0].self_attn, LimeMultiheadAttention)
    # train mode (dropout on, same seed): outputs and the base weights' gradients bit for bit
    out, want = _train_out(model, ids, **kw), _train_out(base, ids, **kw)
    assert torch.equal(out, want)
    out.sum().backward()
    want.sum().backward()
    grads = {n: p.grad for n, p in base.named_parameters()}
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if "lime" not in n)
    # eval: bit for bit with the base's standard path
    assert torch.equal(_fused(model, ids, **kw), _standard(base, ids, **kw))
    # the base's own fused path differs from its standard path by float32 rounding; padded
    # positions of the fused (nested) path are zero-filled, not computed: compare the real tokens
    real = ~kw["src_key_padding_mask"] if "src_key_padding_mask" in kw else torch.ones(B, T, dtype=torch.bool)
    diff = (_fused(model, ids, **kw) - _fused(base, ids, **kw))[real].abs().max().item()
    assert diff <= FUSED_TOL
    assert not torch.allclose(_fused(perturb_routers(model), ids, **kw)[real], _fused(base, ids, **kw)[real], atol=1e-3)


@pytest.mark.parametrize("need_weights", [True, False])
def test_direct_mha_identity_is_bit_exact(need_weights):
    base = MHAModel(need_weights).eval()
    ids = _ids()
    model = limeify.limeify(copy.deepcopy(base), example_inputs=ids)
    assert [s.key.module for s in limeify.attention_sites(model)] == [f"blocks.{i}.attn.lime_in_proj" for i in range(3)]
    assert torch.equal(_train_out(model, ids), _train_out(base, ids))
    assert torch.equal(_fused(model, ids), _standard(base, ids))
    assert (_fused(model, ids) - _fused(base, ids)).abs().max().item() <= FUSED_TOL


def test_limeified_model_never_takes_a_fused_kernel(monkeypatch):
    base = EncoderModel().eval()
    ids, kw = _ids(), {"src_key_padding_mask": _padding()}
    model = limeify.limeify(copy.deepcopy(base), example_inputs=((ids,), kw))
    direct = limeify.limeify(MHAModel(False).eval(), example_inputs=ids)
    calls = []
    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    _fused(model, ids, **kw)
    _fused(direct, ids)
    assert calls == []
    # unlimeify gives the fused paths back
    limeify.unlimeify(model)
    limeify.unlimeify(direct)
    _fused(model, ids, **kw)
    _fused(direct, ids)
    assert set(calls) == {"_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask"}


def _mix(C, raws, layer):
    """LIME.md's static mix: head g of layer l reads sum_{j<=l, h} C[g, j*G + h] * raw_j[h]."""
    G = C.shape[0]
    out = torch.zeros_like(raws[layer])
    for g in range(G):
        for j in range(layer + 1):
            for h in range(G):
                out[..., g, :] = out[..., g, :] + C[g, j * G + h] * raws[j][..., h, :]
    return out


def _attention(a, x, C, raws, layer, bias_mask):
    """One nn.MultiheadAttention layer by hand on batch-first x [B, T, D], K/V mixed by C."""
    q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).split(D, dim=-1)
    d = D // H
    q, k, v = (t.reshape(*t.shape[:-1], H, d) for t in (q, k, v))
    raws["k"].append(k)
    raws["v"].append(v)
    if C is not None:
        k, v = _mix(C, raws["k"], layer), _mix(C, raws["v"], layer)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + bias_mask
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(*x.shape)
    return F.linear(out, a.out_proj.weight, a.out_proj.bias)


def _additive(kw, dtype):
    mask = torch.zeros(B, 1, T, T, dtype=dtype)
    if "mask" in kw:
        mask = mask + kw["mask"].to(dtype)
    if "src_key_padding_mask" in kw:
        mask = mask.masked_fill(kw["src_key_padding_mask"][:, None, None, :], float("-inf"))
    return mask


def _reference_encoder(base, ids, routers, kw):
    """EncoderModel in float64, written out; ``routers``: {layer: [G, (l+1)G]} matrices."""
    ref = copy.deepcopy(base).double()
    x, raws = ref.embed(ids), {"k": [], "v": []}
    mask = _additive(kw, torch.float64)
    for layer, tel in enumerate(ref.encoder.layers):
        C = routers.get(layer)
        x = tel.norm1(x + _attention(tel.self_attn, x, None if C is None else C.double(), raws, layer, mask))
        x = tel.norm2(x + tel.linear2(F.relu(tel.linear1(x))))
    return ref.head(x)


@pytest.mark.parametrize("masks", sorted(MASKS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_matches_a_reference_mix(batch_first, masks):
    base = EncoderModel(batch_first).eval()
    ids, kw = _ids(), MASKS[masks]()
    model = perturb_routers(limeify.limeify(copy.deepcopy(base), example_inputs=((ids,), kw)))
    routers = dict(zip(limeify.routers(model), (w.detach() for w in limeify.router_parameters(model))))
    real = ~kw["src_key_padding_mask"] if "src_key_padding_mask" in kw else torch.ones(B, T, dtype=torch.bool)
    want = _reference_encoder(base, ids, routers, kw)
    for got in (_fused(model, ids, **kw), _train_out(model, ids, **kw).detach()):
        # float32 against float64 through 3 layers: 4.5e-7 measured
        torch.testing.assert_close(got[real].double(), want[real], rtol=1e-6, atol=2e-6)
    assert not torch.allclose(want[real], _reference_encoder(base, ids, {}, kw)[real], atol=1e-3)


def _reference_mha_model(base, ids, routers):
    ref = copy.deepcopy(base).double()
    x, raws = ref.embed(ids), {"k": [], "v": []}
    mask = _additive({"mask": nn.Transformer.generate_square_subsequent_mask(T)}, torch.float64)
    for layer, block in enumerate(ref.blocks):
        C = routers.get(layer)
        x = x + _attention(block.attn, block.norm(x), None if C is None else C.double(), raws, layer, mask)
    return ref.head(x)


@pytest.mark.parametrize("need_weights", [True, False])
def test_direct_mha_matches_a_reference_mix_and_router_gradients(need_weights):
    base = MHAModel(need_weights, layers=4).eval()
    ids = _ids()
    model = perturb_routers(limeify.limeify(copy.deepcopy(base), example_inputs=ids))
    weights = limeify.router_parameters(model)
    out = _train_out(model, ids)  # no dropout in this model: train mode only changes the path taken
    routers = {layer: w.detach().double().requires_grad_() for layer, w in zip(limeify.routers(model), weights)}
    want = _reference_mha_model(base, ids, routers)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=2e-6)
    # router gradients of one loss, limeify's against the float64 reference's autograd
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * probe).sum().backward()
    (want * probe.double()).sum().backward()
    for w, r in zip(weights, routers.values()):
        assert w.grad is not None and w.grad.abs().max() > 0
        torch.testing.assert_close(w.grad.double(), r.grad, rtol=1e-5, atol=1e-5)  # |grad| ~ 10, 5e-6 measured


def test_unlimeify_restores_modules_keys_and_outputs():
    base = EncoderModel().eval()
    ids, kw = _ids(), {"src_key_padding_mask": _padding()}
    keys = list(base.state_dict())
    model = limeify.limeify(copy.deepcopy(base), example_inputs=((ids,), kw))
    assert [k for k in model.state_dict() if "lime" not in k] == keys  # the exposed projections own nothing
    perturb_routers(model)
    limeify.unlimeify(model)
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in model.encoder.layers)
    assert all("lime_in_proj" not in layer.self_attn._modules for layer in model.encoder.layers)
    assert model.encoder.use_nested_tensor is True and "_lime_use_nested_tensor" not in vars(model.encoder)
    assert list(model.state_dict()) == keys
    for run in (_fused, _standard):
        assert torch.equal(run(model, ids, **kw), run(base, ids, **kw))
    assert torch.equal(_train_out(model, ids, **kw), _train_out(base, ids, **kw))


def test_discover_sites_leaves_the_model_as_it_was():
    base = EncoderModel()
    sites = limeify.discover_sites(base, _ids())
    assert len(sites) == 3 and sites[2].key.module == "encoder.layers.2.self_attn.lime_in_proj"
    assert type(base.encoder.layers[0].self_attn) is nn.MultiheadAttention and base.encoder.use_nested_tensor
    # the printed sites are what LimeConfig(sites=...) takes
    model = limeify.limeify(copy.deepcopy(base), LimeConfig(sites=sites))
    assert torch.equal(_fused(model, _ids()), _standard(base, _ids()))


def test_failed_limeify_leaves_the_model_as_it_was():
    model = EncoderModel()
    with pytest.raises(LimeError, match="out of range"):
        limeify.limeify(model, LimeConfig(layers=[5]), example_inputs=_ids())
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert list(model.encoder.layers[0].self_attn._modules) == ["out_proj"] and model.encoder.use_nested_tensor
    assert not limeify.is_limeified(model)


def test_save_load_and_deepcopy(tmp_path):
    ids, kw = _ids(), {"src_key_padding_mask": _padding()}
    model = perturb_routers(limeify.limeify(EncoderModel(), example_inputs=((ids,), kw)))
    want = _fused(model, ids, **kw)
    limeify.save_lime(model, tmp_path / "adapter")
    fresh = limeify.load_lime(EncoderModel(), tmp_path / "adapter", example_inputs=((ids,), kw))
    assert torch.equal(_fused(fresh, ids, **kw), want)
    quick = limeify.load_lime(EncoderModel(), tmp_path / "adapter", verify_sites=False)
    assert torch.equal(_fused(quick, ids, **kw), want)
    twin = copy.deepcopy(model)
    assert torch.equal(_fused(twin, ids, **kw), want)
    limeify.unlimeify(twin)  # the copy's modules are its own: restoring it leaves the original limeified
    assert type(model.encoder.layers[1].self_attn) is LimeMultiheadAttention
    assert torch.equal(_fused(model, ids, **kw), want)


@pytest.mark.parametrize("options", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"bias": False}])
def test_rarer_options_identity_exact_and_routed(options):
    base = MHAModel(False, **options).eval()
    ids = _ids()
    model = limeify.limeify(copy.deepcopy(base), example_inputs=ids)
    assert torch.equal(_train_out(model, ids), _train_out(base, ids))
    assert torch.equal(_fused(model, ids), _standard(base, ids))
    assert not torch.allclose(_fused(perturb_routers(model), ids), _fused(base, ids), atol=1e-3)


class CrossModel(nn.Module):
    """Each layer cross-attends to a context of another width (separate q/k/v weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.attn = nn.ModuleList([nn.MultiheadAttention(D, H, kdim=24, vdim=24, batch_first=True) for _ in range(3)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids, context):
        x = self.embed(ids)
        for attn in self.attn:
            x = x + attn(x, context, context, need_weights=False)[0]
        return self.head(x)


def test_separate_kv_weights_are_their_own_producers():
    base = CrossModel().eval()
    ids, context = _ids(), torch.randn(B, 5, 24, generator=torch.Generator().manual_seed(2))
    model = limeify.limeify(copy.deepcopy(base), example_inputs=(ids, context))
    s = limeify.attention_sites(model)[1]
    assert (s.key.module, s.value.module, s.attention) == ("attn.1.lime_k_proj", "attn.1.lime_v_proj", "attn.1")
    assert sorted(model.attn[1]._modules) == ["lime_k_proj", "lime_router", "lime_v_proj", "out_proj"]
    assert torch.equal(_fused(model, ids, context), _standard(base, ids, context))
    assert not torch.allclose(_fused(perturb_routers(model), ids, context), _fused(base, ids, context), atol=1e-3)


def test_a_call_of_another_form_raises():
    model = limeify.limeify(MHAModel(False), example_inputs=_ids())
    x, memory = torch.randn(B, T, D), torch.randn(B, T, D)
    with pytest.raises(LimeError, match="lime_kv_proj"):
        model.blocks[1].attn(x, memory, memory)  # cross-attention: its K/V would bypass LIMe
    with pytest.raises(LimeError, match="NestedTensor"):
        nested = torch.nested.nested_tensor([torch.randn(3, D), torch.randn(5, D)])
        model.blocks[1].attn(nested, nested, nested)


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t = nn.Transformer(D, H, 2, 2, 64, dropout=0.0, batch_first=True)

    def forward(self, src, tgt):
        return self.t(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]), tgt_is_causal=True)


def test_nn_transformer_packed_cross_attention_is_discovered():
    """nn.Transformer's decoder cross-attention projects the encoder output with a slice of its
    packed weight (rows E:3E). Discovery finds the sites written here by hand from that layout."""
    from limeify import AttentionSite, KVSource

    def sites_of(stack, first, step, child, k, v):
        return [AttentionSite(layer=first + i * step, attention=stack.replace("*", str(i)), num_kv_heads=H, head_dim=D // H,
                              key=KVSource(f"{stack.replace('*', str(i))}.{child}", k, k + D),
                              value=KVSource(f"{stack.replace('*', str(i))}.{child}", v, v + D), stack=stack, depth=i)
                for i in range(2)]

    by_hand = sorted(sites_of("t.encoder.layers.*.self_attn", 0, 1, "lime_in_proj", D, 2 * D)
                     + sites_of("t.decoder.layers.*.self_attn", 2, 2, "lime_in_proj", D, 2 * D)
                     + sites_of("t.decoder.layers.*.multihead_attn", 3, 2, "lime_kv_proj", 0, D), key=lambda s: s.layer)
    base = Seq2Seq().eval()
    src, tgt = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2)), torch.randn(B, 5, D)

    def layout(s):
        return s.layer, s.attention, s.key, s.value, s.stack, s.depth, s.num_kv_heads, s.head_dim

    found = limeify.discover_sites(base, example_inputs=((src, tgt), {}))
    assert [layout(s) for s in found] == [layout(s) for s in by_hand]
    model = limeify.limeify(copy.deepcopy(base), example_inputs=((src, tgt), {}))
    assert sorted(model.t.decoder.layers[1].multihead_attn._modules) == ["lime_kv_proj", "lime_router", "out_proj"]
    assert torch.equal(_train_out(model, src, tgt), _train_out(base, src, tgt))
    assert torch.equal(_fused(model, src, tgt), _standard(base, src, tgt))
    with torch.no_grad():
        limeify.routers(model)[5].weight.add_(0.3)  # the cross-attention stack's second layer alone
    assert not torch.allclose(_fused(model, src, tgt), _fused(base, src, tgt), atol=1e-3)


class Looped(nn.Module):
    """One nn.MultiheadAttention block run three times per forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.block = Block(False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        x = self.embed(ids)
        for _ in range(3):
            x = self.block(x, mask)
        return self.head(x)


def test_one_mha_called_three_times_is_three_sites():
    base = Looped().eval()
    ids = _ids()
    model = limeify.limeify(copy.deepcopy(base), example_inputs=ids)
    assert [(s.key.module, s.depth) for s in limeify.attention_sites(model)] == [("block.attn.lime_in_proj", i) for i in range(3)]
    assert torch.equal(_train_out(model, ids), _train_out(base, ids))
    assert torch.equal(_fused(model, ids), _standard(base, ids))
    assert not torch.allclose(_fused(perturb_routers(model), ids), _fused(base, ids), atol=1e-3)
    limeify.unlimeify(model)
    assert type(model.block.attn) is nn.MultiheadAttention and torch.equal(_fused(model, ids), _fused(base, ids))


@pytest.mark.parametrize("need_weights", [True, False])
def test_query_heads_do_not_depend_on_the_batch(need_weights):
    """need_weights=True folds the batch into the heads ([B*H, T, d] through bmm); the site still
    records H, so an adapter's fingerprint does not depend on the example batch."""
    base = MHAModel(need_weights).eval()
    for batch in (1, 2, 3):
        ids = torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(batch))
        assert {s.num_heads for s in limeify.discover_sites(base, example_inputs=ids)} == {H}
