"""Plain descriptions of attention sites: what discovery produces and everything else consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVSource:
    """Where one of K or V comes from: a module's output, or a fixed set of its last dimension's features.

    ``start``/``end`` are ``None`` when the whole output is K (or V), e.g. LLaMA's ``k_proj``;
    GPT-2's fused ``c_attn`` gives K as ``start=hidden, end=2*hidden``. A fused output laid out
    per head (GPT-NeoX: ``[q_h, k_h, v_h]`` for each head ``h``) repeats the slice: features
    ``start + i*step .. end + i*step`` for ``i < blocks``, K's heads in block order.
    """

    module: str
    start: int | None = None
    end: int | None = None
    blocks: int = 1
    step: int | None = None

    @property
    def width(self) -> int | None:
        """How many features K (or V) takes, or None for the whole output."""
        return None if self.start is None else self.blocks * (self.end - self.start)

    def __str__(self) -> str:
        if self.start is None:
            return self.module
        if self.blocks > 1:
            return f"{self.module}.view(..., {self.blocks}, {self.step})[..., {self.start}:{self.end}]"
        return f"{self.module}[..., {self.start}:{self.end}]"


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer as limeify sees it.

    ``layer`` is the 0-based position among all of the model's attention sites in forward order
    (the site's name in ``routers(model)`` and saved adapters); ``stack`` names the stack the
    site belongs to and ``depth`` is its position in that stack: a site mixes the raw K/V of
    the sites of depths ``0..depth`` of its own stack only. ``stack=""`` with ``depth=None`` is
    a model with one stack, where ``depth == layer``. ``attention`` is the module the router is
    registered on (the closest common parent of the K and V producers). The raw K (and V)
    output of ``key`` (``value``) is laid out as ``[..., num_kv_heads, head_dim]``.

    One module may run several layers of a stack (ALBERT's shared layer, a looped block): each
    of its calls is a site of its own, with its own depth and router, and the i-th site with
    its K/V producers in forward order is their i-th call. Such a stack names in ``enclosing`` the module whose one
    call runs all of them (e.g. the encoder), where its per-call value cache opens.
    """

    layer: int
    attention: str
    key: KVSource
    value: KVSource
    num_kv_heads: int
    head_dim: int
    value_head_dim: int | None = None
    num_heads: int | None = None
    hidden_size: int | None = None
    stack: str = ""
    depth: int | None = None
    enclosing: str | None = None

    @property
    def position(self) -> int:
        """Depth in the site's stack: the index of its slot in the stack's value cache."""
        return self.layer if self.depth is None else self.depth

    @property
    def v_head_dim(self) -> int:
        return self.value_head_dim if self.value_head_dim is not None else self.head_dim

    def __str__(self) -> str:
        heads = f"{self.num_heads} query heads, " if self.num_heads else ""
        where = f" (depth {self.depth})" if self.depth is not None and self.depth != self.layer else ""
        return (
            f"layer {self.layer}{where}: {self.attention} (K={self.key}, V={self.value}; "
            f"{heads}{self.num_kv_heads} KV heads x {self.head_dim})"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionSite":
        data = dict(data)
        data["key"] = KVSource(**data["key"])
        data["value"] = KVSource(**data["value"])
        return cls(**data)


def stacks_of(sites: list[AttentionSite]) -> dict[str, list[AttentionSite]]:
    """Sites grouped by stack, stacks in the order their first site runs."""
    groups: dict[str, list[AttentionSite]] = {}
    for site in sites:
        groups.setdefault(site.stack, []).append(site)
    return groups


def shared_attention(sites: list[AttentionSite]) -> set[str]:
    """Attention modules with several sites: run for several layers, or holding several attention ops."""
    seen: set[str] = set()
    shared = set()
    for site in sites:
        (shared if site.attention in seen else seen).add(site.attention)
    return shared


def format_sites(sites: list[AttentionSite]) -> str:
    groups = stacks_of(sites)
    if len(groups) == 1 and "" in groups:
        return "\n".join(str(s) for s in sites)
    lines = []
    for name, group in groups.items():
        lines.append(f"stack {name or '(model)'}: {len(group)} layers")
        lines += [f"  {s}" for s in group]
    return "\n".join(lines)
