"""Routers: the small learned modules that decide how a layer mixes earlier layers' K/V.

A mechanism is a :class:`Router` subclass registered under a name; ``LimeConfig(mechanism=...)``
selects it. Routers are ordinary ``nn.Module`` children of their attention module, so they
appear in ``state_dict``, follow ``.to()`` and can be wrapped by PEFT's ``modules_to_save``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .calls import ValueCache
from .mixing import static_mix, token_mix
from .errors import LimeError
from .sites import AttentionSite

ROUTER_ATTR = "lime_router"

MECHANISMS: dict[str, type["Router"]] = {}


def register_mechanism(name: str) -> Callable[[type["Router"]], type["Router"]]:
    """Class decorator adding a router type to the registry under ``name``."""

    def wrap(cls: type["Router"]) -> type["Router"]:
        MECHANISMS[name] = cls
        cls.mechanism = name
        return cls

    return wrap


def available_mechanisms() -> list[str]:
    return sorted(MECHANISMS)


class Router(nn.Module):
    """Base class: ``forward`` returns this layer's mixed K or V in the raw layout ``[..., G*d]``.

    ``layer`` is the site's depth in its stack (``site.position``): the router mixes depths
    ``0..layer`` of that stack. Args of ``forward``: ``raw`` is this layer's raw K or V, ``cache``
    the value cache of this call of the stack, holding depths ``0..layer``, ``role`` ``"k"`` or
    ``"v"``, ``hidden`` the input of the projection that produced ``raw`` (the layer's normalized
    hidden state in pre-norm models).
    """

    mechanism = "base"

    def __init__(self, layer: int, site: AttentionSite, init: str, **kwargs) -> None:
        super().__init__()
        self.layer = layer
        self.num_kv_heads = site.num_kv_heads

    def forward(self, raw: torch.Tensor, cache: ValueCache, role: str, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mixing_matrix(self) -> torch.Tensor:
        """The ``[G, (layer+1)*G]`` matrix applied to the stacked sources (LIME.md layout)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kv_heads={self.num_kv_heads}"


class CallRouters(nn.Module):
    """The routers of an attention module with several sites, named by layer.

    A module may run several layers of its stack (ALBERT's shared layer, a looped block: a
    site per call), or hold two attention ops (LiLT's text and layout streams). It sits where
    a single router would (``<attention>.lime_router``), so its routers read as
    ``<attention>.lime_router.<layer>.weight`` and PEFT's wrappers copy them together (a plain
    module, not a ``ModuleDict``, which PEFT refuses to wrap); the producer hook passes the
    layer it mixes for.
    """

    def __getitem__(self, layer: str) -> Router:
        return self._modules[layer]

    def forward(self, raw: torch.Tensor, cache: ValueCache, role: str, hidden: torch.Tensor, layer: str) -> torch.Tensor:
        return self._modules[layer](raw, cache, role, hidden)


def identity_block(layer: int, heads: int, dtype=None, device=None) -> torch.Tensor:
    """``[G, (layer+1)G]`` zeros with the identity on the current layer's block."""
    w = torch.zeros(heads, (layer + 1) * heads, dtype=dtype, device=device)
    w[:, layer * heads :] = torch.eye(heads, dtype=dtype, device=device)
    return w


@register_mechanism("static")
class StaticRouter(Router):
    """The paper's static cross-head lookup: signed weights, shared by K and V, per layer."""

    def __init__(self, layer: int, site: AttentionSite, init: str, **kwargs) -> None:
        super().__init__(layer, site, init)
        g = site.num_kv_heads
        weight = identity_block(layer, g)
        if init == "paper":
            bound = math.sqrt(3.0 / ((layer + 1) * g))
            noise = torch.empty_like(weight).uniform_(-bound, bound)
            noise[:, layer * g :] = 0.0
            weight = weight + noise
        self.weight = nn.Parameter(weight)

    def forward(self, raw: torch.Tensor, cache: ValueCache, role: str, hidden: torch.Tensor) -> torch.Tensor:
        return static_mix(self.weight, raw, cache, role, self.layer)

    def mixing_matrix(self) -> torch.Tensor:
        return self.weight


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (source layer) axis, in float32 for half-precision parameters."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(logits.float(), dim=-1).to(logits.dtype)
    return torch.softmax(logits, dim=-1)


