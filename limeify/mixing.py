"""The mixing functions routers call: record a layer's raw K/V, mix earlier layers' into it.

Each writes the layer's raw K or V into its call's buffer (limeify/buffers.py) and mixes the
layer's prefix of it. Three paths: no autograd (plain ops on the buffer); autograd (custom
functions that save only the shared buffer and add the sources' gradients into its gradient
buffer instead of returning them); torch.compile (graph values only, :func:`_traced_mix`).

A stack split over devices (an accelerate device map) keeps its buffers on the device its
first layer ran on, the *home* device. A layer elsewhere sends its raw K/V (and per-token
weights) there and gets its mix back, through differentiable copies, so autograd carries the
gradients back across devices: two transfers of one layer's K/V per layer, whatever the depth,
and all mixing arithmetic on the home device.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .buffers import SourceBuffer
from .calls import ValueCache
from .errors import LimeError


def _mix_heads(weight: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``[G, n]`` x ``[M, n, d]`` -> ``[M, G, d]``: one batched matmul, the weight broadcast."""
    if weight.dtype != src.dtype:
        weight = weight.to(src.dtype)
    # bmm on the broadcast weight, not matmul: matmul folds [G, n] @ [M, n, d] into one mm,
    # which copies the strided source prefix every layer (measured ~10% of a GPT-2 forward).
    return torch.bmm(weight.expand(src.shape[0], -1, -1), src)


def _mix_tokens(coef: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``[..., G, J]`` x ``[M, J*G, d]`` -> ``[M, G, d]``: head g of token m reads head g."""
    heads, n_src = coef.shape[-2], coef.shape[-1]
    c = coef.reshape(-1, heads, n_src).to(src.dtype)
    return torch.einsum("mgj,mjgd->mgd", c, src.unflatten(1, (n_src, heads)))


def _traced_mix(mix, weight: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int, heads: int) -> torch.Tensor:
    """The mix without in-place writes, for torch.compile.

    Compiled autograd cannot see through the buffers' in-place slot writes (it would save the
    buffer at one version and find it at another), so a compiled forward concatenates the
    layers' raw K/V as ordinary graph values. Left alone, the compiler saves every layer's
    concatenation for backward (memory quadratic in depth); the checkpoint region makes it
    keep only the raw K/V and recompute the cheap concatenation in backward.
    """
    slots = cache.traced_slots(role, layer, raw, heads)

    def mix_prefix(w: torch.Tensor, *prefix: torch.Tensor) -> torch.Tensor:
        return mix(w, torch.cat(prefix, dim=1))

    if torch.is_grad_enabled():
        out = torch.utils.checkpoint.checkpoint(mix_prefix, weight, *slots, use_reentrant=False)
    else:
        out = mix_prefix(weight, *slots)
    return out.reshape(raw.shape)


class _Record(torch.autograd.Function):
    """A layer without a router: store raw K/V, pass it through, collect later layers' grads."""

    @staticmethod
    def forward(ctx, raw, cache, role, layer, heads):
        # The cache itself, not only the buffer: recomputation in backward finds it by a weak
        # reference, so this node keeps it alive as long as backward may run.
        ctx.cache, ctx.buf, ctx.layer = cache, cache.write(role, layer, raw, heads), layer
        return raw.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        pending = ctx.buf.pending_grad(ctx.layer)
        if pending is not None:
            grad = grad + pending.reshape(grad.shape)
        return grad, None, None, None, None


def _save_sources(ctx, weights: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int, heads: int) -> SourceBuffer:
    """Write ``raw`` into its slot; save only ``weights`` and the shared buffer for backward."""
    buf = cache.write(role, layer, raw, heads, saved=True)
    ctx.save_for_backward(weights, buf.tensor)
    # The cache too (see _Record), so recomputation in backward can still find it.
    ctx.cache, ctx.buf, ctx.layer = cache, buf, layer
    return buf


