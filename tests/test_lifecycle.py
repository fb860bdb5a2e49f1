"""LIMe through the PEFT lifecycle: wrapping after limeify, merge_and_unload, unload, disable_adapter.

References are computed independently: LoRA merged into the weights by hand in the test, or a
fresh limeified base given the same router weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import limeify

from conftest import example_for, make_llama


def _perturb(model, seed=0, routers=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in limeify.routers(model).values() if routers else ():
            for p in router.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _lora_merged_by_hand(base, peft_model, adapter="default"):
    """The base with W + scaling * B @ A written into every LoRA-targeted linear."""
    merged = copy.deepcopy(base)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            path = name.split("base_model.model.", 1)[1]
            delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight * module.scaling[adapter]
            with torch.no_grad():
                merged.get_submodule(path).weight += delta
    return merged


def _with_routers_of(model, source):
    """limeify(model) with ``source``'s router weights (layer by layer)."""
    limeify.limeify(model)
    with torch.no_grad():
        for layer, router in limeify.routers(model).items():
            router.load_state_dict(limeify.routers(source)[layer].state_dict())
    return model


def test_wrapping_after_limeify_rebinds_at_the_next_forward():
    base = make_llama()
    x = example_for("llama")
    lime = _perturb(limeify.limeify(copy.deepcopy(base)))
    wrapped = _perturb(get_peft_model(lime, LoraConfig(r=2, target_modules=["k_proj", "v_proj"])), seed=1)
    got = _logits(wrapped, x)
    # LIMe mixes the LoRA-updated K/V: the same as LIMe on a base whose weights hold the update.
    ref = _logits(_with_routers_of(_lora_merged_by_hand(base, wrapped), wrapped), x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _logits(_lora_merged_by_hand(base, wrapped), x), atol=1e-3)  # LIMe acts


@pytest.fixture
def trained():
    base = make_llama()
    peft = limeify.get_lime_peft_model(copy.deepcopy(base), peft_config=LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    return base, _perturb(peft)


def test_merge_and_unload_keeps_lime_acting_and_training(trained):
    base, peft = trained
    x = example_for("llama")
    before = _logits(peft, x)
    merged = peft.merge_and_unload()
    assert limeify.is_limeified(merged)
    after = _logits(merged, x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, _logits(limeify.unlimeify(copy.deepcopy(merged)), x), atol=1e-3)
    routers = limeify.routers(merged)
    assert all(type(r).__name__ == "StaticRouter" for r in routers.values())
    merged(x).logits.square().mean().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers.values())


def test_unload_gives_the_base_with_the_adapters_routers(trained):
    base, peft = trained
    x = example_for("llama")
    ref = _logits(_with_routers_of(copy.deepcopy(base), peft), x)
    unloaded = peft.unload()
    assert limeify.is_limeified(unloaded)
    assert torch.equal(_logits(unloaded, x), ref)


def test_disable_adapter_gives_the_base_outputs(trained):
    base, peft = trained
    x = example_for("llama")
    with peft.disable_adapter():
        assert torch.equal(_logits(peft, x), _logits(base, x))
    assert not torch.allclose(_logits(peft, x), _logits(base, x), atol=1e-3)


def _reference(base, peft, adapter):
    """LoRA of ``adapter`` merged by hand, LIMe with the routers ``peft`` uses now."""
    return _with_routers_of(_lora_merged_by_hand(base, peft, adapter), peft)


