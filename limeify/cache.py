"""The per-forward value cache and the autograd functions that read from it.

Each forward pass gets one :class:`ValueCache`. Every attention layer writes its raw K (and
V) into a preallocated buffer of shape ``[num_layers * G, N]`` (``N`` = tokens x head size),
slot ``l`` holding layer ``l``. Layer ``l`` then mixes the contiguous prefix
``buffer[: (l + 1) * G]`` with one matmul, so nothing is concatenated and the buffer, one
copy of each layer's raw K/V, is the only extra activation kept for backward: memory is
linear in depth.

Backward runs from the last layer down. Layer ``l`` adds ``W_l^T @ grad`` for all its sources
into a gradient buffer of the same shape; by the time layer ``j`` runs its backward, every
later layer has added its share to slot ``j``, which becomes the gradient of raw ``K_j``.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .errors import LimeError


def to_slots(raw: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., G*d]`` -> ``[G, M*d]`` (head-major) so a router is a plain left matmul."""
    d = raw.shape[-1] // heads
    return raw.reshape(-1, heads, d).transpose(0, 1).reshape(heads, -1)


def from_slots(mixed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    heads = mixed.shape[0]
    d = like.shape[-1] // heads
    return mixed.view(heads, -1, d).transpose(0, 1).reshape(like.shape)


class ValueCache:
    """Raw K/V of every layer during one forward pass, keyed by layer index.

    Writes overwrite their slot, so re-running a layer (activation recomputation) never
    double-counts it.
    """

    __slots__ = ("num_layers", "buffers", "grads", "grad_task", "memo", "__weakref__")

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.buffers: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.grad_task: dict[str, int] = {}
        # Per-layer values a router computes once and reuses for K and V (see ``memoized``).
        self.memo: dict[int, tuple] = {}

    def memoized(self, layer: int, key: torch.Tensor, compute):
        """``compute()`` once per ``(layer, key)``: the first call stores it, the second takes it.

        Routers whose weights depend on the layer's input (``key``, the hidden state) call this
        for K and for V; both see the same input tensor, so V reuses what K computed. The entry
        is dropped on reuse and matched by identity through a weak reference, so a re-run of the
        layer (activation recomputation) with a new input tensor computes afresh.
        """
        entry = self.memo.get(layer)
        if entry is not None and entry[0]() is key:
            del self.memo[layer]
            return entry[1]
        value = compute()
        self.memo[layer] = (weakref.ref(key), value)
        return value

    def write(self, role: str, layer: int, raw: torch.Tensor, heads: int) -> torch.Tensor:
        d = raw.shape[-1] // heads
        per_head = raw.numel() // heads
        buf = self.buffers.get(role)
        if buf is None or buf.shape[1] != per_head or buf.dtype != raw.dtype:
            if layer != 0 and buf is not None:
                raise LimeError(
                    f"layer {layer} produced {role} of {tuple(raw.shape)}, which does not match "
                    f"earlier layers ({buf.shape[1]} values per head, {buf.dtype}); LIMe mixes "
                    "K/V across layers, so all layers must see the same tokens"
                )
            buf = raw.new_empty((self.num_layers * heads, per_head))
            self.buffers[role] = buf
        # .data: later layers write their own slots in place; rows saved for backward by
        # earlier layers never change, so autograd's version check must not see these writes.
        # One strided copy straight into the slot (the to_slots layout), no temporary.
        rows = buf.data[layer * heads : (layer + 1) * heads]
        rows.view(heads, -1, d).copy_(raw.detach().reshape(-1, heads, d).transpose(0, 1))
        return buf

    def grad_buffer(self, role: str, like: torch.Tensor) -> torch.Tensor:
        """Accumulated source gradients for this backward pass (new zeros for a new pass)."""
        task = torch._C._current_graph_task_id()
        gbuf = self.grads.get(role)
        if gbuf is None or self.grad_task.get(role) != task or gbuf.dtype != like.dtype:
            gbuf = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            self.grads[role] = gbuf
            self.grad_task[role] = task
        return gbuf


class _Record(torch.autograd.Function):
    """A layer without a router: store raw K/V, pass it through, collect later layers' grads."""

    @staticmethod
    def forward(ctx, raw, cache, role, layer, heads):
        cache.write(role, layer, raw, heads)
        ctx.cache, ctx.role, ctx.layer, ctx.heads = cache, role, layer, heads
        return raw.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gbuf = ctx.cache.grads.get(ctx.role)
        if gbuf is not None and ctx.cache.grad_task.get(ctx.role) == torch._C._current_graph_task_id():
            rows = gbuf[ctx.layer * ctx.heads : (ctx.layer + 1) * ctx.heads]
            grad = grad + from_slots(rows, grad)
        return grad, None, None, None, None


class _StaticMix(torch.autograd.Function):
    """``out = W @ buffer[:(l+1)G]``: one matmul over all sources, saving only the shared buffer."""

    @staticmethod
    def forward(ctx, weight, raw, cache, role, layer):
        heads = weight.shape[0]
        buf = cache.write(role, layer, raw, heads)
        n = (layer + 1) * heads
        mixed = torch.mm(weight.to(buf.dtype), buf[:n])
        ctx.save_for_backward(weight, buf)
        ctx.cache, ctx.role, ctx.layer = cache, role, layer
        return from_slots(mixed, raw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, buf = ctx.saved_tensors
        heads = weight.shape[0]
        n = (ctx.layer + 1) * heads
        g = to_slots(grad, heads).to(buf.dtype)
        grad_w = grad_raw = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.mm(g, buf[:n].t()).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            gbuf = ctx.cache.grad_buffer(ctx.role, buf)
            gbuf[:n].addmm_(weight.t().to(g.dtype), g)
            grad_raw = from_slots(gbuf[ctx.layer * heads : n], grad)
        return grad_w, grad_raw, None, None, None


class _TokenMix(torch.autograd.Function):
    """``out[t, g] = sum_j coef[t, g, j] * K_j[t, g]``: per-token weights, head g reads head g.

    Like :class:`_StaticMix` it saves only the shared buffer (and the small ``coef``) and adds
    the sources' gradients into the shared gradient buffer instead of returning them.
    """

    @staticmethod
    def forward(ctx, coef, raw, cache, role, layer):
        heads = coef.shape[-2]
        buf = cache.write(role, layer, raw, heads)
        ctx.save_for_backward(coef, buf)
        ctx.cache, ctx.role, ctx.layer = cache, role, layer
        return _token_mix(coef, buf, raw, layer)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        coef, buf = ctx.saved_tensors
        heads, n_src = coef.shape[-2], coef.shape[-1]
        n = n_src * heads
        d = grad.shape[-1] // heads
        src = buf[:n].view(n_src, heads, -1, d)  # [J, G, M, d]
        g = grad.reshape(-1, heads, d).to(buf.dtype)  # [M, G, d]
        c = coef.reshape(-1, heads, n_src).to(buf.dtype)  # [M, G, J]
        grad_c = grad_raw = None
        if ctx.needs_input_grad[0]:
            grad_c = torch.einsum("mgd,jgmd->mgj", g, src).reshape(coef.shape).to(coef.dtype)
        if ctx.needs_input_grad[1]:
            gbuf = ctx.cache.grad_buffer(ctx.role, buf)
            gbuf[:n].view(n_src, heads, -1, d).add_(torch.einsum("mgj,mgd->jgmd", c, g))
            grad_raw = from_slots(gbuf[ctx.layer * heads : n], grad)
        return grad_c, grad_raw, None, None, None


def _token_mix(coef: torch.Tensor, buf: torch.Tensor, raw: torch.Tensor, layer: int) -> torch.Tensor:
    heads, n_src = coef.shape[-2], coef.shape[-1]
    d = raw.shape[-1] // heads
    src = buf[: n_src * heads].view(n_src, heads, -1, d)  # [J, G, M, d]
    c = coef.reshape(-1, heads, n_src).to(buf.dtype)  # [M, G, J]
    return torch.einsum("mgj,jgmd->mgd", c, src).reshape(raw.shape)


def token_mix(
    coef: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int
) -> torch.Tensor:
    """Mix layers ``0..layer`` per token: ``coef`` ``[..., G, layer+1]`` (leading dims of ``raw``).

    Head ``g`` of the output is ``sum_j coef[..., g, j] * raw_j[..., g, :]``; memory as in
    :func:`static_mix` (only the shared buffer and ``coef`` are kept for backward).
    """
    if coef.shape[-1] != layer + 1 or coef.shape[:-2] != raw.shape[:-1]:
        raise LimeError(
            f"layer {layer}: per-token weights of shape {tuple(coef.shape)} do not fit K/V of "
            f"shape {tuple(raw.shape)} (expected [..., G, {layer + 1}] with the same leading dims)"
        )
    if torch.is_grad_enabled() and (raw.requires_grad or coef.requires_grad):
        return _TokenMix.apply(coef, raw, cache, role, layer)
    buf = cache.write(role, layer, raw, coef.shape[-2])
    return _token_mix(coef, buf, raw, layer)


def record(raw: torch.Tensor, cache: ValueCache, role: str, layer: int, heads: int) -> torch.Tensor:
    """Store a layer's raw K/V as a source for later layers; returns it unchanged."""
    if torch.is_grad_enabled() and raw.requires_grad:
        return _Record.apply(raw, cache, role, layer, heads)
    cache.write(role, layer, raw, heads)
    return raw


def static_mix(
    weight: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int
) -> torch.Tensor:
    """Mix layers ``0..layer`` with ``weight`` of shape ``[G, (layer+1)*G]`` (LIME.md layout)."""
    if torch.is_grad_enabled() and (raw.requires_grad or weight.requires_grad):
        return _StaticMix.apply(weight, raw, cache, role, layer)
    heads = weight.shape[0]
    buf = cache.write(role, layer, raw, heads)
    return from_slots(torch.mm(weight.to(buf.dtype), buf[: (layer + 1) * heads]), raw)


class CacheLifecycle:
    """Opens a fresh :class:`ValueCache` per forward and drops it when the forward ends.

    After a forward only a weak reference remains: the autograd graph keeps the cache alive
    exactly as long as backward may need it (including non-reentrant activation
    recomputation, which re-runs layers after the forward has returned).
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.active: Optional[ValueCache] = None
        self.last: Optional[weakref.ReferenceType] = None
        self.grad_at_start = False

    def begin(self) -> None:
        self.active = ValueCache(self.num_layers)
        self.last = weakref.ref(self.active)
        self.grad_at_start = torch.is_grad_enabled()

    def end(self) -> None:
        self.active = None

    def current(self, layer: int) -> ValueCache:
        if self.active is not None:
            if self.grad_at_start and not torch.is_grad_enabled():
                raise LimeError(
                    "gradient was switched off inside the forward pass, as reentrant "
                    "activation checkpointing (use_reentrant=True) does; it would silently drop "
                    "LIMe's cross-layer gradients. Use non-reentrant checkpointing: "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}) or torch.utils.checkpoint(..., use_reentrant=False)"
                )
            return self.active
        in_backward = torch._C._current_graph_task_id() != -1
        if not in_backward and layer == 0:
            # The enclosing module's hooks were bypassed (e.g. its .forward called directly).
            self.begin()
            return self.active
        cache = self.last() if self.last is not None else None
        if cache is None:
            raise LimeError(
                f"attention layer {layer} of a limeified model ran outside a forward pass of the "
                "model, so the raw K/V of earlier layers are not available; call the whole model"
            )
        return cache