class _StaticMix(torch.autograd.Function):
    """``out = W @ sources[:(l+1)G]`` per token, saving only the shared buffer."""

    @staticmethod
    def forward(ctx, weight, raw, cache, role, layer):
        buf = _save_sources(ctx, weight, raw, cache, role, layer, weight.shape[0])
        return _mix_heads(weight, buf.prefix(layer)).view(raw.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, tensor = ctx.saved_tensors
        buf, heads = ctx.buf, weight.shape[0]
        n = (ctx.layer + 1) * heads
        w = weight.to(tensor.dtype)
        g = grad.reshape(-1, heads, grad.shape[-1] // heads).to(tensor.dtype)  # [M, G, d]
        if buf.sources_last:
            g = g.transpose(1, 2).reshape(-1, heads)  # [M*d, G]
        grad_w = grad_raw = None
        if ctx.needs_input_grad[0]:
            if buf.sources_last:
                grad_w = torch.mm(g.t(), tensor.view(-1, tensor.shape[-1])[:, :n])
            else:
                grad_w = torch.bmm(g, buf.sources(tensor, n).transpose(1, 2)).sum(0)
            grad_w = grad_w.to(weight.dtype)
        if ctx.needs_input_grad[1]:
            gbuf = buf.grad_buffer()
            if buf.sources_last:
                gbuf.view(-1, gbuf.shape[-1])[:, :n].addmm_(g, w)
            else:
                buf.sources(gbuf, n).baddbmm_(w.t().expand(g.shape[0], n, heads), g)
            grad_raw = buf.slot(gbuf, ctx.layer).reshape(grad.shape)
        return grad_w, grad_raw, None, None, None


class _TokenMix(torch.autograd.Function):
    """``out[t, g] = sum_j coef[t, g, j] * K_j[t, g]``: per-token weights, head g reads head g.

    Like :class:`_StaticMix` it saves only the shared buffer (and the small ``coef``) and adds
    the sources' gradients into the shared gradient buffer instead of returning them.
    """

    @staticmethod
    def forward(ctx, coef, raw, cache, role, layer):
        buf = _save_sources(ctx, coef, raw, cache, role, layer, coef.shape[-2])
        return _mix_tokens(coef, buf.prefix(layer)).reshape(raw.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        coef, tensor = ctx.saved_tensors
        buf = ctx.buf
        heads, n_src = coef.shape[-2], coef.shape[-1]
        src = buf.sources(tensor, n_src * heads).unflatten(1, (n_src, heads))  # [M, J, G, d]
        g = grad.reshape(-1, heads, grad.shape[-1] // heads).to(tensor.dtype)  # [M, G, d]
        c = coef.reshape(-1, heads, n_src).to(tensor.dtype)  # [M, G, J]
        grad_c = grad_raw = None
        if ctx.needs_input_grad[0]:
            grad_c = torch.einsum("mgd,mjgd->mgj", g, src).reshape(coef.shape).to(coef.dtype)
        if ctx.needs_input_grad[1]:
            gbuf = buf.grad_buffer()
            buf.sources(gbuf, n_src * heads).unflatten(1, (n_src, heads)).add_(torch.einsum("mgj,mgd->mjgd", c, g))
            grad_raw = buf.slot(gbuf, ctx.layer).reshape(grad.shape)
        return grad_c, grad_raw, None, None, None


def record(raw: torch.Tensor, cache: ValueCache, role: str, layer: int, heads: int) -> torch.Tensor:
    """Store a layer's raw K/V as a source for later layers; returns it unchanged."""
    home = cache.home(role, raw)
    if raw.device != home:
        stored = record(raw.to(home), cache, role, layer, heads)
        # With grad, later layers' gradients for this layer come back through the stored copy.
        return stored.to(raw.device) if stored.requires_grad else raw
    if torch.compiler.is_compiling():
        cache.traced_slots(role, layer, raw, heads)
        return raw
    if torch.is_grad_enabled() and raw.requires_grad:
        return _Record.apply(raw, cache, role, layer, heads)
    cache.write(role, layer, raw, heads)
    return raw


def static_mix(weight: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int) -> torch.Tensor:
    """Mix layers ``0..layer`` with ``weight`` of shape ``[G, (layer+1)*G]`` (LIME.md layout)."""
    home = cache.home(role, raw)
    if raw.device != home:
        return static_mix(weight.to(home), raw.to(home), cache, role, layer).to(raw.device)
    if torch.compiler.is_compiling():
        return _traced_mix(_mix_heads, weight, raw, cache, role, layer, weight.shape[0])
    if torch.is_grad_enabled() and (raw.requires_grad or weight.requires_grad):
        return _StaticMix.apply(weight, raw, cache, role, layer)
    return _mix_heads(weight, cache.write(role, layer, raw, weight.shape[0]).prefix(layer)).view(raw.shape)


def token_mix(coef: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int) -> torch.Tensor:
    """Mix layers ``0..layer`` per token: ``coef`` ``[..., G, layer+1]`` (leading dims of ``raw``).

    Head ``g`` of the output is ``sum_j coef[..., g, j] * raw_j[..., g, :]``; memory as in
    :func:`static_mix` (only the shared buffer and ``coef`` are kept for backward).
    """
    if coef.shape[-1] != layer + 1 or coef.shape[:-2] != raw.shape[:-1]:
        raise LimeError(
            f"layer {layer}: per-token weights of shape {tuple(coef.shape)} do not fit K/V of "
            f"shape {tuple(raw.shape)} (expected [..., G, {layer + 1}] with the same leading dims)"
        )
    home = cache.home(role, raw)
    if raw.device != home:
        return token_mix(coef.to(home), raw.to(home), cache, role, layer).to(raw.device)
    if torch.compiler.is_compiling():
        return _traced_mix(_mix_tokens, coef, raw, cache, role, layer, coef.shape[-2])
    if torch.is_grad_enabled() and (raw.requires_grad or coef.requires_grad):
        return _TokenMix.apply(coef, raw, cache, role, layer)
    return _mix_tokens(coef, cache.write(role, layer, raw, coef.shape[-2]).prefix(layer)).reshape(raw.shape)