def _residual(weights: torch.Tensor, alpha: torch.Tensor | None, layer: int) -> torch.Tensor:
    """``onehot(layer) + alpha * (weights - onehot(layer))`` over the last axis (``alpha`` per head).

    With ``alpha = 0`` this is exactly the one-hot on the current layer (``0 * finite = 0``), so
    the mix returns the layer's own raw K/V bit for bit; ``alpha = None`` means plain ``weights``.
    """
    if alpha is None:
        return weights
    onehot = torch.zeros(weights.shape[-1], dtype=weights.dtype, device=weights.device)
    onehot[layer] = 1.0
    return onehot + alpha.to(weights.dtype)[:, None] * (weights - onehot)


def block_diagonal(head_weights: torch.Tensor) -> torch.Tensor:
    """``[..., G, J]`` per-head source weights -> ``[..., G, J*G]`` LIME.md matrix (head g reads head g)."""
    *lead, g, j = head_weights.shape
    eye = torch.eye(g, dtype=head_weights.dtype, device=head_weights.device)
    return (head_weights[..., :, :, None] * eye[:, None, :]).reshape(*lead, g, j * g)


@register_mechanism("softmax")
class SoftmaxRouter(Router):
    """Per-layer softmax lookup (the paper's first version): one weight per (KV head, source layer).

    Head ``g`` of layer ``l`` reads only head ``g`` of layers ``0..l``, with the same weights for
    K and V. Parameters: ``logits`` ``[G, l+1]`` and, for ``init="identity"``, a per-head gate
    ``alpha`` ``[G]``. The weight of source layer ``j`` for head ``g`` is

        w[g, j] = onehot_l[j] + alpha[g] * (softmax(logits[g])[j] - onehot_l[j])

    Function preservation (``init="identity"``): ``alpha`` starts at 0, so ``w`` is exactly the
    one-hot on the current layer and the model computes what the base model did, bit for bit;
    ``logits`` start at 0 (uniform). ``alpha`` gets a gradient at once (the direction towards the
    uniform mix), ``logits`` as soon as ``alpha`` is non-zero. ``alpha = 1`` is the plain softmax;
    ``alpha`` is unconstrained, so training may also leave the simplex (e.g. ``alpha > 1``).

    ``init="paper"``: plain softmax, no ``alpha``, logits 0 (every layer averaged uniformly).

    ``mixing_matrix()`` returns the ``[G, (l+1)G]`` matrix (block-diagonal per source layer)
    built from the parameters; the forward pass uses exactly that matrix with ``static_mix``, so
    autograd flows through its construction into ``logits`` and ``alpha``.
    """

    def __init__(self, layer: int, site: AttentionSite, init: str, **kwargs) -> None:
        super().__init__(layer, site, init)
        g = site.num_kv_heads
        self.logits = nn.Parameter(torch.zeros(g, layer + 1))
        self.alpha = nn.Parameter(torch.zeros(g)) if init == "identity" else None

    def head_weights(self) -> torch.Tensor:
        """``[G, l+1]``: weight of each source layer for each KV head."""
        return _residual(_softmax(self.logits), self.alpha, self.layer)

    def mixing_matrix(self) -> torch.Tensor:
        return block_diagonal(self.head_weights())

    def forward(self, raw: torch.Tensor, cache: ValueCache, role: str, hidden: torch.Tensor) -> torch.Tensor:
        return static_mix(self.mixing_matrix(), raw, cache, role, self.layer)


