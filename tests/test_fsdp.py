"""FSDP2 (fully_shard): router training matches one process, save_lime is a collective that rank 0
alone writes, load_lime works into an unsharded and into a fully_shard-ed base."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import limeify
from limeify import LimeConfig, LimeError
from limeify.distributed import is_sharded
from limeify.persistence import CONFIG_NAME, WEIGHTS_NAME

from conftest import make_llama

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_fsdp2_two_processes_train_save_and_load(tmp_path):
    import fsdp_worker

    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps([s.to_dict() for s in limeify.discover_sites(make_llama())]))
    out = tmp_path / "run"
    (out / "results").mkdir(parents=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(TESTS / "fsdp_worker.py"), str(out), str(sites)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "returned a view tensor" not in proc.stderr

    ranks = [torch.load(out / "results" / f"rank{r}.pt") for r in range(2)]
    r0, r1 = ranks
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(r["routers_sharded"] for r in ranks)  # the routers really were DTensor shards

    # (a) training: the same routers as one process on the whole global batch
    single = fsdp_worker.build(str(sites))
    initial = [w.detach().clone() for w in limeify.router_parameters(single)]
    batch = fsdp_worker.global_batch()
    losses = fsdp_worker.train(single, batch)
    expected = [w.detach().clone() for w in limeify.router_parameters(single)]
    expected_grads = [w.grad.clone() for w in limeify.router_parameters(single)]
    for a, b in zip(r0["routers"], r1["routers"], strict=True):
        assert torch.equal(a, b)
    assert _max_diff(r0["grads"], expected_grads) <= 1e-6
    assert _max_diff(r0["routers"], expected) <= 1e-6
    assert _max_diff(initial, expected) > 1e-3  # the routers did move
    mean_rank_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean_rank_loss == pytest.approx(losses, abs=1e-5)

    # (d) rank 0 alone wrote, once; every rank returned with the adapter in place
    adapter = out / "adapter"
    assert r0["writes"] == [str(adapter)] and r1["writes"] == []
    assert all(r["saved_to"] == str(adapter) for r in ranks)
    assert all(r["sees_adapter"] == [CONFIG_NAME, WEIGHTS_NAME] for r in ranks)
    assert sorted(os.listdir(adapter)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(os.listdir(out)) == ["adapter", "results"]  # no staging leftovers, no ghost adapter
    saved = load_file(adapter / WEIGHTS_NAME)
    assert all(torch.equal(saved[f"routers.{layer}.weight"], w) for layer, w in zip((1, 2), r0["routers"], strict=True))

    # (b) the adapter saved from the sharded model, loaded into a fresh unsharded base
    fresh = limeify.load_lime(make_llama(), adapter)
    assert all(torch.equal(a, b) for a, b in zip(limeify.router_parameters(fresh), r0["routers"], strict=True))
    reference = _logits(single, batch)
    loaded = _logits(fresh, batch)
    assert (loaded - reference).abs().max().item() <= 1e-5

    # (c) loaded into a fully_shard-ed base: routers under FSDP, same logits, gradients reduced across ranks
    assert all(r["loaded_sharded"] for r in ranks)
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(r["loaded_routers"], r0["routers"], strict=True))
        assert (r["loaded_logits"] - loaded).abs().max().item() <= 1e-6
    limeify.mark_only_routers_trainable(fresh, verbose=False)
    fresh(input_ids=batch, labels=batch).loss.backward()
    fresh_grads = [w.grad for w in limeify.router_parameters(fresh)]
    assert _max_diff(r0["loaded_grads"], fresh_grads) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(r0["loaded_grads"], r1["loaded_grads"], strict=True))
    fresh.zero_grad(set_to_none=True)
    for p in fresh.parameters():
        p.requires_grad_(True)
    fresh(input_ids=batch, labels=batch).loss.backward()
    assert r0["loaded_all_grads"].keys() == dict(fresh.named_parameters()).keys()
    assert max((r0["loaded_all_grads"][n] - p.grad).abs().max().item() for n, p in fresh.named_parameters()) <= 1e-6
    assert all(r["shard_routers"] for r in ranks)

    # what cannot work raises LimeError on every rank, saying what to do
    for r in ranks:
        assert "already run a forward pass" in r["late_load_error"]
        assert "before its first forward" in r["late_load_error"]
        assert r["late_still_plain"]
        assert "meta device" in r["meta_load_error"] and "to_empty" in r["meta_load_error"]
    assert "meta device" in r0["meta_save_error"] and "to_empty" in r0["meta_save_error"]
    assert "another rank" in r1["meta_save_error"] or "meta device" in r1["meta_save_error"]
    assert r0["failed_save"].startswith("OSError") and "No space left" in r0["failed_save"]
    assert r1["failed_save"].startswith("LimeError") and "rank 0 failed writing the adapter" in r1["failed_save"]


def test_save_lime_meta_routers_raise_lime_error(tmp_path):
    sites = limeify.discover_sites(make_llama())
    model = limeify.limeify(make_llama(), LimeConfig(sites=sites)).to("meta")
    assert not is_sharded(model)
    with pytest.raises(LimeError, match="meta device .*to_empty"):
        limeify.save_lime(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
