"""Models with several stacks: encoder-decoders, dual towers and VLMs (tiny random configs).

Every comparison is against the base model or a second code path (a stack called alone,
precomputed encoder outputs, greedy decoding written out with full forwards, finite
differences), with routers perturbed away from identity wherever the check needs LIMe active.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import limeify
from limeify import LimeConfig, LimeError
from limeify.sites import stacks_of

import stack_models as M


def _ids(rows: int, length: int, seed: int, low: int = 3, high: int = 60) -> torch.Tensor:
    return torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed))


def _pixels(model, seed: int, rows: int = 2) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vlm_ids(model, text_len: int, seed: int) -> torch.Tensor:
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    return torch.cat([torch.full((2, n), 63), _ids(2, text_len, seed)], 1)


@dataclass
class Spec:
    make: Callable
    stacks: list[tuple[str, int]]
    # inputs(model, same_shapes, seed): forward kwargs; with same_shapes every stack's K/V have one shape
    inputs: Callable
    # outputs(model, kwargs): the tensors to compare, by name
    outputs: Callable
    # stack name -> (the output its routers change, the outputs they must leave alone)
    changes: dict[str, tuple[str, list[str]]]
    # (output, input): the output must not depend on that input
    independent: list[tuple[str, str]] = field(default_factory=list)
    generates: bool = False


def _seq2seq_inputs(model, same, seed):
    src = 6 if same else 7
    tgt = 6 if same else 5
    kw = {"decoder_input_ids": _ids(2, tgt, seed + 1), "attention_mask": torch.ones(2, src, dtype=torch.long)}
    kw["attention_mask"][1, -2:] = 0  # a padded source row
    if model.main_input_name == "input_features":
        # Whisper's encoder takes exactly 2*max_source_positions frames (8 positions): a decoder of 8
        # tokens is the length where both stacks' K/V have one shape.
        kw["decoder_input_ids"] = _ids(2, 8 if same else 5, seed + 1)
        del kw["attention_mask"]
        kw["input_features"] = torch.randn(2, model.config.num_mel_bins, 16, generator=torch.Generator().manual_seed(seed))
    else:
        kw["input_ids"] = _ids(2, src, seed)
    return kw


def _seq2seq_outputs(model, kw):
    out = model(**kw)
    return {"logits": out.logits, "encoder": out.encoder_last_hidden_state}


def _towers_inputs(model, same, seed):
    vc = model.config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2 + (1 if "CLIP" in type(model).__name__ else 0)
    return {"input_ids": _ids(2, patches if same else 5, seed), "pixel_values": _pixels(model, seed + 1)}


def _towers_outputs(model, kw):
    out = model(**kw)
    return {"text_embeds": out.text_embeds, "image_embeds": out.image_embeds, "logits": out.logits_per_text}


def _vlm_inputs(model, same, seed):
    # Vision tokens: the patches (+1 CLS for a CLIP tower); the text: image tokens then words.
    return {"input_ids": _vlm_ids(model, 1 if same else 4, seed), "pixel_values": _pixels(model, seed + 1)}


def _vlm_outputs(model, kw):
    seen = {}

    def keep(module, args, output):
        seen.setdefault("image", output.last_hidden_state)

    handle = model.model.vision_tower.register_forward_hook(keep)
    try:
        out = model(**kw)
    finally:
        handle.remove()
    return {"logits": out.logits, "image": seen["image"]}


_ENC_DEC = {"encoder": "encoder", "decoder": "logits", "cross": "logits"}
SPECS = {
    "bart": Spec(M.make_bart, [("model.encoder.layers.*.self_attn", 3), ("model.decoder.layers.*.self_attn", 3),
                               ("model.decoder.layers.*.encoder_attn", 3)],
                 _seq2seq_inputs, _seq2seq_outputs,
                 {"model.encoder.layers.*.self_attn": ("encoder", []), "model.decoder.layers.*.self_attn": ("logits", ["encoder"]),
                  "model.decoder.layers.*.encoder_attn": ("logits", ["encoder"])},
                 [("encoder", "decoder_input_ids")], generates=True),
    "t5": Spec(M.make_t5, [("encoder.block.*.layer.0.SelfAttention", 3), ("decoder.block.*.layer.0.SelfAttention", 3),
                           ("decoder.block.*.layer.1.EncDecAttention", 3)],
               _seq2seq_inputs, _seq2seq_outputs,
               {"encoder.block.*.layer.0.SelfAttention": ("encoder", []), "decoder.block.*.layer.0.SelfAttention": ("logits", ["encoder"]),
                "decoder.block.*.layer.1.EncDecAttention": ("logits", ["encoder"])},
               [("encoder", "decoder_input_ids")], generates=True),
    "whisper": Spec(M.make_whisper, [("model.encoder.layers.*.self_attn", 2), ("model.decoder.layers.*.self_attn", 3),
                                     ("model.decoder.layers.*.encoder_attn", 3)],
                    _seq2seq_inputs, _seq2seq_outputs,
                    {"model.encoder.layers.*.self_attn": ("encoder", []), "model.decoder.layers.*.self_attn": ("logits", ["encoder"]),
                     "model.decoder.layers.*.encoder_attn": ("logits", ["encoder"])},
                    [("encoder", "decoder_input_ids")], generates=True),
    "clip": Spec(M.make_clip, [("vision_model.encoder.layers.*.self_attn", 3), ("text_model.encoder.layers.*.self_attn", 3)],
                 _towers_inputs, _towers_outputs,
                 {"vision_model.encoder.layers.*.self_attn": ("image_embeds", ["text_embeds"]),
                  "text_model.encoder.layers.*.self_attn": ("text_embeds", ["image_embeds"])},
                 [("text_embeds", "pixel_values"), ("image_embeds", "input_ids")]),
    # SigLIP's pooling head is one nn.MultiheadAttention (a learned probe attends to the patches):
    # a stack of one layer, which gets no router.
    "siglip": Spec(M.make_siglip, [("vision_model.encoder.layers.*.self_attn", 3), ("vision_model.head.attention", 1),
                                   ("text_model.encoder.layers.*.self_attn", 3)],
                   _towers_inputs, _towers_outputs,
                   {"vision_model.encoder.layers.*.self_attn": ("image_embeds", ["text_embeds"]),
                  "text_model.encoder.layers.*.self_attn": ("text_embeds", ["image_embeds"])},
                   [("text_embeds", "pixel_values"), ("image_embeds", "input_ids")]),
    "llava": Spec(M.make_llava, [("model.vision_tower.encoder.layers.*.self_attn", 3), ("model.language_model.layers.*.self_attn", 3)],
                  _vlm_inputs, _vlm_outputs,
                  {"model.vision_tower.encoder.layers.*.self_attn": ("image", []),
                  "model.language_model.layers.*.self_attn": ("logits", ["image"])},
                  [("image", "input_ids")], generates=True),
    "paligemma": Spec(M.make_paligemma, [("model.vision_tower.encoder.layers.*.self_attn", 2),
                                         ("model.vision_tower.head.attention", 1),
                                         ("model.language_model.layers.*.self_attn", 3)],
                      _vlm_inputs, _vlm_outputs,
                      {"model.vision_tower.encoder.layers.*.self_attn": ("image", []),
                  "model.language_model.layers.*.self_attn": ("logits", ["image"])},
                      [("image", "input_ids")], generates=True),
}
NAMES = list(SPECS)


@pytest.fixture(scope="module")
def built():
    """name -> (base model, limeified copy with identity routers); built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            base = SPECS[name].make()
            cache[name] = (base, limeify.limeify(copy.deepcopy(base)))
        return cache[name]

    return get


