"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support for saving and loading routers.

Under FSDP2 a parameter is a ``DTensor``: each rank holds one shard. Saving gathers each router
tensor on every rank (``DTensor.full_tensor()``, a collective) and rank 0 alone writes; loading
into a sharded model puts the new routers under FSDP too (:func:`shard_routers`) and scatters
the saved full tensors from rank 0 into their shards (``distribute_tensor``).

Nothing here touches ``torch.distributed`` unless the model holds DTensors or FSDP modules, so
plain and DDP models keep their single-process behaviour (one rank saves, no collectives).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .errors import LimeError
from .injection import lime_state
from .routers import ROUTER_ATTR


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    cls = _fsdp_module_type()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` (or part of it) was ``fully_shard``-ed, or holds DTensor parameters."""
    return bool(fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def _model_mesh(model: nn.Module):
    return next((p.device_mesh for p in model.parameters() if is_dtensor(p)), None)


def _mesh_device(mesh) -> torch.device:
    """The device collectives over ``mesh`` run on (this rank's current accelerator, or the CPU)."""
    import torch.distributed as dist

    kind = mesh.device_type if mesh is not None else ("cpu" if dist.get_backend() == "gloo" else "cuda")
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def _world(mesh) -> None:
    """Saving and loading synchronise over the default process group: the mesh must span it."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise LimeError(
            "the model holds sharded (DTensor) routers but torch.distributed is not initialized; "
            "call save_lime/load_lime inside the process group that sharded the model"
        )
    if mesh is not None and mesh.size() != dist.get_world_size():
        raise LimeError(
            f"the routers are sharded over {mesh.size()} of the {dist.get_world_size()} ranks of the "
            "default process group; save_lime/load_lime gather over all of them (rank 0 writes), so "
            "shard the model over a device mesh that spans every rank (2-D meshes for HSDP are fine)"
        )


def unreadable(key: str, t: torch.Tensor) -> str | None:
    """Why this rank cannot read router tensor ``key`` (meta, fake, ...), or None if it can."""
    if t.is_meta:
        return (
            f"router tensor {key} is on the meta device (offloaded, or a model built on meta and "
            "never materialized), so there is nothing to save; put the model on a real device "
            "first: load it without disk/meta offloading, or call model.to_empty(device=...) and "
            "load its weights (under FSDP2: after fully_shard) before limeify.save_lime"
        )
    local = (t.to_local() if is_dtensor(t) else t).detach()
    try:
        # Saved from the CPU either way; other backends need not expose a host data pointer.
        (local if local.device.type == "cpu" else local.cpu()).untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError) as exc:
        return (
            f"router tensor {key} ({type(t).__name__} on {t.device}) cannot be read ({exc}); call "
            "limeify.save_lime outside torch.compile/tracing, on a model whose weights are real tensors"
        )
    return None


def agree(problem: str | None, tensors: list[torch.Tensor]) -> str | None:
    """``problem`` on this rank, or a message if another rank has one (all ranks call this).

    With sharded tensors every rank must go on to the same collectives or none: one rank
    raising while the others gather would leave them waiting forever.
    """
    import torch.distributed as dist

    mesh = next(t.device_mesh for t in tensors if is_dtensor(t))
    _world(mesh)
    flag = torch.tensor([0 if problem is None else 1], device=_mesh_device(mesh))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if problem is None and flag.item():
        problem = "another rank cannot read its router shards (its error says why); nothing was saved"
    return problem


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s whole value as a plain tensor; for a DTensor a collective every rank must join."""
    if not is_dtensor(t):
        return t.detach()
    mesh = t.device_mesh
    local = t.to_local().detach()
    device = _mesh_device(mesh)
    if local.device != device:  # e.g. FSDP2 CPU offloading: the shards live on the CPU, NCCL needs the GPU
        from torch.distributed.tensor import DTensor

        t = DTensor.from_local(local.to(device), mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return t.full_tensor().detach()


def like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like parameter ``ref``: sharded from rank 0 when ``ref`` is a DTensor
    (a collective), else as is. Loading it into ``ref`` copies only this rank's shard."""
    if not is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=_mesh_device(ref.device_mesh), dtype=ref.dtype)
    return distribute_tensor(full, ref.device_mesh, ref.placements)


def on_rank_zero(model: nn.Module, write: Callable[[], None], what: str) -> None:
    """Run ``write`` on rank 0 only; every rank returns once it is done (or raises if it failed).

    The rank 0 status broadcast is the barrier: when this returns on any rank, what rank 0
    wrote is in place (on a file system the ranks share), so a following load anywhere sees it.
    """
    import torch.distributed as dist

    mesh = _model_mesh(model)
    _world(mesh)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            write()
        except BaseException as exc:  # tell the other ranks before raising, or they wait forever
            error = exc
    status = torch.tensor([0 if error is None else 1], device=_mesh_device(mesh))
    dist.broadcast(status, src=0)
    if error is not None:
        raise error
    if status.item():
        raise LimeError(f"rank 0 failed {what} (its own error says why); nothing was written")


def warn_unmanaged_routers(model: nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn(
        "the model is fully_shard-ed but its routers are not managed by FSDP, so each rank trained "
        "its own copy and rank 0's is saved; fully_shard the model's root too (it takes every "
        "parameter no inner fully_shard took), or limeify after fully_shard (limeify shards the routers)",
        stacklevel=3,
    )


def check_can_add_routers(model: nn.Module) -> None:
    """FSDP2 fixes its module tree at the first forward: routers added later are not part of it."""
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()
        if getattr(state, "_is_root", None) is not None:
            raise LimeError(
                "this fully_shard-ed model has already run a forward pass, after which FSDP manages "
                "no new modules; add the routers before its first forward: limeify or limeify.load_lime "
                "right after fully_shard, or before fully_shard"
            )


def _nearest_fsdp(model: nn.Module, path: str, fsdp: dict[str, nn.Module]) -> nn.Module | None:
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        found = fsdp.get(".".join(parts[:i]))
        if found is not None:
            return found
    return None


def _fsdp_settings(module: nn.Module) -> dict:
    """The mesh and the mixed-precision and offload policies of ``module``'s FSDP unit."""
    state = module._get_fsdp_state()
    groups = [g for g in getattr(state, "_fsdp_param_groups", []) if g is not None]
    if groups:
        g = groups[0]
        return {"mesh": g.mesh_info.mesh, "mp_policy": g.mp_policy, "offload_policy": g.offload_policy}
    mesh = _model_mesh(module)
    if mesh is None:
        raise LimeError(
            f"cannot tell the device mesh of the fully_shard-ed {type(module).__name__}: it holds no sharded parameters"
        )
    return {"mesh": mesh}


def shard_routers(model: nn.Module) -> nn.Module:
    """Put each router that FSDP does not manage under FSDP (in place): ``fully_shard`` it with the
    device mesh, mixed-precision and offload policies of its nearest ``fully_shard``-ed ancestor.

    ``limeify`` (and so ``load_lime``) does this when it adds routers to a model that is
    already ``fully_shard``-ed: otherwise their gradients would never be reduced across ranks
    and each rank would train its own copy. Runs on every rank, before the first forward.
    """
    from torch.distributed.fsdp import fully_shard

    fsdp_cls = _fsdp_module_type()
    fsdp = {name: m for name, m in model.named_modules() if isinstance(m, fsdp_cls)}
    if not fsdp:
        raise LimeError(
            f"{type(model).__name__} has no fully_shard-ed module; shard_routers follows an existing fully_shard"
        )
    check_can_add_routers(model)
    paths = {id(m): name for name, m in model.named_modules()}
    for owner in lime_state(model).router_owners.values():
        router = owner._modules[ROUTER_ATTR]
        if isinstance(router, fsdp_cls) or any(is_dtensor(p) for p in router.parameters()):
            continue
        ancestor = _nearest_fsdp(model, paths[id(owner)], fsdp) or next(iter(fsdp.values()))
        # Kept whole from forward to backward (routers are tiny), so backward never needs the
        # all-gather that FSDP hooks on the router's output: that output is a view of the mix,
        # an in-place op on it downstream would drop the hook, and FSDP warns about it.
        fully_shard(router, reshard_after_forward=False, **_fsdp_settings(ancestor))
    warnings.filterwarnings("ignore", message=_VIEW_WARNING, category=UserWarning)
    return model


# FSDP2 warns whenever a fully_shard-ed module returns a view, because an in-place op on it would
# drop the pre-backward all-gather; routers are not resharded after forward, so none is needed.
_VIEW_WARNING = r"FSDP2-wrapped module \(FSDP\w*Router\w*\) returned a view tensor"
