"""LimeConfig: what to retrofit, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import LimeError
from .sites import AttentionSite, stacks_of

INITS = ("identity", "paper")


@dataclass
class LimeConfig:
    """Configuration of a LIMe retrofit.

    Args:
        mechanism: name of a registered lookup mechanism (see ``limeify.available_mechanisms()``).
            ``"static"`` is the paper's cross-head lookup: layer ``l`` mixes the raw K/V of
            layers ``0..l`` with a ``[G, (l+1)*G]`` matrix.
        init: ``"identity"`` (current layer identity, zero elsewhere; the limeified model
            computes exactly what the base model did) or ``"paper"`` (the official
            from-scratch init: identity on the current block, ``U(-b, b)`` elsewhere).
        layers: attention layers that get a router (default: all but the first of each stack).
            Every layer still contributes its raw K/V as a source for later layers of its stack.
            A list of ints names depths in a model with one stack; in a model with several
            stacks (an encoder and a decoder, two towers), a dict ``{stack: depths}`` says which
            stack each list means (``limeify.describe`` prints the stacks' names).
        sites: explicit attention sites for models discovery cannot analyse.
        mechanism_kwargs: extra options for the chosen mechanism.
        router_dtype: dtype of the routers' parameters, e.g. ``"float32"``. Default: float32 in
            float16/bfloat16 models, the model's dtype otherwise. Half-precision routers train
            poorly: at lr 3e-3 one step leaves an identity entry at 1.0 (1.003 rounds back to it
            in bfloat16). The mix itself runs in the model's dtype either way.
    """

    mechanism: str = "static"
    init: str = "identity"
    layers: Sequence[int] | dict[str, Sequence[int]] | None = None
    sites: Sequence[AttentionSite] | None = None
    mechanism_kwargs: dict[str, Any] = field(default_factory=dict)
    router_dtype: str | None = None

    def __post_init__(self) -> None:
        from .routers import MECHANISMS

        if self.mechanism not in MECHANISMS:
            raise LimeError(
                f"unknown mechanism {self.mechanism!r}; expected one of {sorted(MECHANISMS)}"
            )
        if self.init not in INITS:
            raise LimeError(f"unknown init {self.init!r}; expected one of {list(INITS)}")
        if isinstance(self.layers, dict):
            self.layers = {str(k): sorted({int(d) for d in v}) for k, v in self.layers.items()}
        elif self.layers is not None:
            self.layers = sorted({int(layer) for layer in self.layers})
        if self.router_dtype is not None and not isinstance(getattr(torch, str(self.router_dtype), None), torch.dtype):
            raise LimeError(f"unknown router_dtype {self.router_dtype!r}; expected a torch dtype name such as 'float32'")
        if self.sites is not None:
            self.sites = [s if isinstance(s, AttentionSite) else AttentionSite.from_dict(s) for s in self.sites]

    def resolve_router_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.router_dtype is not None:
            return getattr(torch, self.router_dtype)
        return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype

    def router_layers(self, sites: Sequence[AttentionSite]) -> list[int]:
        """The sites (by ``site.layer``) that get a router."""
        stacks = stacks_of(list(sites))
        wanted = self.layers
        if wanted is None:
            wanted = {name: range(1, len(group)) for name, group in stacks.items()}
        elif not isinstance(wanted, dict):
            if len(stacks) != 1:
                raise LimeError(
                    f"LimeConfig.layers={wanted} is ambiguous: the model has {len(stacks)} stacks "
                    f"({', '.join(map(repr, stacks))}); say which stack each depth belongs to with "
                    "layers={stack: [depths]}"
                )
            wanted = {next(iter(stacks)): wanted}
        unknown = sorted(set(wanted) - set(stacks))
        if unknown:
            raise LimeError(f"LimeConfig.layers names unknown stacks {unknown}; the model's stacks are {sorted(stacks)}")
        layers = []
        for name, depths in wanted.items():
            group = stacks[name]
            bad = [d for d in depths if not 1 <= d < len(group)]
            if bad:
                raise LimeError(
                    f"LimeConfig.layers: depths {bad} out of range for stack {name or '(model)'!r} of "
                    f"{len(group)} attention layers; routers go on depths 1..{len(group) - 1} (depth 0 "
                    "has no earlier layer)"
                )
            layers += [group[d].layer for d in depths]
        return sorted(layers)

    def to_dict(self) -> dict:
        return {
            "mechanism": self.mechanism,
            "init": self.init,
            "layers": None if self.layers is None else (dict(self.layers) if isinstance(self.layers, dict) else list(self.layers)),
            "sites": None if self.sites is None else [s.to_dict() for s in self.sites],
            "mechanism_kwargs": dict(self.mechanism_kwargs),
            "router_dtype": self.router_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LimeConfig":
        known = {"mechanism", "init", "layers", "sites", "mechanism_kwargs", "router_dtype"}
        return cls(**{k: v for k, v in data.items() if k in known})