def _perturb(model, stacks=None, seed=0, scale=0.3):
    """Add noise to the routers (of the named stacks only, if given); returns the model."""
    sites = limeify.attention_sites(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, router in limeify.routers(model).items():
            if stacks is None or sites[layer].stack in stacks:
                for p in router.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def _outs(spec, model, kw):
    with torch.no_grad():
        return spec.outputs(model, kw)


def _assert_same(a: dict, b: dict, names=None):
    for name in (a if names is None else names):
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item():.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_discovery_finds_each_stack(built, name):
    spec = SPECS[name]
    _, model = built(name)
    sites = limeify.attention_sites(model)
    groups = stacks_of(sites)
    assert [(stack, len(group)) for stack, group in groups.items()] == spec.stacks
    rts = limeify.routers(model)
    for group in groups.values():
        assert [s.depth for s in group] == list(range(len(group)))
        assert group[0].layer not in rts  # each stack's first layer has no earlier layer to read
        for site in group[1:]:
            # Layer l of a stack mixes its own stack's depths 0..l: (l+1) KV-head blocks.
            assert rts[site.layer].mixing_matrix().shape == (site.num_kv_heads, (site.depth + 1) * site.num_kv_heads)
    described = limeify.describe(model)
    assert all(f"stack {stack}: {n} layers" in described for stack, n in spec.stacks)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("same", [False, True], ids=["lengths-differ", "shapes-equal"])
def test_identity_routers_give_the_base_outputs(built, name, same):
    spec = SPECS[name]
    base, model = built(name)
    kw = spec.inputs(base, same, seed=0)
    _assert_same(_outs(spec, base, kw), _outs(spec, model, kw))


@pytest.mark.parametrize("name", NAMES)
def test_each_stacks_routers_change_its_own_outputs_only(built, name):
    spec = SPECS[name]
    base, model = built(name)
    kw = spec.inputs(base, True, seed=0)
    ref = _outs(spec, base, kw)
    for stack, (changed, untouched) in spec.changes.items():
        lime = _perturb(copy.deepcopy(model), stacks={stack})
        got = _outs(spec, lime, kw)
        assert not torch.allclose(got[changed], ref[changed], atol=1e-5), f"{stack}'s routers did not change {changed}"
        # What runs before the stack, or beside it, is untouched.
        _assert_same(ref, got, untouched)


@pytest.mark.parametrize("name", NAMES)
def test_stacks_do_not_read_each_others_kv(built, name):
    """At lengths where two stacks' K/V have one shape, so mixing them would raise no error."""
    spec = SPECS[name]
    base, model = built(name)
    lime = _perturb(copy.deepcopy(model))
    kw = spec.inputs(base, True, seed=0)
    ref = _outs(spec, lime, kw)
    for out, inp in spec.independent:
        other = dict(kw)
        other[inp] = spec.inputs(base, True, seed=7)[inp]
        assert not torch.equal(other[inp], kw[inp])
        _assert_same(ref, _outs(spec, lime, other), [out])


def test_stack_called_alone_matches_the_whole_model(built):
    base, model = built("bart")
    lime = _perturb(copy.deepcopy(model))
    kw = _seq2seq_inputs(base, True, seed=0)
    with torch.no_grad():
        full = lime(**kw)
        enc = lime.get_encoder()(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"])
        # The decoder reading precomputed encoder outputs (what generate() does).
        dec = lime(encoder_outputs=enc, attention_mask=kw["attention_mask"], decoder_input_ids=kw["decoder_input_ids"])
        lime(**_seq2seq_inputs(base, False, seed=3))  # another call in between changes nothing
        dec_again = lime(encoder_outputs=enc, attention_mask=kw["attention_mask"], decoder_input_ids=kw["decoder_input_ids"])
    assert torch.equal(enc.last_hidden_state, full.encoder_last_hidden_state)
    assert torch.equal(dec.logits, full.logits) and torch.equal(dec_again.logits, full.logits)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tower_called_alone_matches_the_dual_model(built, name):
    base, model = built(name)
    lime = _perturb(copy.deepcopy(model))
    kw = _towers_inputs(base, True, seed=0)
    with torch.no_grad():
        full = lime(**kw)
        image = lime.get_image_features(pixel_values=kw["pixel_values"])
        text = lime.get_text_features(input_ids=kw["input_ids"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    assert torch.equal(image / image.norm(dim=-1, keepdim=True), full.image_embeds)
    assert torch.equal(text / text.norm(dim=-1, keepdim=True), full.text_embeds)


def _greedy_by_full_forwards(spec_name, model, kw, steps):
    """Greedy decoding written out: one full forward per new token, no KV cache."""
    with torch.no_grad():
        if spec_name in ("llava", "paligemma"):
            ids = kw["input_ids"]
            for _ in range(steps):
                nxt = model(input_ids=ids, pixel_values=kw["pixel_values"]).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
            return ids[:, kw["input_ids"].shape[1]:]
        enc = {k: v for k, v in kw.items() if k != "decoder_input_ids"}
        dec = torch.full((2, 1), model.generation_config.decoder_start_token_id)
        for _ in range(steps):
            nxt = model(**enc, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
        return dec[:, 1:]


@pytest.mark.parametrize("name", [n for n in NAMES if SPECS[n].generates])
def test_generate_with_and_without_kv_cache_equals_greedy_full_forwards(built, name):
    spec = SPECS[name]
    base, model = built(name)
    lime = _perturb(copy.deepcopy(model), scale=0.5)
    kw = {k: v for k, v in spec.inputs(base, False, seed=0).items() if k != "decoder_input_ids"}
    steps = 6
    ref = _greedy_by_full_forwards(name, lime, kw, steps)
    # No end-of-sequence: every run makes exactly `steps` tokens, so they compare token by token.
    gen = dict(max_new_tokens=steps, do_sample=False, eos_token_id=None, forced_eos_token_id=None,
               pad_token_id=0, suppress_tokens=None, begin_suppress_tokens=None)
    with torch.no_grad():
        for use_cache in (True, False):
            out = lime.generate(**kw, use_cache=use_cache, **gen)
            new = out[:, -steps:]
            assert torch.equal(new, ref), f"use_cache={use_cache}: {new.tolist()} vs {ref.tolist()}"
        beams = [lime.generate(**kw, use_cache=c, num_beams=3, **gen)[:, -steps:] for c in (True, False)]
    assert torch.equal(beams[0], beams[1])
    full = spec.inputs(base, False, seed=0)  # LIMe is active in what was compared
    assert not torch.allclose(_outs(spec, base, full)["logits"], _outs(spec, lime, full)["logits"], atol=1e-4)


def test_router_only_training_moves_every_stack(built):
    for name in ("t5", "clip", "llava"):
        spec = SPECS[name]
        base, model = built(name)
        lime = _perturb(copy.deepcopy(model), scale=0.1)
        limeify.mark_only_routers_trainable(lime, verbose=False)
        before = {layer: r.mixing_matrix().detach().clone() for layer, r in limeify.routers(lime).items()}
        opt = torch.optim.SGD([p for p in lime.parameters() if p.requires_grad], lr=0.1)
        out = spec.outputs(lime, spec.inputs(base, False, seed=0))
        sum((v.float() ** 2).mean() for v in out.values()).backward()
        opt.step()
        sites = limeify.attention_sites(lime)
        moved = {sites[layer].stack for layer, r in limeify.routers(lime).items()
                 if not torch.equal(r.mixing_matrix().detach(), before[layer])}
        assert moved == set(stacks_of(sites)), (name, moved)
        assert all(not p.requires_grad for n, p in lime.named_parameters() if "lime_router" not in n)


def test_gradients_match_finite_differences_in_every_stack():
    torch.manual_seed(0)
    model = limeify.limeify(M.make_bart().double())
    _perturb(model, scale=0.3)
    kw = _seq2seq_inputs(model, False, seed=0)
    labels = _ids(2, kw["decoder_input_ids"].shape[1], 5)

    def loss():
        return model(**kw, labels=labels).loss

    sites = limeify.attention_sites(model)
    params = {sites[layer].stack: (layer, r.weight) for layer, r in limeify.routers(model).items()}
    assert len(params) == 3
    model.zero_grad()
    loss().backward()
    eps = 1e-6
    for stack, (layer, w) in params.items():
        g = torch.Generator().manual_seed(layer)
        for _ in range(3):
            i, j = (int(torch.randint(n, (1,), generator=g)) for n in w.shape)
            with torch.no_grad():
                w[i, j] += eps
                up = loss().item()
                w[i, j] -= 2 * eps
                down = loss().item()
                w[i, j] += eps
            fd = (up - down) / (2 * eps)
            assert abs(w.grad[i, j].item() - fd) <= 1e-7 + 1e-6 * abs(fd), (stack, i, j, w.grad[i, j].item(), fd)


@pytest.mark.parametrize("name", NAMES)
def test_save_reload_and_unlimeify(built, name, tmp_path):
    spec = SPECS[name]
    base, model = built(name)
    lime = _perturb(copy.deepcopy(model))
    kw = spec.inputs(base, False, seed=0)
    ref = _outs(spec, lime, kw)
    limeify.save_lime(lime, tmp_path)
    reloaded = limeify.load_lime(copy.deepcopy(base), tmp_path)
    assert [s.stack for s in limeify.attention_sites(reloaded)] == [s.stack for s in limeify.attention_sites(lime)]
    _assert_same(ref, _outs(spec, reloaded, kw))
    limeify.unlimeify(lime)
    _assert_same(_outs(spec, base, kw), _outs(spec, lime, kw))
    sd, base_sd = lime.state_dict(), base.state_dict()
    assert list(sd) == list(base_sd) and all(torch.equal(sd[k], base_sd[k]) for k in sd)


def test_layers_per_stack(built):
    base, _ = built("bart")
    enc, dec = "model.encoder.layers.*.self_attn", "model.decoder.layers.*.encoder_attn"
    model = limeify.limeify(copy.deepcopy(base), LimeConfig(layers={enc: [2], dec: [1, 2]}))
    sites = limeify.attention_sites(model)
    assert sorted((sites[l].stack, sites[l].depth) for l in limeify.routers(model)) == sorted([(enc, 2), (dec, 1), (dec, 2)])
    with pytest.raises(LimeError, match="ambiguous"):
        limeify.limeify(copy.deepcopy(base), LimeConfig(layers=[1]))
    with pytest.raises(LimeError, match="unknown stacks"):
        limeify.limeify(copy.deepcopy(base), LimeConfig(layers={"model.encoder": [1]}))
    with pytest.raises(LimeError, match="out of range"):
        limeify.limeify(copy.deepcopy(base), LimeConfig(layers={enc: [0]}))
    # Explicit sites carry their stack: limeify with the discovered ones is the same retrofit.
    again = limeify.limeify(copy.deepcopy(base), LimeConfig(sites=sites))
    assert limeify.attention_sites(again) == sites


def test_adapter_saved_before_stacks(built, tmp_path):
    """limeify 0.1 saved no stacks: single-stack adapters load, multi-stack ones fail clearly."""
    import json

    from conftest import example_for, make_llama

    base = make_llama()
    lime = _perturb(limeify.limeify(copy.deepcopy(base)))
    limeify.save_lime(lime, tmp_path)
    meta = json.loads((tmp_path / "lime_config.json").read_text())
    meta["limeify_version"] = "0.1.0"
    meta["fingerprint"].pop("stacks")
    for site in meta["config"]["sites"]:
        site.pop("stack"), site.pop("depth")
    (tmp_path / "lime_config.json").write_text(json.dumps(meta))
    x = example_for("llama")
    with torch.no_grad():
        ref = lime(x).logits
    for verify in (True, False):
        with torch.no_grad():
            assert torch.equal(limeify.load_lime(copy.deepcopy(base), tmp_path, verify_sites=verify)(x).logits, ref)

    bart, _ = built("bart")
    old = tmp_path / "bart"
    limeify.save_lime(limeify.limeify(copy.deepcopy(bart)), old)
    meta = json.loads((old / "lime_config.json").read_text())
    meta["limeify_version"] = "0.1.0"
    meta["fingerprint"].pop("stacks")
    (old / "lime_config.json").write_text(json.dumps(meta))
    fresh = copy.deepcopy(bart)
    with pytest.raises(LimeError, match="saved by limeify 0.1.0.*as one"):
        limeify.load_lime(fresh, old)
    assert not limeify.is_limeified(fresh)


def test_model_that_does_not_export_whole_is_traced_stack_by_stack():
    base = M.make_qwen2_vl()
    kw = M.qwen2_vl_inputs()
    with pytest.raises(LimeError, match="cannot build pixel_values"):  # not a text-only retrofit, silently
        limeify.limeify(copy.deepcopy(base))
    with pytest.raises(Exception), torch.no_grad():  # the whole model does not export ...
        torch.export.export(base, (), kwargs={**kw, "use_cache": False}, strict=False)
    model = limeify.limeify(copy.deepcopy(base), example_inputs=kw)  # ... so each stack is traced alone
    stacks = stacks_of(limeify.attention_sites(model))
    assert [(name, len(group)) for name, group in stacks.items()] == [
        ("model.visual.blocks.*.attn", 2), ("model.language_model.layers.*.self_attn", 2)]
    with torch.no_grad():
        ref = base(**kw).logits
        assert torch.equal(model(**kw).logits, ref)
        for stack in stacks:
            lime = _perturb(copy.deepcopy(model), stacks={stack})
            assert not torch.allclose(lime(**kw).logits, ref, atol=1e-5), stack
    # The vision tower's output does not depend on the text around the image tokens.
    lime = _perturb(copy.deepcopy(model))
    seen = []
    handle = lime.model.visual.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state) and None)
    with torch.no_grad():
        for seed in (0, 1):
            lime(**M.qwen2_vl_inputs(seed=seed) | {"pixel_values": kw["pixel_values"]})
    handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_activation_checkpointing_gives_the_same_router_gradients(built, name):
    """Checkpointed encoder and decoder layers are recomputed in backward: each finds its own call."""
    spec = SPECS[name]
    base, model = built(name)
    kw = spec.inputs(base, True, seed=0)
    labels = _ids(2, kw["decoder_input_ids"].shape[1], 5)
    grads = []
    for checkpointing in (False, True):
        lime = _perturb(copy.deepcopy(model)).train()
        # Dropout stays on: checkpoint restores the RNG state for recomputation, so one seed
        # gives both runs the same masks.
        torch.manual_seed(0)
        if checkpointing:
            lime.activation_checkpointing_enable()
        lime(**kw, labels=labels).loss.backward()
        lime(**spec.inputs(base, False, seed=3), labels=labels[:, :5].contiguous()).loss.backward()  # a second call, other lengths
        grads.append({layer: r.weight.grad.clone() for layer, r in limeify.routers(lime).items()})
    assert grads[0].keys() == grads[1].keys()
    for layer in grads[0]:
        torch.testing.assert_close(grads[1][layer], grads[0][layer], rtol=1e-5, atol=1e-7)
        assert grads[0][layer].abs().sum() > 0


def test_peft_lora_with_routers_round_trip_on_an_encoder_decoder(built, tmp_path):
    from peft import LoraConfig

    base, _ = built("bart")
    kw = _seq2seq_inputs(base, False, seed=0)
    model = limeify.get_lime_peft_model(copy.deepcopy(base),
                                        peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_2_SEQ_LM"))
    _perturb(model)  # the active adapter's router copies
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        ref = model(**kw).logits
        assert not torch.allclose(ref, base(**kw).logits, atol=1e-4)
    limeify.save_lime_peft(model, tmp_path)
    loaded = limeify.load_lime_peft(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).logits, ref)


class _TwoTowers(torch.nn.Module):
    """A user's module with two stacks whose forward branches on data: neither fx nor export trace it whole."""

    def __init__(self) -> None:
        super().__init__()
        from conftest import NanoBlock

        torch.manual_seed(0)
        self.left = torch.nn.ModuleList([NanoBlock(32, 4) for _ in range(2)])
        self.right = torch.nn.ModuleList([NanoBlock(32, 4) for _ in range(3)])

    def forward(self, x):
        h = x
        for block in self.left:
            h = block(h)
        g = x if x.sum() > 0 else -x
        for block in self.right:
            g = block(g)
        return h, g


def test_user_module_that_does_not_trace_whole_is_traced_part_by_part():
    base = _TwoTowers().eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    model = limeify.limeify(copy.deepcopy(base), example_inputs=x)
    assert [(n, len(g)) for n, g in stacks_of(limeify.attention_sites(model)).items()] == [("left.*.attn", 2), ("right.*.attn", 3)]
    with torch.no_grad():
        ref = base(x)
        assert all(torch.equal(a, b) for a, b in zip(model(x), ref))
        got = _perturb(copy.deepcopy(model), stacks={"right.*.attn"})(x)
    assert torch.equal(got[0], ref[0]) and not torch.allclose(got[1], ref[1], atol=1e-5)


def test_nothing_traceable_raises_the_trace_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x) if x.sum() > 0 else x

    model = Branchy()
    with pytest.raises(LimeError, match="could not trace Branchy"):
        limeify.limeify(model, example_inputs=torch.ones(2, 8))  # runs proj, which traces but has no attention
    assert not limeify.is_limeified(model)


def test_parts_that_do_not_trace_are_named_not_skipped():
    class OwnWeights(torch.nn.Module):
        """Attention computed with the module's own matrix, after a data-dependent branch."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            x = x * 2 if x.sum() > 0 else x
            return torch.softmax(x @ self.w @ x.transpose(-1, -2), -1) @ x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = OwnWeights(), OwnWeights()

        def forward(self, x):
            return self.second(self.first(x) if x.mean() > 0 else x)

    model = Outer()
    with pytest.raises(LimeError, match="first, second do not trace"):
        limeify.limeify(model, example_inputs=torch.ones(2, 4, 8))
    assert not limeify.is_limeified(model)
