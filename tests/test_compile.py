"""torch.compile of limeified models for training: gradients equal eager, memory linear in depth.

Compiled with the ``aot_eager`` backend: it runs dynamo and AOTAutograd (where limeify's
compiled path and its recompute region matter) without inductor's C++ build time. Inference
compile with the default backend is tested in test_training.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import limeify
from limeify import LimeConfig

from conftest import make_gpt2, make_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench import parameter_pointers, saved_bytes  # noqa: E402


def _grads(model, x):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(model(x, labels=x).loss, params)


@pytest.mark.parametrize(
    "build,mechanism,fullgraph",
    [(make_llama, "static", True), (make_llama, "dynamic", True), (make_gpt2, "static", False)],
    ids=["llama-static", "llama-dynamic", "gpt2-fused-static"],
)
def test_compiled_training_gradients_equal_eager(build, mechanism, fullgraph):
    # GPT-2's modeling code calls a logger during training, which dynamo cannot put in one
    # graph, with or without limeify; fullgraph is checked on LLaMA.
    torch._dynamo.reset()
    model = limeify.limeify(build("sdpa"), LimeConfig(mechanism=mechanism, init="paper")).train()
    x = torch.randint(3, 64, (2, 8))
    eager = _grads(model, x)
    compiled = _grads(torch.compile(model, backend="aot_eager", fullgraph=fullgraph), x)
    assert len(eager) == len(compiled) > 0
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    router_grads = [g for g, p in zip(compiled, model.parameters()) if p in set(limeify.routers(model)[2].parameters())]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)


def test_compiled_training_saves_raw_kv_once_per_layer():
    """Saved activations beyond the compiled base grow by a constant amount per layer, at most
    1.5x one layer's raw K+V (hand-computed below); concatenating all earlier layers' K/V and
    saving it, as a naive compiled graph does, would grow with depth."""
    batch, seq, kv_heads, head_dim = 1, 32, 2, 8  # make_llama: hidden 32, 4 heads, 2 KV heads
    raw_kv = 2 * batch * seq * kv_heads * head_dim * 4  # float32 K and V of one layer
    extra = {}
    for depth in (2, 6):
        x = torch.randint(3, 64, (batch, seq))
        counts = {}
        for name in ("base", "lime"):
            torch._dynamo.reset()
            model = make_llama("sdpa", layers=depth).train()
            if name == "lime":
                limeify.limeify(model, LimeConfig(init="paper"))
            compiled = torch.compile(model, backend="aot_eager")
            compiled(x, labels=x).loss.backward()
            counts[name] = saved_bytes(lambda: compiled(x, labels=x).loss, parameter_pointers(model))
        extra[depth] = (counts["lime"] - counts["base"]) / depth / raw_kv
    assert extra[2] == pytest.approx(extra[6], rel=0.05)
    assert 0 < extra[6] <= 1.5
