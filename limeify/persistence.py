"""Saving and loading router adapters (safetensors + JSON, like PEFT) and converted checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .config import LimeConfig
from .discovery import discover_sites
from .errors import LimeError
from .files import staged_directory
from .injection import is_limeified, lime_state, limeify, routers, unlimeify
from .routers import MECHANISMS
from .sites import AttentionSite, stacks_of

CONFIG_NAME = "lime_config.json"
WEIGHTS_NAME = "lime_routers.safetensors"


def fingerprint(sites: list[AttentionSite]) -> dict:
    """What a router adapter depends on: its stacks' depths and, per layer, heads and head sizes."""
    def one(values):
        values = list(values)
        return values[0] if len(set(values)) == 1 else values

    return {
        "layers": len(sites),
        "stacks": {name: len(group) for name, group in stacks_of(sites).items()},
        "num_heads": one(s.num_heads for s in sites),
        "num_kv_heads": one(s.num_kv_heads for s in sites),
        "head_dim": one(s.head_dim for s in sites),
    }


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router tensors keyed ``routers.<layer>.<name>``, independent of the model's module paths.

    Sharded (FSDP2 DTensor) routers are gathered whole on every rank: then this is a collective
    that every rank must call. Meta or otherwise unreadable tensors raise ``LimeError`` (on
    every rank alike when sharded) before anything is gathered.
    """
    named = [
        (f"routers.{layer}.{name}", t)
        for layer, router in routers(model).items()
        for name, t in router.state_dict().items()
    ]
    problem = next((p for p in (distributed.unreadable(k, t) for k, t in named) if p), None)
    if any(distributed.is_dtensor(t) for _, t in named):
        problem = distributed.agree(problem, [t for _, t in named])
    if problem:
        raise LimeError(problem)
    return {k: distributed.full_tensor(t).detach().cpu().contiguous() for k, t in named}


def write_lime_config(model: nn.Module, directory: Path) -> None:
    """Write ``lime_config.json``: the LimeConfig, discovered sites, version and base fingerprint."""
    from . import __version__

    state = lime_state(model)
    config = state.config.to_dict()
    config["sites"] = [s.to_dict() for s in state.sites]
    meta = {"limeify_version": __version__, "fingerprint": fingerprint(state.sites), "config": config}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def write_lime(model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """``lime_config.json`` and ``lime_routers.safetensors`` into an existing (staging) directory.

    ``tensors``: the routers' :func:`router_state_dict`, when already gathered.
    """
    if tensors is None:
        tensors = router_state_dict(model)
    write_lime_config(model, directory)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_lime(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``lime_config.json`` and ``lime_routers.safetensors`` (router weights only).

    Atomically: both are written beside ``directory`` and renamed in together, so a failure
    leaves no half adapter and an adapter already there as it was.

    A ``fully_shard``-ed (FSDP2) model: every rank must call it (it gathers the sharded
    routers); rank 0 alone writes, and every rank returns once the adapter is in place (or
    raises if rank 0 failed). Plain and DDP models: no collectives, call it on one rank.
    """
    lime_state(model)  # raises unless limeified, before anything is written
    tensors = router_state_dict(model)
    if not distributed.is_sharded(model):
        with staged_directory(directory) as tmp:
            write_lime(model, tmp, tensors)
        return Path(directory)
    if not any(distributed.is_dtensor(t) for r in routers(model).values() for t in r.state_dict().values()):
        distributed.warn_unmanaged_routers(model)

    def write() -> None:
        with staged_directory(directory) as tmp:
            write_lime(model, tmp, tensors)

    distributed.on_rank_zero(model, write, f"writing the adapter to {directory}")
    return Path(directory)


