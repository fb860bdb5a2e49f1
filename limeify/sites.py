"""Plain descriptions of attention sites: what discovery produces and everything else consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVSource:
    """Where one of K or V comes from: a module's output, or a slice of its last dimension.

    ``start``/``end`` are ``None`` when the whole output is K (or V), e.g. LLaMA's ``k_proj``;
    GPT-2's fused ``c_attn`` gives K as ``start=hidden, end=2*hidden``.
    """

    module: str
    start: int | None = None
    end: int | None = None

    def __str__(self) -> str:
        if self.start is None:
            return self.module
        return f"{self.module}[..., {self.start}:{self.end}]"


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer as limeify sees it.

    ``layer`` is the 0-based position in the forward pass; ``attention`` is the module the
    router is registered on (the closest common parent of the K and V producers). The raw
    K (and V) output of ``key`` (``value``) is laid out as ``[..., num_kv_heads, head_dim]``.
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

    @property
    def v_head_dim(self) -> int:
        return self.value_head_dim if self.value_head_dim is not None else self.head_dim

    def __str__(self) -> str:
        heads = f"{self.num_heads} query heads, " if self.num_heads else ""
        return (
            f"layer {self.layer}: {self.attention} (K={self.key}, V={self.value}; "
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


def format_sites(sites: list[AttentionSite]) -> str:
    return "\n".join(str(s) for s in sites)