@register_mechanism("dynamic")
class DynamicRouter(Router):
    """Dynamic per-token lookup (the paper's first version, mixing raw K/V so the KV cache is unchanged).

    For a token with input hidden state ``x`` (the input of this layer's K/V projection: the
    normalized hidden state in pre-norm models), KV head ``g`` of layer ``l`` gets source weights

        p(x)[g, :] = softmax((W_dyn x + b)[g, :])                     (over layers 0..l)
        c(x)[g, j] = onehot_l[j] + alpha[g] * (p(x)[g, j] - onehot_l[j])

    and reads ``sum_j c(x)[g, j] * K_j[g]`` (likewise V, with the same ``c(x)``): head ``g``
    reads head ``g`` of earlier layers. ``proj = Linear(hidden_size, G*(l+1))`` holds ``W_dyn``
    and ``b``. The weights depend only on the current token, so cached K/V of earlier tokens stay
    valid during generation. They are computed once per layer and forward (on the K call) and
    reused for V through :meth:`ValueCache.memoized`.

    Function preservation (``init="identity"``): ``alpha`` starts at 0, so ``c`` is exactly the
    one-hot on the current layer whatever ``x`` is (``0 * finite = 0``), and the model computes
    what the base model did. ``W_dyn`` and ``b`` start at 0 (uniform ``p``), so right after
    ``alpha`` leaves 0 the router behaves like the static softmax router and then learns to
    depend on the token. ``init="paper"``: no ``alpha`` (``c = p``), ``W_dyn`` with PyTorch's
    default Linear init, ``b = 0``.

    ``mixing_matrix(hidden)`` returns the ``[G, (l+1)G]`` matrix averaged over the tokens of
    ``hidden`` (``[..., hidden_size]``); there is no token-independent matrix, so calling it
    without ``hidden`` (as ``limeify.router_parameters`` does) raises :class:`LimeError`.
    ``token_weights(hidden)`` gives the per-token ``c(x)`` of shape ``[..., G, l+1]``.

    ``hidden_size`` comes from the attention site (discovery fills it in); for hand-written
    sites without it, pass ``LimeConfig(mechanism_kwargs={"hidden_size": ...})``.
    """

    def __init__(self, layer: int, site: AttentionSite, init: str, hidden_size: int | None = None, **kwargs) -> None:
        super().__init__(layer, site, init)
        hidden_size = hidden_size or site.hidden_size
        if not hidden_size:
            raise LimeError(
                f"layer {layer}: the dynamic mechanism needs the width of the K/V projection's input, "
                "which the attention site does not give; set AttentionSite(hidden_size=...) or "
                "LimeConfig(mechanism_kwargs={'hidden_size': ...})"
            )
        g = site.num_kv_heads
        self.hidden_size = int(hidden_size)
        self.proj = nn.Linear(self.hidden_size, g * (layer + 1))
        nn.init.zeros_(self.proj.bias)
        if init == "identity":
            nn.init.zeros_(self.proj.weight)
            self.alpha = nn.Parameter(torch.zeros(g))
        else:
            self.alpha = None

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., G, l+1]``: per-token weight of each source layer for each KV head."""
        if hidden is None or hidden.shape[-1] != self.hidden_size:
            got = None if hidden is None else tuple(hidden.shape)
            raise LimeError(
                f"layer {self.layer}: the dynamic router needs the K/V projection's input of width "
                f"{self.hidden_size} (got {got}); it must be passed positionally to the projection"
            )
        logits = self.proj(hidden.to(self.proj.weight.dtype))
        p = _softmax(logits.view(*logits.shape[:-1], self.num_kv_heads, self.layer + 1))
        return _residual(p, self.alpha, self.layer)

    def mixing_matrix(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            raise LimeError(
                "the dynamic router's weights depend on the token; pass hidden states, "
                "router.mixing_matrix(hidden), for the matrix averaged over their tokens, or "
                "use router.token_weights(hidden) for per-token weights"
            )
        w = self.token_weights(hidden)
        return block_diagonal(w.reshape(-1, *w.shape[-2:]).mean(0))

    def forward(self, raw: torch.Tensor, cache: ValueCache, role: str, hidden: torch.Tensor) -> torch.Tensor:
        if hidden is None:
            self.token_weights(hidden)  # raises
        coef = cache.memoized(self.layer, hidden, lambda: self.token_weights(hidden))
        return token_mix(coef, raw, cache, role, self.layer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_size={self.hidden_size}"
