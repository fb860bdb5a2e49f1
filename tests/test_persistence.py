"""save_lime/load_lime, PEFT adapters (router-only and with LoRA), and their failure modes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig

import limeify
from limeify import LimeError

from conftest import example_for, make_gpt2, make_llama


def _random_routers(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in limeify.router_parameters(model):
            w.normal_(0, 0.5)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_save_load_roundtrip_is_exact(tmp_path, make):
    base = make()
    x = example_for("llama")
    model = _random_routers(limeify.limeify(copy.deepcopy(base)))
    before = _logits(model, x)
    limeify.save_lime(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lime_config.json", "lime_routers.safetensors"]
    assert (tmp_path / "lime_routers.safetensors").stat().st_size < 4096
    meta = json.loads((tmp_path / "lime_config.json").read_text())
    assert meta["fingerprint"]["layers"] == 3 and meta["config"]["mechanism"] == "static"
    reloaded = limeify.load_lime(copy.deepcopy(base), tmp_path)
    after = _logits(reloaded, x)
    assert after.dtype == before.dtype
    assert torch.equal(after, before)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    sd = model.state_dict()
    return not limeify.is_limeified(model) and list(sd) == list(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


def test_mismatches_raise_and_leave_model_untouched(tmp_path):
    model = _random_routers(limeify.limeify(make_llama()))
    limeify.save_lime(model, tmp_path)

    other_depth = make_llama(layers=4)
    snap = _state(other_depth)
    with pytest.raises(LimeError, match="layers: expected 3 found 4"):
        limeify.load_lime(other_depth, tmp_path)
    assert _unchanged(other_depth, snap)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mha = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=4)).eval()
    with pytest.raises(LimeError, match="num_kv_heads: expected 2 found 4"):
        limeify.load_lime(mha, tmp_path)
    assert not limeify.is_limeified(mha)

    fresh = make_llama()
    snap = _state(fresh)
    meta = json.loads((tmp_path / "lime_config.json").read_text())
    meta["config"]["layers"] = [2]
    (tmp_path / "lime_config.json").write_text(json.dumps(meta))
    with pytest.raises(LimeError, match=r"unexpected \['routers.1.weight'\]"):
        limeify.load_lime(fresh, tmp_path)
    assert _unchanged(fresh, snap)
    meta["config"]["layers"] = None
    meta["config"]["mechanism"] = "no-such-mechanism"
    (tmp_path / "lime_config.json").write_text(json.dumps(meta))
    with pytest.raises(LimeError, match="unknown mechanism"):
        limeify.load_lime(fresh, tmp_path)
    meta["config"]["mechanism"] = "static"
    (tmp_path / "lime_config.json").write_text(json.dumps(meta))

    weights = tmp_path / "lime_routers.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LimeError, match="corrupt or truncated"):
        limeify.load_lime(fresh, tmp_path)
    weights.unlink()
    with pytest.raises(LimeError, match="missing"):
        limeify.load_lime(fresh, tmp_path)
    assert _unchanged(fresh, snap)


def test_router_only_peft_model_saves_and_reloads(tmp_path):
    base = make_llama()
    x = example_for("llama")
    model = limeify.get_lime_peft_model(copy.deepcopy(base))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lime_router" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 2 * 4 + 2 * 6
    model.print_trainable_parameters()
    _random_routers(model)
    before = _logits(model, x)
    assert not torch.equal(before, _logits(base, x))
    limeify.save_lime_peft(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "lime_config.json").is_file()
    reloaded = limeify.load_lime_peft(copy.deepcopy(base), tmp_path)
    assert torch.equal(_logits(reloaded, x), before)


def test_lime_with_lora_mixes_after_lora_and_reloads(tmp_path):
    base = make_llama()
    x = example_for("llama")
    lora = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = limeify.get_lime_peft_model(copy.deepcopy(base), peft_config=lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lime_router" in n for n in names)
    _random_routers(model)
    before = _logits(model, x)

    # Independent reference: merge LoRA into plain weights, then limeify with the same routers.
    merged = copy.deepcopy(model).merge_and_unload()
    limeify.unlimeify(merged)
    reference = limeify.limeify(merged)
    with torch.no_grad():
        for w, src in zip(limeify.router_parameters(reference), limeify.router_parameters(model)):
            w.copy_(src)
    assert (before - _logits(reference, x)).abs().max().item() <= 1e-5

    limeify.save_lime_peft(model, tmp_path)
    reloaded = limeify.load_lime_peft(copy.deepcopy(base), tmp_path)
    assert torch.equal(_logits(reloaded, x), before)


def test_get_lime_peft_model_leaves_the_callers_config_alone():
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = limeify.get_lime_peft_model(make_llama(), peft_config=lora)
    assert lora.modules_to_save is None
    assert any("lime_router" in n for n, p in model.named_parameters() if p.requires_grad)


def test_router_param_groups_and_trainable_summary(capsys):
    model = limeify.limeify(make_llama())
    trainable, total = limeify.mark_only_routers_trainable(model)
    assert trainable == 20 and total == sum(p.numel() for p in model.parameters())
    assert "trainable params: 20" in capsys.readouterr().out
    groups = limeify.router_param_groups(model)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.0
    for p in model.parameters():
        p.requires_grad_(True)
    groups = limeify.router_param_groups(model, router_lr=3e-3, base_lr=1e-3)
    assert [g["lr"] for g in groups] == [3e-3, 1e-3] and groups[1]["weight_decay"] == 0.1
    assert sum(p.numel() for g in groups for p in g["params"]) == total


def test_load_without_retracing_uses_saved_sites(tmp_path, monkeypatch):
    model = _random_routers(limeify.limeify(make_llama()))
    limeify.save_lime(model, tmp_path)
    x = example_for("llama")
    with torch.no_grad():
        want = model(x).logits
    traced = limeify.load_lime(make_llama(), tmp_path)

    import limeify.persistence as persistence
    from limeify.injection import lime_state

    def no_trace(*a, **k):
        raise AssertionError("verify_sites=False must not trace the model")

    monkeypatch.setattr(persistence, "discover_sites", no_trace)
    fast = limeify.load_lime(make_llama(), tmp_path, verify_sites=False)
    assert lime_state(fast).sites == lime_state(traced).sites
    with torch.no_grad():
        assert torch.equal(fast(x).logits, want)

    deeper = make_llama(layers=4)
    snap = _state(deeper)
    with pytest.raises(LimeError, match="saved for 3 attention modules but the model has 4"):
        limeify.load_lime(deeper, tmp_path, verify_sites=False)
    assert _unchanged(deeper, snap) and not limeify.is_limeified(deeper)