def _two_adapters():
    """A base and its PEFT model with adapters "default" and "b", each with its own LoRA and routers, perturbed."""
    base = make_llama()
    peft = _perturb(limeify.get_lime_peft_model(copy.deepcopy(base), peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    peft.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lime_router"]))
    peft.set_adapter("b")
    _perturb(peft, seed=1)
    return base, peft


def test_several_adapters_switch_routers_with_the_adapter():
    base, peft = _two_adapters()
    x = example_for("llama")
    outputs, weights = {}, {}
    for adapter in ("default", "b", "default"):
        peft.set_adapter(adapter)
        outputs[adapter] = _logits(peft, x)
        weights[adapter] = [r.weight.detach().clone() for r in limeify.routers(peft).values()]
        torch.testing.assert_close(outputs[adapter], _logits(_reference(base, peft, adapter), x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weights["default"][0], weights["b"][0])

    # An adapter without routers: the routers limeify installed (identity), and routers() says so.
    peft.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft.set_adapter("plain")
    _perturb(peft, seed=2, routers=False)
    assert all(torch.equal(r.mixing_matrix(), limeify.routers(limeify.limeify(copy.deepcopy(base)))[layer].mixing_matrix())
               for layer, r in limeify.routers(peft).items())
    with pytest.warns(UserWarning, match="no LIMe routers of its own"):
        got = _logits(peft, x)
    torch.testing.assert_close(got, _logits(_lora_merged_by_hand(base, peft, "plain"), x), rtol=1e-5, atol=1e-5)


def test_add_weighted_adapter_combines_static_routers_linearly():
    base, peft = _two_adapters()
    x = example_for("llama")
    per_adapter = {}
    for adapter in ("default", "b"):
        peft.set_adapter(adapter)
        per_adapter[adapter] = {layer: r.weight.detach().clone() for layer, r in limeify.routers(peft).items()}
    with pytest.raises(ValueError, match="modules_to_save"):  # PEFT alone refuses adapters that both carry routers
        peft.add_weighted_adapter(["default", "b"], [0.3, 0.7], "plain-peft", combination_type="cat")
    limeify.add_weighted_adapter(peft, ["default", "b"], [0.3, 0.7], "mix", combination_type="cat")
    peft.set_adapter("mix")
    for layer, r in limeify.routers(peft).items():
        torch.testing.assert_close(r.weight, 0.3 * per_adapter["default"][layer] + 0.7 * per_adapter["b"][layer])
    # LoRA "cat" keeps each adapter's update scaled by its weight: the merged reference is exact up to rounding.
    torch.testing.assert_close(_logits(peft, x), _logits(_reference(base, peft, "mix"), x), rtol=1e-5, atol=1e-5)
    peft.set_adapter("default")
    torch.testing.assert_close(limeify.routers(peft)[1].weight, per_adapter["default"][1])  # the sources are untouched


@pytest.mark.parametrize("mechanism", ["static", "softmax", "dynamic"])
def test_plain_save_pretrained_then_limeify_from_pretrained_is_exact(tmp_path, mechanism):
    from transformers import LlamaForCausalLM

    base = make_llama()
    x = example_for("llama")
    model = _perturb(limeify.limeify(copy.deepcopy(base), limeify.LimeConfig(mechanism=mechanism, layers=[1, 2])))
    ref = _logits(model, x)
    model.save_pretrained(tmp_path / "plain")  # transformers' own: routers inside model.safetensors
    loaded = limeify.from_pretrained(tmp_path / "plain")
    assert limeify.describe(loaded).startswith(f"mechanism={mechanism},")
    assert torch.equal(_logits(loaded, x), ref)
    limeify.save_pretrained(model, tmp_path / "lime")
    assert torch.equal(_logits(limeify.from_pretrained(tmp_path / "lime"), x), ref)
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "lime"), x), _logits(base, x))
    # convert would reset the trained routers: it refuses, and says what keeps them.
    for src in ("plain", "lime"):
        with pytest.raises(limeify.LimeError, match="from_pretrained"):
            limeify.convert(tmp_path / src, tmp_path / f"{src}-converted", verbose=False)
        assert not (tmp_path / f"{src}-converted").exists()


def test_from_pretrained_without_routers_says_how_to_get_them(tmp_path):
    make_llama().save_pretrained(tmp_path)
    with pytest.raises(limeify.LimeError, match="limeify convert.*save_pretrained"):
        limeify.from_pretrained(tmp_path)


def _checksums(directory):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _fail(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("where", ["weights", "config"])
def test_a_failed_save_leaves_no_partial_adapter_and_the_old_one_intact(tmp_path, monkeypatch, where):
    base = make_llama()
    x = example_for("llama")
    old = _perturb(limeify.limeify(copy.deepcopy(base)))
    limeify.save_lime(old, tmp_path / "adapter")
    before = _checksums(tmp_path / "adapter")
    new = _perturb(limeify.limeify(copy.deepcopy(base)), seed=5)
    target = "limeify.persistence.save_file" if where == "weights" else "limeify.persistence.write_lime_config"
    with monkeypatch.context() as patch:
        patch.setattr(target, _fail)
        for directory in (tmp_path / "adapter", tmp_path / "fresh"):
            with pytest.raises(OSError, match="simulated"):
                limeify.save_lime(new, directory)
    assert not (tmp_path / "fresh").exists()
    assert _checksums(tmp_path / "adapter") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directories left behind
    assert torch.equal(_logits(limeify.load_lime(copy.deepcopy(base), tmp_path / "adapter"), x), _logits(old, x))


def test_a_failed_peft_save_leaves_the_old_adapter_intact(tmp_path, monkeypatch):
    base = make_llama()
    peft = _perturb(limeify.get_lime_peft_model(copy.deepcopy(base), peft_config=LoraConfig(r=2, target_modules=["q_proj"])))
    limeify.save_lime_peft(peft, tmp_path / "adapter")
    before = _checksums(tmp_path / "adapter")
    _perturb(peft, seed=3)
    monkeypatch.setattr("limeify.peft_integration.write_lime_config", _fail)
    with pytest.raises(OSError, match="simulated"):
        limeify.save_lime_peft(peft, tmp_path / "adapter")
    assert _checksums(tmp_path / "adapter") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
