"""Trainable-parameter selection and optimizer groups for router-only or full fine-tuning."""

from __future__ import annotations

from torch import nn

from .errors import LimeError
from .injection import routers


def _router_param_ids(model: nn.Module) -> set[int]:
    rts = routers(model)
    offloaded = [layer for layer, r in rts.items() if any(p.is_meta for p in r.parameters())]
    if offloaded:
        # accelerate gives each forward a temporary copy of an offloaded weight: nothing would train.
        raise LimeError(
            f"the routers of layers {offloaded} are offloaded (on the meta device, loaded by accelerate for "
            "each forward), so they cannot train. Limeify after dispatching (limeify(model) or "
            "load_lime(model, dir) on the model from from_pretrained(device_map=...) or dispatch_model) "
            "keeps every router on its layer's execution device"
        )
    return {id(p) for r in rts.values() for p in r.parameters()}


def mark_only_routers_trainable(model: nn.Module, verbose: bool = True) -> tuple[int, int]:
    """Freeze every base weight and make the routers trainable; returns ``(trainable, total)``."""
    ids = _router_param_ids(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return print_trainable_parameters(model, verbose)


def print_trainable_parameters(model: nn.Module, verbose: bool = True) -> tuple[int, int]:
    """PEFT-style summary line: trainable count, total and percentage."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def router_param_groups(
    model: nn.Module,
    router_lr: float = 1e-2,
    router_weight_decay: float = 0.0,
    base_lr: float | None = None,
    base_weight_decay: float = 0.1,
) -> list[dict]:
    """Optimizer parameter groups with the paper's settings (routers: lr 1e-2, no decay).

    With ``base_lr=None`` only the routers are returned (router-only fine-tuning); otherwise
    every other trainable parameter forms a second group with ``base_lr``/``base_weight_decay``.
    For retrofits of pretrained checkpoints a router lr of 1e-3..3e-3 works better (LIME.md).
    """
    ids = _router_param_ids(model)
    groups = [{"params": [p for p in model.parameters() if id(p) in ids and p.requires_grad],
               "lr": router_lr, "weight_decay": router_weight_decay}]
    if base_lr is not None:
        base = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
        groups.append({"params": base, "lr": base_lr, "weight_decay": base_weight_decay})
    return groups
