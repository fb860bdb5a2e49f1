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

from .cache import ValueCache, static_mix
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

    Args of ``forward``: ``raw`` is this layer's raw K or V, ``cache`` the per-forward value
    cache holding layers ``0..layer``, ``role`` ``"k"`` or ``"v"``, ``hidden`` the input of the
    projection that produced ``raw`` (the layer's normalized hidden state in pre-norm models).
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
