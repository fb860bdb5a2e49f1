"""Where one call keeps the raw K (or V) of every layer of its stack: the two buffer layouts.

One buffer per role holds all ``L`` layers, slot ``l`` for layer ``l``. Layer ``l`` mixes the
first ``l + 1`` slots with one batched matmul over tokens, so nothing is concatenated and the
buffer, one copy of each layer's raw K/V, is the only extra activation kept for backward:
memory is linear in depth.

Both layouts are token-major (``M`` tokens first), so a layer's slot is written without
transposing its output and the mix comes out in the layout the attention consumes. The inner
order depends on whether the call can be differentiated (measured on CPU, GPT-2-small shape,
see benchmarks/):

* :class:`HeadsLast` ``[M, L*G, d]``, for calls without grad: the forward mix is a batch of
  ``[G, n] @ [n, d]`` products, the fastest forward layout.
* :class:`SourcesLast` ``[M, d, L*G]``, for calls with grad: backward contracts over tokens
  and head size, which merge into one dimension here, so both backward products are single
  ``mm`` calls over a strided view; that more than pays for a slower forward.

Writes go through ``.data``: later layers write their own slots in place, while the slots that
earlier layers saved for backward never change, so autograd's version counter must not see
these writes. Writes overwrite their slot, so re-running a layer (activation recomputation)
never double-counts it.

Backward runs from the last layer down. Layer ``l`` adds ``W_l^T @ grad`` for all its sources
into a gradient buffer of the same layout (:meth:`SourceBuffer.grad_buffer`); by the time layer
``j`` runs its backward, every later layer has added its share to slot ``j``, which becomes the
gradient of raw ``K_j``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .errors import LimeError

# Calls without grad over at most this many tokens take their buffers from a per-thread
# ScratchPool, with the per-layer views made once: in token-by-token decoding the per-op cost
# of slicing, not arithmetic, dominates the mix. Few and small, so the memory held between
# calls stays small (LLaMA-7B shape, bf16: 4 MiB per role and shape).
SCRATCH_TOKENS = 16
SCRATCH_SHAPES = 4


class SourceBuffer:
    """Raw K (or V) of the ``layers`` layers of one call, ``heads`` heads of size ``d`` each."""

    sources_last = False
    __slots__ = ("tensor", "layers", "heads", "raw_shape", "scratch_key", "_grad", "_grad_task")

    def __init__(self, tensor: torch.Tensor, layers: int, heads: int, raw_shape: torch.Size) -> None:
        self.tensor, self.layers, self.heads, self.raw_shape = tensor, layers, heads, raw_shape
        self.scratch_key: tuple | None = None
        self._grad: torch.Tensor | None = None
        self._grad_task = None

    def check(self, role: str, layer: int, raw: torch.Tensor) -> None:
        if raw.shape != self.raw_shape or raw.dtype != self.tensor.dtype:
            raise LimeError(
                f"layer {layer} produced {role} of {tuple(raw.shape)} ({raw.dtype}), which does not match "
                f"earlier layers of its stack ({tuple(self.raw_shape)}, {self.tensor.dtype}); LIMe mixes K/V "
                "across the layers of one stack, so they must all see the same tokens"
            )

    def write(self, layer: int, raw: torch.Tensor) -> None:
        raise NotImplementedError

    def sources(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` source heads of ``t`` (the buffer or its gradient) as ``[M, n, d]``."""
        raise NotImplementedError

    def slot(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s heads of ``t`` (the buffer or its gradient) as ``[M, G, d]``."""
        return self.sources(t, (layer + 1) * self.heads)[:, layer * self.heads :]

    def grad_buffer(self) -> torch.Tensor:
        """The sources' gradients accumulated in this backward pass (new zeros for a new pass)."""
        task = torch._C._current_graph_task_id()
        if self._grad is None or self._grad_task != task:
            self._grad = torch.zeros_like(self.tensor)
            self._grad_task = task
        return self._grad

    def pending_grad(self, layer: int) -> torch.Tensor | None:
        """What later layers added to slot ``layer`` in this backward pass, if anything."""
        if self._grad is None or self._grad_task != torch._C._current_graph_task_id():
            return None
        return self.slot(self._grad, layer)


class HeadsLast(SourceBuffer):
    """``[M, L*G, d]`` with its per-layer slot and source-prefix views made once."""

    __slots__ = ("_slots", "_prefixes")

    def __init__(self, raw: torch.Tensor, layers: int, heads: int) -> None:
        tokens, d = raw.numel() // raw.shape[-1], raw.shape[-1] // heads
        super().__init__(raw.new_empty(tokens, layers * heads, d), layers, heads, raw.shape)
        base = self.tensor.data
        self._slots = [base[:, l * heads : (l + 1) * heads].view(raw.shape) for l in range(layers)]
        self._prefixes = [base[:, : (l + 1) * heads] for l in range(layers)]

    def write(self, layer: int, raw: torch.Tensor) -> None:
        self._slots[layer].copy_(raw)

    def prefix(self, layer: int) -> torch.Tensor:
        """Layers ``0..layer`` as ``[M, (layer+1)G, d]`` (a view made once)."""
        return self._prefixes[layer]

    def sources(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[:, :n]


class SourcesLast(SourceBuffer):
    """``[M, d, L*G]``: tokens and head size merge, so backward's products are single ``mm`` calls."""

    sources_last = True
    __slots__ = ()

    def __init__(self, raw: torch.Tensor, layers: int, heads: int) -> None:
        tokens, d = raw.numel() // raw.shape[-1], raw.shape[-1] // heads
        super().__init__(raw.new_empty(tokens, d, layers * heads), layers, heads, raw.shape)

    def write(self, layer: int, raw: torch.Tensor) -> None:
        self.slot(self.tensor.data, layer).copy_(raw.reshape(-1, self.heads, raw.shape[-1] // self.heads))

    def prefix(self, layer: int) -> torch.Tensor:
        return self.sources(self.tensor, (layer + 1) * self.heads)

    def sources(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[:, :, :n].transpose(1, 2)


class ScratchPool:
    """:class:`HeadsLast` buffers that small calls without grad on one thread reuse.

    Keyed by role, shape, dtype, device and inference mode; at most ``SCRATCH_SHAPES`` kept,
    oldest dropped first. A buffer that autograd saves (grad switched on inside a call that
    started without it) is :meth:`retire`\\ d, so no later call overwrites it.
    """

    def __init__(self) -> None:
        self._free: OrderedDict[tuple, HeadsLast] = OrderedDict()

    def __len__(self) -> int:
        return len(self._free)

    def keys(self) -> list[tuple]:
        return list(self._free)

    def take(self, role: str, raw: torch.Tensor, layers: int, heads: int) -> HeadsLast | None:
        if raw.numel() // raw.shape[-1] > SCRATCH_TOKENS:
            return None
        key = (role, raw.shape, layers, heads, raw.dtype, raw.device, torch.is_inference_mode_enabled())
        buf = self._free.get(key)
        if buf is None:
            buf = HeadsLast(raw, layers, heads)
            buf.scratch_key = key
            if len(self._free) >= SCRATCH_SHAPES:
                self._free.popitem(last=False)
            self._free[key] = buf
        return buf

    def retire(self, buf: SourceBuffer) -> None:
        if buf.scratch_key is not None and self._free.get(buf.scratch_key) is buf:
            del self._free[buf.scratch_key]
        buf.scratch_key = None
