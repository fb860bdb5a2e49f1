"""Training compatibility: plain optimizers, Trainer, activation checkpointing, bf16, torch.compile, DDP."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import limeify
from limeify import LimeConfig

from conftest import example_for, make_llama

TESTS = Path(__file__).resolve().parent


_SITES: dict[int, list] = {}


def _lime(model, **config):
    """limeify with the sites discovered once per depth (discovery has its own tests; tracing is slow)."""
    return limeify.limeify(model, LimeConfig(sites=_lime_sites(model.config.num_hidden_layers), **config))


def _lime_sites(layers):
    if layers not in _SITES:
        _SITES[layers] = limeify.discover_sites(make_llama(layers=layers))
    return _SITES[layers]


def _randomize(model, scale=0.3, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in limeify.router_parameters(model):
            w.add_(torch.randn_like(w) * scale)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _router_grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()
    return [w.grad.clone() for w in limeify.router_parameters(model)]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _train_routers(model, x, steps):
    """``steps`` AdamW steps on the routers (lr 1e-2); returns the optimizer and the losses."""
    opt = torch.optim.AdamW(limeify.router_param_groups(model, router_lr=1e-2))
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


# --- plain torch optimizer ----------------------------------------------------------------


def test_router_only_training_lowers_loss_and_keeps_base_bit_identical():
    model = _lime(make_llama()).train()
    trainable, total = limeify.mark_only_routers_trainable(model, verbose=False)
    assert trainable == sum(w.numel() for w in limeify.router_parameters(model)) and trainable < total
    router_names = {n for n, _ in model.named_parameters() if "lime_router" in n}
    assert len(router_names) == 2
    base = {k: v.clone() for k, v in model.state_dict().items() if k not in router_names}
    routers_before = [w.detach().clone() for w in limeify.router_parameters(model)]

    x = example_for("llama", batch=4)
    opt, losses = _train_routers(model, x, steps=10)
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    with torch.no_grad():
        final = model(x, labels=x).loss.item()
    assert final < losses[0] - 1e-3, (losses, final)

    sd = model.state_dict()
    assert set(sd) - set(base) == router_names
    unchanged = [k for k in base if torch.equal(sd[k], base[k])]
    assert unchanged == list(base)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in router_names)
    assert all(not torch.equal(a, b) for a, b in zip(routers_before, limeify.router_parameters(model)))


# --- transformers Trainer -----------------------------------------------------------------


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(3, 60, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_router_only_checkpoint_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _lime(make_llama()).train()
    limeify.mark_only_routers_trainable(model, verbose=False)
    router_names = sorted(n for n, _ in model.named_parameters() if "lime_router" in n)
    base = {k: v.clone() for k, v in model.state_dict().items() if k not in router_names}
    before = [w.detach().clone() for w in limeify.router_parameters(model)]

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], save_strategy="steps", save_steps=3, logging_steps=1,
                             disable_tqdm=True, seed=0)
    opt = torch.optim.AdamW(limeify.router_param_groups(model, router_lr=1e-2))
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(), optimizers=(opt, None))
    trainer.train()
    model.eval()

    after = [w.detach().clone() for w in limeify.router_parameters(model)]
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(before, after))  # Trainer really stepped the routers
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())

    ckpt = tmp_path / "run" / "checkpoint-3"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert sorted(k for k in saved if "lime" in k) == router_names
    for name, w in zip(router_names, after):
        assert torch.equal(saved[name], w)

    x = example_for("llama")
    ref = _logits(model, x)
    # 1. The Trainer checkpoint's weights, loaded strictly into a fresh limeified model.
    fresh = _lime(make_llama())
    fresh.load_state_dict(saved, strict=True)
    assert torch.equal(_logits(fresh, x), ref)
    # 2. The same checkpoint through from_pretrained (base weights; router keys are unexpected),
    #    then limeify and load the router tensors.
    from transformers import AutoModelForCausalLM

    pretrained = _lime(AutoModelForCausalLM.from_pretrained(str(ckpt)).eval())
    missing, unexpected = pretrained.load_state_dict({k: saved[k] for k in router_names}, strict=False)
    assert not unexpected and set(missing) == set(pretrained.state_dict()) - set(router_names)
    assert torch.equal(_logits(pretrained, x), ref)
    # 3. The few-kilobyte adapter path.
    limeify.save_lime(model, tmp_path / "adapter")
    reloaded = limeify.load_lime(make_llama(), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, x), ref)


# --- activation checkpointing -------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["all", "routers"])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["transformers_default", "nonreentrant"])
def test_gradient_checkpointing_same_router_gradients(kwargs, trainable):
    x = example_for("llama", batch=3)
    model = _randomize(_lime(make_llama(layers=4)).train())
    if trainable == "routers":
        limeify.mark_only_routers_trainable(model, verbose=False)
    plain = _router_grads(model, x)
    assert all(g.abs().sum() > 0 for g in plain)
    if kwargs is None:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_gradient_checkpointing
    ckpt = _router_grads(model, x)
    assert _max_diff(plain, ckpt) <= 1e-6
    again = _router_grads(model, x)  # a second pass must not see stale cached gradients
    assert _max_diff(plain, again) <= 1e-6


def test_gradient_checkpointing_two_training_steps_match():
    x = example_for("llama", batch=3)
    # Two independently built models (not copy.deepcopy: see test_deepcopy_of_limeified_model_is_independent).
    ref, ckpt = (_lime(make_llama(layers=4)).train() for _ in range(2))
    for model in (ref, ckpt):
        limeify.mark_only_routers_trainable(model, verbose=False)
    initial = [w.detach().clone() for w in limeify.router_parameters(ref)]
    ckpt.gradient_checkpointing_enable()

    def run(model):
        _, losses = _train_routers(model, x, steps=2)
        return losses, [w.detach().clone() for w in limeify.router_parameters(model)]

    ref_losses, ref_routers = run(ref)
    ck_losses, ck_routers = run(ckpt)
    assert ref_losses == pytest.approx(ck_losses, abs=1e-6)
    assert ref_losses[1] != ref_losses[0]
    assert _max_diff(ref_routers, ck_routers) <= 1e-6
    assert _max_diff(ref_routers, initial) > 1e-3


def test_deepcopy_of_limeified_model_is_independent():
    original = _lime(make_llama())
    clone = copy.deepcopy(original)
    x = example_for("llama")
    ref = _logits(clone, x)
    _randomize(original, scale=1.0)
    assert torch.equal(_logits(clone, x), ref)  # editing the original must not change the copy
    _randomize(clone, scale=1.0, seed=9)
    assert not torch.equal(_logits(clone, x), ref)  # and the copy's own routers must matter
    edited = _logits(original, x)
    limeify.unlimeify(clone)  # removing the copy's hooks must leave the original limeified
    assert limeify.is_limeified(original) and torch.equal(_logits(original, x), edited)


# --- dtypes -------------------------------------------------------------------------------


def test_bf16_autocast_forward_backward_gives_finite_router_grads():
    model = _randomize(_lime(make_llama()).train())
    limeify.mark_only_routers_trainable(model, verbose=False)
    x = example_for("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
        assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for w in limeify.router_parameters(model):
        assert w.dtype == torch.float32 and w.grad.dtype == torch.float32
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    fp32 = _router_grads(model, x)  # autocast grads are an approximation of the fp32 ones
    for g16, g32 in zip([w.grad for w in limeify.router_parameters(model)], fp32):
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_to_dtype_carries_routers(dtype):
    model = _randomize(_lime(make_llama()))
    x = example_for("llama")
    ref = _logits(model, x)
    model.to(dtype)
    ws = limeify.router_parameters(model)
    assert len(ws) == 2 and all(w.dtype == dtype for w in ws)
    assert all(p.dtype == dtype for p in model.parameters())
    out = _logits(model, x)
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float64 else 0.25
    assert (out.float() - ref).abs().max().item() <= tol
    model.train()
    model(x, labels=x).loss.backward()
    assert all(w.grad.dtype == dtype and torch.isfinite(w.grad).all() for w in ws)
    model.to(device="cpu")  # the only device here; routers must stay put and keep working
    assert all(w.device.type == "cpu" for w in limeify.router_parameters(model))


def test_identity_init_bf16_model_equals_base_exactly():
    base = make_llama(dtype=torch.bfloat16)
    model = _lime(copy.deepcopy(base))
    assert all(w.dtype == torch.float32 for w in limeify.router_parameters(model))  # float32 masters
    x = example_for("llama")
    ref, out = _logits(base, x), _logits(model, x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)


@pytest.mark.parametrize("router_dtype", [None, "bfloat16"])
def test_bf16_model_router_training_moves_identity_entries_with_float32_routers(router_dtype):
    """One AdamW step at lr 3e-3 moves every entry by ~lr. Float32 routers (the default in a
    bf16 model) keep that move on the identity entries; in bf16 an upward step rounds back to 1.0
    (the next bf16 number above 1 is 1.0078), so some identity entries stay put."""
    model = _lime(make_llama(dtype=torch.bfloat16), router_dtype=router_dtype).train()
    limeify.mark_only_routers_trainable(model, verbose=False)
    ws = limeify.router_parameters(model)
    eye = [w.detach().clone() == 1 for w in ws]
    opt = torch.optim.AdamW(limeify.router_param_groups(model, router_lr=3e-3))
    x = example_for("llama")
    model(x, labels=x).loss.backward()
    opt.step()
    moved = torch.cat([(w.detach()[e] != 1) for w, e in zip(ws, eye)])
    assert all(w.dtype == (torch.float32 if router_dtype is None else torch.bfloat16) for w in ws)
    if router_dtype is None:
        assert moved.all()
        # the step is what AdamW does in float32 on these gradients: ~lr away from 1
        step = torch.cat([(w.detach()[e] - 1).abs() for w, e in zip(ws, eye)])
        assert ((step > 2e-3) & (step < 4e-3)).all()
    else:
        assert not moved.all()


# --- torch.compile ------------------------------------------------------------------------


def test_torch_compile_matches_eager():
    """Eval/no_grad forward, default backend, one graph (fullgraph: hooks and routers trace
    without breaks). Compiled training is tested in test_compile.py."""
    model = _randomize(_lime(make_llama()), scale=0.5)
    x = example_for("llama")
    ref = _logits(model, x)
    compiled = torch.compile(model, fullgraph=True)
    out = _logits(compiled, x)
    assert (out - ref).abs().max().item() <= 1e-4
    with torch.no_grad():
        limeify.router_parameters(model)[0][0, 0] += 0.5  # a router change reaches the compiled model
    assert (_logits(compiled, x) - _logits(model, x)).abs().max().item() <= 1e-4
    assert (_logits(model, x) - ref).abs().max().item() > 1e-4


# --- DDP ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    import json

    import ddp_worker

    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps([site.to_dict() for site in _lime_sites(3)]))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(TESTS / "ddp_worker.py"), str(tmp_path), str(sites)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(all(r["grads_seen"]) for r in ranks)
    for a, b in zip(ranks[0]["routers"], ranks[1]["routers"], strict=True):
        assert torch.equal(a, b)

    single = ddp_worker.build(str(sites))
    initial = [w.detach().clone() for w in limeify.router_parameters(single)]
    batch = ddp_worker.global_batch()
    losses = ddp_worker.train(single, batch)
    expected = [w.detach() for w in limeify.router_parameters(single)]
    assert _max_diff(ranks[0]["routers"], expected) <= 1e-6
    assert _max_diff(initial, expected) > 1e-3  # the routers did move
    # each rank's loss is the mean over its half of the global batch
    mean_rank_loss = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean_rank_loss == pytest.approx(losses, abs=1e-5)
