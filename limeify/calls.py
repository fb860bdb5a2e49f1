"""One value cache per call of a stack, and how the hooks of that call (and only they) find it.

A *call* is one run of the module that encloses a stack's attention layers (a decoder, an
encoder, a vision tower). Its :class:`ValueCache` holds the raw K/V its layers produced; the
layers of no other call may read them, whatever else runs meanwhile: another forward before
this one's backward, a no_grad reference pass (DPO), other threads, recomputation.

How a hook finds its call (:class:`CallTracker`):

* During the call, through the thread running it: the enclosing module's pre-hook pushes a
  new cache on that thread's list of open calls and its forward hook pops it, so a hook reads
  the innermost call open on its own thread. Threads never see each other's calls.
* During activation recomputation in backward, the call has closed, and autograd may re-run
  the layers on a thread of its own. Two ways lead back to the call, tried in this order:

  1. torch's non-reentrant checkpoint (which transformers, ``checkpoint_wrapper`` and
     accelerate use) runs each region's forward and its recomputation under saved-tensor
     hooks of one checkpoint frame. A layer run in the forward notes (a weak reference to)
     its call on that frame; a layer re-run in backward reads it back. This is exact, and
     needs nothing of the region's inputs.
  2. Any other recomputation that re-runs a K/V projection with the very tensor it got in
     the forward (a checkpointed projection, or a post-norm layer whose projections read the
     layer's input): while a call runs with grad, each K/V hook *marks* its input tensor with
     the call, and a re-run projection whose input carries exactly one live call of this
     stack belongs to it.

  An input marked by several calls whose backward is pending (the same tensor given to two
  forwards) names none and raises :class:`LimeError`; so does a re-run layer that neither way
  leads anywhere: limeify never guesses.

Autograd keeps a cache alive exactly as long as its backward may need it: the mixing
functions' backward nodes hold it, the marks are weak and the list of open calls drops it
when the call returns.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch
from torch.utils.checkpoint import _CheckpointFrame

from .buffers import HeadsLast, ScratchPool, SourceBuffer, SourcesLast
from .errors import LimeError

MARK = "_lime_calls"
# Which call of a module running several layers a tensor entered (or a checkpoint region ran).
CALL_MARK = "_lime_call_index"


class ValueCache:
    """Per-call state of one stack: raw K/V buffers by role, router memo, traced slots.

    ``tracker`` is the :class:`CallTracker` that opened it (``None`` for a cache driven by hand,
    e.g. to time the mixing functions alone); ``grad`` says whether the call started with grad
    enabled, which picks the buffer layout; ``scratch`` (calls without grad only) is the
    thread's pool of reusable small buffers.
    """

    __slots__ = ("tracker", "num_layers", "grad", "scratch", "buffers", "memo", "traced", "calls", "__weakref__")

    def __init__(self, tracker: "CallTracker | None", num_layers: int, grad: bool, scratch: ScratchPool | None = None) -> None:
        self.tracker = tracker
        self.num_layers = num_layers
        self.grad = grad
        self.scratch = scratch
        self.buffers: dict[str, SourceBuffer] = {}
        # Per-layer values a router computes once and reuses for K and V (see ``memoized``).
        self.memo: dict[int, tuple] = {}
        # Under torch.compile: each layer's raw K/V as a graph value (see mixing._traced_mix).
        self.traced: dict[str, list] = {}
        # How often each module running several layers has run in this call (see call_index).
        self.calls: dict[int, int] = {}

    def write(self, role: str, layer: int, raw: torch.Tensor, heads: int, saved: bool = False) -> SourceBuffer:
        """Store ``raw`` (``[..., G*d]``) in slot ``layer`` of the role's buffer and return it.

        ``saved``: autograd keeps the buffer for backward, so it must leave the scratch pool.
        """
        buf = self.buffers.get(role)
        if buf is None:
            buf = self._open(role, raw, heads)
        else:
            buf.check(role, layer, raw)
        buf.write(layer, raw)
        if saved and buf.scratch_key is not None:
            self.scratch.retire(buf)
        return buf

    def home(self, role: str, raw: torch.Tensor) -> torch.device:
        """The device that holds this call's K (or V) of every layer: where its first layer ran
        (``raw``'s own device before any layer has run)."""
        buf = self.buffers.get(role)
        if buf is not None:
            return buf.tensor.device
        slots = self.traced.get(role)
        first = next((t for t in slots if t is not None), None) if slots else None
        return raw.device if first is None else first.device

    def _open(self, role: str, raw: torch.Tensor, heads: int) -> SourceBuffer:
        if self.grad:
            buf = SourcesLast(raw, self.num_layers, heads)
        else:
            buf = self.scratch.take(role, raw, self.num_layers, heads) if self.scratch is not None else None
            buf = buf or HeadsLast(raw, self.num_layers, heads)
        self.buffers[role] = buf
        return buf

    def memoized(self, layer: int, key: torch.Tensor, compute: Callable[[], Any]) -> Any:
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

    def traced_slots(self, role: str, layer: int, raw: torch.Tensor, heads: int) -> list[torch.Tensor]:
        """Layers ``0..layer``'s raw K/V as graph values, each ``[M, G, d]`` (torch.compile)."""
        slots = self.traced.setdefault(role, [None] * self.num_layers)
        slots[layer] = raw.reshape(-1, heads, raw.shape[-1] // heads)
        return slots[: layer + 1]


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.calls: list[ValueCache] = []
        self.scratch = ScratchPool()


def _tensors(args: tuple):
    for value in args:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _checkpoint_frame():
    """The frame of the innermost torch checkpoint region running now (forward or recompute).

    Read off the saved-tensor hooks torch's non-reentrant checkpoint installs, whose pack hook
    closes over its frame (or a weak reference to it); ``None`` where there is none or torch
    lays them out differently, and the caller falls back to input marks.
    """
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError, TypeError):
        return None
    # The pack hook may be wrapped (torch disables dynamo around it): look a few closures deep.
    todo = [hooks[0]] if hooks else []
    for _ in range(3):
        inner = []
        for fn in todo:
            for cell in getattr(fn, "__closure__", None) or ():
                value = cell.cell_contents
                if isinstance(value, weakref.ReferenceType):
                    value = value()
                if isinstance(value, _CheckpointFrame):
                    return value
                if callable(value):
                    inner.append(value)
        todo = inner
    return None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (on this thread), e.g. recomputing checkpoints."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class CallTracker:
    """Opens a :class:`ValueCache` per call of one stack and finds it again for that call's hooks."""

    def __init__(self, num_layers: int, where: str = "the model") -> None:
        self.num_layers = num_layers
        self.where = where
        self._local = _PerThread()

    # A copy (deepcopy, pickling) starts with no open calls: thread-local state is not data.
    def __getstate__(self) -> dict:
        return {"num_layers": self.num_layers, "where": self.where}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["num_layers"], state["where"])

    @property
    def scratch(self) -> ScratchPool:
        """This thread's pool of reusable buffers for small calls without grad."""
        return self._local.scratch

    def has_open_call(self) -> bool:
        return bool(self._local.calls)

    def open(self) -> None:
        local = self._local
        grad = torch.is_grad_enabled()
        local.calls.append(ValueCache(self, self.num_layers, grad, None if grad else local.scratch))

    def close(self) -> None:
        calls = self._local.calls
        if calls:
            calls.pop()

    def _mark(self, cache: ValueCache, args: tuple) -> None:
        """Mark the tensors entering a K/V projection with its call, for recomputation to find it."""
        ref = weakref.ref(cache)
        for t in _tensors(args):
            marks = t.__dict__.get(MARK)
            if marks is None:
                t.__dict__[MARK] = [ref]
            elif marks[-1] is not ref:
                if len(marks) >= 8:
                    marks[:] = [m for m in marks if m() is not None]
                marks.append(ref)

    def _note_frame(self, cache: ValueCache) -> None:
        frame = _checkpoint_frame()
        if frame is None:
            return
        calls = frame.__dict__.setdefault(MARK, [])
        if not any(ref() is cache for ref in calls):
            calls.append(weakref.ref(cache))

    def _frame_call(self) -> ValueCache | None:
        """The one call of this stack noted on the checkpoint frame being recomputed, if any."""
        frame = _checkpoint_frame()
        calls = [c for c in (ref() for ref in frame.__dict__.get(MARK, ())) if c is not None and c.tracker is self] if frame else []
        # Several calls in one region (a checkpointed function calling the model twice): their
        # recomputation re-opens them through the enclosing module's hooks instead.
        return calls[0] if len(calls) == 1 else None

    def _find(self, args: tuple, module: torch.nn.Module) -> ValueCache | None:
        found: set[ValueCache] | None = None
        for t in _tensors(args):
            marks = t.__dict__.get(MARK)
            if not marks:
                continue
            live = {c for c in (m() for m in marks) if c is not None and c.tracker is self}
            if live:
                found = live if found is None else found & live
        if found is None:
            return None
        if len(found) != 1:
            raise LimeError(
                f"a K/V projection ({type(module).__name__}) was recomputed in backward (activation "
                f"checkpointing), and its input entered it in {len(found) or 'several'} forward calls whose "
                "backward is still pending, so limeify cannot tell which call's K/V to use. Give each "
                "forward its own input tensors (e.g. x.clone()), run each forward's backward before the "
                "next, or checkpoint with torch.utils.checkpoint.checkpoint(..., use_reentrant=False), "
                "whose regions limeify tells apart exactly"
            )
        return next(iter(found))

    def call_index(self, cache: ValueCache, hook: object, count: int, args: tuple) -> int:
        """Which of its ``count`` calls in ``cache``'s call a module running several layers is in.

        In the forward, its calls are counted. A recomputation in backward reads the index back
        from the checkpoint region, which noted its calls' indices in order (a region re-runs
        its calls in that order, once per backward pass), else from the input tensor (marked
        with it), and raises if neither tells it.
        """
        key = id(hook)
        if _in_backward():
            frame = _checkpoint_frame()
            noted = frame.__dict__.get(CALL_MARK, {}).get(key) if frame is not None else None
            if noted:
                cursors = frame.__dict__.setdefault(CALL_MARK + "_next", {})
                at = (torch._C._current_graph_task_id(), key)
                i = cursors.get(at, 0)
                cursors[at] = i + 1
                if i < len(noted):
                    return noted[i]
            marked = {t.__dict__.get(CALL_MARK, {}).get(key) for t in _tensors(args)} - {None}
            if len(marked) == 1 and -1 not in marked:
                return marked.pop()
            raise LimeError(
                f"a module running {count} attention layers was recomputed in backward, but not by torch's "
                "non-reentrant checkpoint and not from a tensor it saw in the forward, so limeify cannot tell "
                "which of its calls this is; checkpoint with torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False)"
            )
        index = cache.calls.get(key, 0)
        if index >= count:
            raise LimeError(
                f"a module running attention layers of {self.where} ran {index + 1} times in one call, more "
                f"than the {count} times limeify found when it traced the model; limeify the model again if "
                "its depth changed"
            )
        cache.calls[key] = index + 1
        if cache.grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            frame = _checkpoint_frame()
            if frame is not None:
                frame.__dict__.setdefault(CALL_MARK, {}).setdefault(key, []).append(index)
            for t in _tensors(args):
                marks = t.__dict__.setdefault(CALL_MARK, {})
                marks[key] = index if marks.get(key, index) == index else -1
        return index

    def current(self, layer: int, module: torch.nn.Module, args: tuple) -> ValueCache:
        """The call an attention layer's K/V hook belongs to (resuming it in recomputation)."""
        in_backward = _in_backward()
        if in_backward:
            cache = self._frame_call() or self._find(args, module)
            if cache is not None:
                return cache
        calls = self._local.calls
        if calls:
            cache = calls[-1]
            if cache.grad and not torch.is_grad_enabled():
                raise LimeError(
                    "gradient was switched off inside the forward pass, as reentrant "
                    "activation checkpointing (use_reentrant=True) does; it would silently drop "
                    "LIMe's cross-layer gradients. Use non-reentrant checkpointing: "
                    "model.activation_checkpointing_enable() (transformers >= 5.24, non-reentrant by "
                    "default), model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}) in older transformers, or "
                    "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                )
            if not in_backward and cache.grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                self._mark(cache, args)
                self._note_frame(cache)
            return cache
        if in_backward:
            raise LimeError(
                f"attention layer {layer} was recomputed in backward, but not by torch's non-reentrant "
                "checkpoint and not from a tensor its K/V projection saw in a limeified forward, so "
                "limeify cannot tell which forward call it belongs to. Checkpoint with "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (what transformers' "
                "activation_checkpointing_enable(), checkpoint_wrapper and accelerate use)"
            )
        raise LimeError(
            f"attention layer {layer} ran outside a call of {self.where}, which opens LIMe's per-call "
            "cache of raw K/V, so the K/V of earlier layers are not available; call that module "
            "(or the whole model), not its layers or its .forward directly"
        )
