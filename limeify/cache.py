"""The per-forward value cache and the autograd functions that read from it.

Each forward pass gets one :class:`ValueCache`. Every attention layer writes its raw K (and
V) into a preallocated per-role buffer that holds all layers, slot ``l`` for layer ``l``.
Layer ``l`` then mixes the first ``l + 1`` slots with one batched matmul over tokens, so
nothing is concatenated and the buffer, one copy of each layer's raw K/V, is the only extra
activation kept for backward: memory is linear in depth.

The buffer is token-major, ``M`` tokens by ``L*G`` source heads by head size ``d``, so a
layer's slot is written without transposing its output and the mix comes out in the layout
the attention consumes. Its inner order depends on whether the forward can be
differentiated (measured on CPU, GPT-2-small shape, see benchmarks/):

* no grad: ``[M, L*G, d]``. The forward mix is a batch of ``[G, n] @ [n, d]`` products, the
  fastest forward layout.
* grad: ``[M, d, L*G]``. The backward contracts over tokens and head size; here they merge
  into one dimension, so both backward products are single ``mm`` calls over a strided
  view, which more than pays for a slower forward.

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


# Forwards over at most this many tokens that start without grad reuse one buffer per role
# and shape across calls, with its per-layer views made once: in token-by-token decoding the
# per-op cost of slicing, not arithmetic, dominates the mix. Few and small, so the memory
# held between calls stays small (LLaMA-7B shape, bf16: 4 MiB per role and shape).
SCRATCH_TOKENS = 16
SCRATCH_SHAPES = 4


class ValueCache:
    """Raw K/V of every layer during one forward pass, keyed by layer index.

    Writes overwrite their slot, so re-running a layer (activation recomputation) never
    double-counts it. ``sources_last`` picks the ``[M, d, L*G]`` layout (for backward).
    ``scratch`` (owned by the model's :class:`CacheLifecycle`, given only to forwards that
    start without grad) holds buffers and their per-layer views that small forwards reuse.
    """

    __slots__ = ("num_layers", "sources_last", "buffers", "grads", "grad_task", "memo", "traced",
                 "scratch", "views", "scratch_keys", "__weakref__")

    def __init__(self, num_layers: int, sources_last: bool = False, scratch: Optional[dict] = None) -> None:
        self.num_layers = num_layers
        self.sources_last = sources_last
        self.scratch = scratch
        # role -> (slot views shaped like raw K/V, source-prefix views [M, (l+1)G, d], buffer)
        self.views: dict[str, tuple[list, list, torch.Tensor]] = {}
        self.scratch_keys: dict[str, tuple] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.grad_task: dict[str, int] = {}
        # Per-layer values a router computes once and reuses for K and V (see ``memoized``).
        self.memo: dict[int, tuple] = {}
        # Under torch.compile: each layer's raw K/V as a graph value (see ``_traced_mix``).
        self.traced: dict[str, list] = {}

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

    def store(self, role: str, layer: int, raw: torch.Tensor, heads: int) -> torch.Tensor:
        """Store ``raw`` (``[..., G*d]``) outside autograd; returns layers ``0..layer`` as ``[M, (layer+1)G, d]``."""
        if self.sources_last:
            return self.sources(self.write(role, layer, raw, heads), (layer + 1) * heads)
        views = self.views.get(role)
        if views is None:
            views = self._open(role, raw, heads)
        slot = views[0][layer]
        if slot.shape != raw.shape:
            raise LimeError(
                f"layer {layer} produced {role} of {tuple(raw.shape)}, which does not match earlier layers "
                f"({tuple(slot.shape)}); LIMe mixes K/V across layers, so all layers must see the same tokens"
            )
        slot.copy_(raw)
        return views[1][layer]

    def _open(self, role: str, raw: torch.Tensor, heads: int) -> tuple[list, list, torch.Tensor]:
        """The role's ``[M, L*G, d]`` buffer with its per-layer views, reused from scratch if small."""
        tokens = raw.numel() // raw.shape[-1]
        reuse = self.scratch is not None and tokens <= SCRATCH_TOKENS
        key = (role, raw.shape, heads, raw.dtype, raw.device, torch.is_inference_mode_enabled())
        views = self.scratch.get(key) if reuse else None
        if views is None:
            buf = raw.new_empty(tokens, self.num_layers * heads, raw.shape[-1] // heads)
            # Views of .data: later layers write their own slots in place; slots saved for
            # backward by earlier layers never change, so autograd's version check must not see
            # these writes.
            base = buf.data
            views = (
                [base[:, l * heads : (l + 1) * heads].view(raw.shape) for l in range(self.num_layers)],
                [base[:, : (l + 1) * heads] for l in range(self.num_layers)],
                buf,
            )
            if reuse:
                if len(self.scratch) >= SCRATCH_SHAPES:
                    del self.scratch[next(iter(self.scratch))]
                self.scratch[key] = views
        if reuse:
            self.scratch_keys[role] = key
        self.views[role] = views
        self.buffers[role] = views[2]
        return views

    def write(self, role: str, layer: int, raw: torch.Tensor, heads: int) -> torch.Tensor:
        """Store ``raw`` (``[..., G*d]``) in slot ``layer`` for a differentiable mix; returns the role's buffer."""
        if not self.sources_last:
            self.store(role, layer, raw, heads)
            key = self.scratch_keys.pop(role, None)
            if key is not None:
                # Autograd will keep this buffer for backward: no later forward may reuse it.
                self.scratch.pop(key, None)
            return self.buffers[role]
        d = raw.shape[-1] // heads
        tokens = raw.numel() // raw.shape[-1]
        buf = self.buffers.get(role)
        shape = (tokens, d, self.num_layers * heads)
        if buf is None or buf.shape != shape or buf.dtype != raw.dtype:
            if layer != 0 and buf is not None:
                raise LimeError(
                    f"layer {layer} produced {role} of {tuple(raw.shape)}, which does not match "
                    f"earlier layers ({tuple(buf.shape)} for {self.num_layers} layers, {buf.dtype}); "
                    "LIMe mixes K/V across layers, so all layers must see the same tokens"
                )
            buf = raw.new_empty(shape)
            self.buffers[role] = buf
        # .data as in _open; callers run with grad off or on inputs that need none, so raw
        # needs no detach.
        self.slot(buf.data, layer, heads).copy_(raw.reshape(tokens, heads, d))
        return buf

    def sources(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` source heads of ``buf`` (or of its gradient buffer) as ``[M, n, d]``."""
        return buf[:, :, :n].transpose(1, 2) if self.sources_last else buf[:, :n]

    def slot(self, buf: torch.Tensor, layer: int, heads: int) -> torch.Tensor:
        """Layer ``layer``'s heads of ``buf`` (or of its gradient buffer) as ``[M, G, d]``."""
        return self.sources(buf, (layer + 1) * heads)[:, layer * heads :]

    def traced_slots(self, role: str, layer: int, raw: torch.Tensor, heads: int) -> list[torch.Tensor]:
        """Layers ``0..layer``'s raw K/V as graph values, each ``[M, G, d]`` (torch.compile)."""
        slots = self.traced.setdefault(role, [None] * self.num_layers)
        slots[layer] = raw.reshape(-1, heads, raw.shape[-1] // heads)
        return slots[: layer + 1]

    def grad_buffer(self, role: str, like: torch.Tensor) -> torch.Tensor:
        """Accumulated source gradients for this backward pass (new zeros for a new pass)."""
        task = torch._C._current_graph_task_id()
        gbuf = self.grads.get(role)
        if gbuf is None or self.grad_task.get(role) != task or gbuf.dtype != like.dtype:
            gbuf = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            self.grads[role] = gbuf
            self.grad_task[role] = task
        return gbuf


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

    Compiled autograd cannot see through ``write``'s in-place slot writes (it would save the
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
        cache.write(role, layer, raw, heads)
        ctx.cache, ctx.role, ctx.layer, ctx.heads = cache, role, layer, heads
        return raw.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cache = ctx.cache
        gbuf = cache.grads.get(ctx.role)
        if gbuf is not None and cache.grad_task.get(ctx.role) == torch._C._current_graph_task_id():
            grad = grad + cache.slot(gbuf, ctx.layer, ctx.heads).reshape(grad.shape)
        return grad, None, None, None, None


class _StaticMix(torch.autograd.Function):
    """``out = W @ sources[:(l+1)G]`` per token, saving only the shared buffer."""

    @staticmethod
    def forward(ctx, weight, raw, cache, role, layer):
        heads = weight.shape[0]
        buf = cache.write(role, layer, raw, heads)
        mixed = _mix_heads(weight, cache.sources(buf, (layer + 1) * heads))
        ctx.save_for_backward(weight, buf)
        ctx.cache, ctx.role, ctx.layer = cache, role, layer
        return mixed.view(raw.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, buf = ctx.saved_tensors
        cache, heads = ctx.cache, weight.shape[0]
        n = (ctx.layer + 1) * heads
        w = weight.to(buf.dtype)
        g = grad.reshape(-1, heads, grad.shape[-1] // heads).to(buf.dtype)  # [M, G, d]
        if cache.sources_last:
            # [M, d, L*G]: tokens and head size merge, so each product is one mm.
            g = g.transpose(1, 2).reshape(-1, heads)  # [M*d, G]
        grad_w = grad_raw = None
        if ctx.needs_input_grad[0]:
            if cache.sources_last:
                grad_w = torch.mm(g.t(), buf.view(-1, buf.shape[-1])[:, :n])
            else:
                grad_w = torch.bmm(g, cache.sources(buf, n).transpose(1, 2)).sum(0)
            grad_w = grad_w.to(weight.dtype)
        if ctx.needs_input_grad[1]:
            gbuf = cache.grad_buffer(ctx.role, buf)
            if cache.sources_last:
                gbuf.view(-1, gbuf.shape[-1])[:, :n].addmm_(g, w)
            else:
                cache.sources(gbuf, n).baddbmm_(w.t().expand(g.shape[0], n, heads), g)
            grad_raw = cache.slot(gbuf, ctx.layer, heads).reshape(grad.shape)
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
        return _token_mix(coef, cache, buf, raw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        coef, buf = ctx.saved_tensors
        cache = ctx.cache
        heads, n_src = coef.shape[-2], coef.shape[-1]
        src = _token_sources(cache, buf, heads, n_src)  # [M, J, G, d]
        g = grad.reshape(-1, heads, grad.shape[-1] // heads).to(buf.dtype)  # [M, G, d]
        c = coef.reshape(-1, heads, n_src).to(buf.dtype)  # [M, G, J]
        grad_c = grad_raw = None
        if ctx.needs_input_grad[0]:
            grad_c = torch.einsum("mgd,mjgd->mgj", g, src).reshape(coef.shape).to(coef.dtype)
        if ctx.needs_input_grad[1]:
            gbuf = cache.grad_buffer(ctx.role, buf)
            _token_sources(cache, gbuf, heads, n_src).add_(torch.einsum("mgj,mgd->mjgd", c, g))
            grad_raw = cache.slot(gbuf, ctx.layer, heads).reshape(grad.shape)
        return grad_c, grad_raw, None, None, None


def _token_sources(cache: ValueCache, buf: torch.Tensor, heads: int, n_src: int) -> torch.Tensor:
    return cache.sources(buf, n_src * heads).unflatten(1, (n_src, heads))


def _token_mix(coef: torch.Tensor, cache: ValueCache, buf: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    return _mix_tokens(coef, cache.sources(buf, coef.shape[-1] * coef.shape[-2])).reshape(raw.shape)


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
    if torch.compiler.is_compiling():
        return _traced_mix(_mix_tokens, coef, raw, cache, role, layer, coef.shape[-2])
    if torch.is_grad_enabled() and (raw.requires_grad or coef.requires_grad):
        return _TokenMix.apply(coef, raw, cache, role, layer)
    return _mix_tokens(coef, cache.store(role, layer, raw, coef.shape[-2])).reshape(raw.shape)


def record(raw: torch.Tensor, cache: ValueCache, role: str, layer: int, heads: int) -> torch.Tensor:
    """Store a layer's raw K/V as a source for later layers; returns it unchanged."""
    if torch.compiler.is_compiling():
        cache.traced_slots(role, layer, raw, heads)
        return raw
    if torch.is_grad_enabled() and raw.requires_grad:
        return _Record.apply(raw, cache, role, layer, heads)
    cache.store(role, layer, raw, heads)
    return raw


def static_mix(
    weight: torch.Tensor, raw: torch.Tensor, cache: ValueCache, role: str, layer: int
) -> torch.Tensor:
    """Mix layers ``0..layer`` with ``weight`` of shape ``[G, (layer+1)*G]`` (LIME.md layout)."""
    if torch.compiler.is_compiling():
        return _traced_mix(_mix_heads, weight, raw, cache, role, layer, weight.shape[0])
    if torch.is_grad_enabled() and (raw.requires_grad or weight.requires_grad):
        return _StaticMix.apply(weight, raw, cache, role, layer)
    return _mix_heads(weight, cache.store(role, layer, raw, weight.shape[0])).view(raw.shape)


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
        self.scratch: dict[tuple, tuple] = {}

    def begin(self) -> None:
        self.grad_at_start = torch.is_grad_enabled()
        scratch = None if self.grad_at_start else self.scratch
        self.active = ValueCache(self.num_layers, sources_last=self.grad_at_start, scratch=scratch)
        self.last = weakref.ref(self.active)

    def end(self) -> None:
        self.active = None

    def current(self, layer: int) -> ValueCache:
        if self.active is not None:
            if self.grad_at_start and not torch.is_grad_enabled():
                raise LimeError(
                    "gradient was switched off inside the forward pass, as reentrant "
                    "activation checkpointing (use_reentrant=True) does; it would silently drop "
                    "LIMe's cross-layer gradients. Use non-reentrant checkpointing: "
                    "model.activation_checkpointing_enable() (transformers >= 5.24, non-reentrant by "
                    "default), model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}) in older transformers, or "
                    "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
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