def read_lime(directory: str | os.PathLike) -> tuple[LimeConfig, dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise LimeError(f"missing {path}; expected a directory written by limeify.save_lime")
    try:
        meta = json.loads(cfg_path.read_text())
        config = LimeConfig.from_dict(meta["config"])
        expected = meta["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LimeError(f"{cfg_path} is not a valid limeify config ({exc}); re-save it with limeify.save_lime") from exc
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LimeError(f"{weights_path} is corrupt or truncated ({exc}); re-save it with limeify.save_lime") from exc
    return config, expected, tensors


def _expected_shapes(config: LimeConfig, sites: list[AttentionSite]) -> dict[str, tuple]:
    mechanism = MECHANISMS[config.mechanism]
    shapes = {}
    for layer in config.router_layers(sites):
        router = mechanism(sites[layer].position, sites[layer], config.init, **config.mechanism_kwargs)
        for name, t in router.state_dict().items():
            shapes[f"routers.{layer}.{name}"] = tuple(t.shape)
    return shapes


def _check_depth(model: nn.Module, sites: list[AttentionSite], directory, sharded: bool = False) -> None:
    """Without a trace, a deeper model would take the adapter silently on its first layers
    only; counting modules of the saved attention modules' class catches that cheaply."""
    try:
        kind = type(model.get_submodule(sites[0].attention))
    except AttributeError:
        return  # limeify's site validation names the missing module
    found = sum(type(m) is kind for m in model.modules())
    # A module running several layers is one module (a deeper model makes it run more often,
    # which its hooks refuse at the first forward).
    modules = len({s.attention for s in sites})
    if found != modules:
        raise LimeError(
            f"the adapter in {directory} was saved for {modules} attention modules but the model has "
            f"{found} {kind.__name__} modules; "
            + ("load it into the base model before fully_shard, with verify_sites=True, to check the model properly"
               if sharded else "load it with verify_sites=True to check the model properly")
        )


def check_saved_stacks(expected: dict, sites: list[AttentionSite], directory) -> None:
    """An adapter written before limeify knew stacks (0.1) treated every model as one stack."""
    stacks = stacks_of(sites)
    if "stacks" not in expected and len(stacks) > 1:
        raise LimeError(
            f"the adapter in {directory} was saved by limeify {meta_version(directory)}, which treated "
            f"this model's {len(stacks)} stacks ({', '.join(stacks)}) as one and mixed K/V across them; "
            "its routers have no faithful equivalent. Load it with that version, or retrain the routers "
            "with this one"
        )


def meta_version(directory: str | os.PathLike) -> str:
    try:
        return json.loads((Path(directory) / CONFIG_NAME).read_text()).get("limeify_version", "< 0.2")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "< 0.2"


def load_lime(
    model: nn.Module, directory: str | os.PathLike, example_inputs=None, verify_sites: bool = True
) -> nn.Module:
    """Limeify an unmodified base model and load saved routers into it (in place).

    With ``verify_sites`` (default) the model is traced to discover its attention sites, which
    must match the adapter's; ``verify_sites=False`` skips that trace (seconds on a large model)
    and uses the sites saved with the adapter, checking only that their modules exist and are
    wide enough: use it when the model is known to be the one the adapter was saved from.

    A ``fully_shard``-ed (FSDP2) base model works too: call it on every rank, before the
    model's first forward. limeify puts the routers under FSDP (``fully_shard`` with the mesh
    and policies of their decoder layer) and they get rank 0's saved values. Such a model cannot be
    traced, so the adapter's saved sites are used and checked as with ``verify_sites=False``.

    Raises ``LimeError`` naming expected vs found on any mismatch (depth, heads, mechanism,
    router keys or shapes, missing or corrupt files); the model is then left as it was.
    """
    config, expected, tensors = read_lime(directory)
    if is_limeified(model):
        raise LimeError("model is already limeified; load_lime expects the unmodified base model (call unlimeify first)")
    sharded = distributed.is_sharded(model)
    if sharded:
        _check_shardable(model, config, directory)
    if (verify_sites and not sharded) or config.sites is None:
        sites = discover_sites(model, example_inputs)
    else:
        sites = list(config.sites)
        _check_depth(model, sites, directory, sharded)
    found = fingerprint(sites)
    check_saved_stacks(expected, sites, directory)
    if "stacks" not in expected:
        found.pop("stacks")
    if found != expected:
        diffs = ", ".join(f"{k}: expected {expected.get(k)} found {found.get(k)}" for k in found if found[k] != expected.get(k))
        raise LimeError(f"the adapter in {directory} was saved for another model ({diffs})")
    config.sites = sites
    shapes = _expected_shapes(config, sites)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(tensors) if tuple(tensors[k].shape) != shapes[k])
    if missing or extra or wrong:
        raise LimeError(
            f"router weights in {directory} do not match mechanism {config.mechanism!r}: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}, wrong shape {wrong or 'none'}"
        )
    limeify(model, config)
    try:
        meta = [f"routers.{layer}.{name}" for layer, router in routers(model).items()
                for name, t in router.state_dict().items() if t.is_meta]
        if meta:
            raise LimeError(
                f"the model is on the meta device (offloaded, or built on meta and never materialized), so "
                f"its routers ({', '.join(meta)}) would be created there and hold nothing; load the base "
                "model's weights onto a real device (model.to_empty(device=...) and load them) before load_lime"
            )
        for layer, router in routers(model).items():
            prefix = f"routers.{layer}."
            params = router.state_dict()  # DTensor shards when sharded: each takes its part of rank 0's tensor
            saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            router.load_state_dict({k: distributed.like(params[k], v) for k, v in saved.items()})
    except BaseException:
        unlimeify(model)
        raise
    return model


def _check_shardable(model: nn.Module, config: LimeConfig, directory) -> None:
    """Loading into a ``fully_shard``-ed model: it cannot be traced, and FSDP must be able to take
    the new routers (see :func:`limeify.distributed.shard_routers`)."""
    if not distributed.fsdp_modules(model):
        raise LimeError(
            f"{type(model).__name__} holds DTensor parameters but no fully_shard-ed module; load_lime "
            "supports FSDP2 (fully_shard) models only: load the adapter before parallelizing the model"
        )
    if config.sites is None:
        raise LimeError(
            f"the adapter in {directory} does not record its attention sites, and a fully_shard-ed "
            "model cannot be traced to find them; load_lime into the base model before fully_shard"
        )
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise LimeError(
            f"the fully_shard-ed model is still on the meta device ({meta}); materialize it first "
            "(model.to_empty(device=...) and load its weights), then load_lime: to_empty would wipe "
            "the routers' loaded values"
        )
    distributed.check_can_add_routers(model)
