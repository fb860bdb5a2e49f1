"""FSDP2 (fully_shard) training, saving and loading of a tiny limeified LLaMA, launched by test_fsdp.py.

Launch (2 CPU processes, gloo)::

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT tests/fsdp_worker.py OUT_DIR SITES_JSON

Each rank trains the routers on its half of ddp_worker's global batch, with every decoder
layer and the whole model ``fully_shard``-ed, then calls ``save_lime`` (a collective) into
``OUT_DIR/adapter``, loads that adapter into a ``fully_shard``-ed base and runs it, and tries
the cases that must raise ``LimeError``. What it saw goes to ``OUT_DIR/results/rank{r}.pt``.
``train`` is also called in-process by the test for the single-process reference.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import limeify  # noqa: E402
import limeify.persistence as persistence  # noqa: E402
from limeify import LimeConfig, LimeError  # noqa: E402
from limeify.distributed import is_dtensor  # noqa: E402

from ddp_worker import GLOBAL_BATCH, build, global_batch  # noqa: E402  (same model, init and data as the DDP test)

STEPS = 2


def train(model, batch: torch.Tensor, steps: int = STEPS) -> list[float]:
    """``steps`` AdamW steps on the routers (lr 1e-2); returns the losses."""
    opt = torch.optim.AdamW(limeify.router_param_groups(model, router_lr=1e-2))
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def shard(model, mesh):
    """The usual FSDP2 pattern: each decoder layer, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(tensors) -> list[torch.Tensor]:
    """Whole values of (possibly sharded) tensors: a collective, in the same order on every rank."""
    return [(t.full_tensor() if is_dtensor(t) else t).detach().clone() for t in tensors]


def error_of(fn) -> str | None:
    try:
        fn()
    except LimeError as exc:
        return str(exc)
    return None


def main(out_dir: str, sites_json: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from conftest import make_llama

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mesh = init_device_mesh("cpu", (world,))
        per_rank = GLOBAL_BATCH // world
        batch = global_batch()
        mine = batch[rank * per_rank : (rank + 1) * per_rank]

        # 1. train the routers of a sharded model
        model = shard(build(sites_json), mesh)
        losses = train(model, mine)
        weights = limeify.router_parameters(model)
        out = {"rank": rank, "world": world, "losses": losses, "routers_sharded": all(is_dtensor(w) for w in weights),
               "routers": full(weights), "grads": full(w.grad for w in weights)}

        # 2. save: a collective, rank 0 alone writes; every rank then sees the files
        writes = []
        staged = persistence.staged_directory

        def counting(directory, *args, **kwargs):
            writes.append(str(directory))
            return staged(directory, *args, **kwargs)

        persistence.staged_directory = counting
        adapter = os.path.join(out_dir, "adapter")
        try:
            out["saved_to"] = str(limeify.save_lime(model, adapter))
        finally:
            persistence.staged_directory = staged
        out["writes"] = writes
        out["sees_adapter"] = sorted(os.listdir(adapter))

        # 3. load into a sharded base: routers under FSDP, rank 0's saved values
        base = shard(make_llama(), mesh)
        limeify.load_lime(base, adapter)
        loaded = limeify.router_parameters(base)
        out["loaded_sharded"] = all(is_dtensor(w) for w in loaded)
        out["loaded_routers"] = full(loaded)
        with torch.no_grad():
            out["loaded_logits"] = base(input_ids=batch).logits.detach()
        limeify.mark_only_routers_trainable(base, verbose=False)
        base(input_ids=mine, labels=mine).loss.backward()
        out["loaded_grads"] = full(w.grad for w in limeify.router_parameters(base))
        base.zero_grad(set_to_none=True)  # routers + base: the routers' inputs now need gradients too
        for p in base.parameters():
            p.requires_grad_(True)
        base(input_ids=mine, labels=mine).loss.backward()
        names = [n for n, _ in base.named_parameters()]
        out["loaded_all_grads"] = dict(zip(names, full(p.grad for p in base.parameters()), strict=True))

        # limeify after fully_shard puts the new routers under FSDP
        later = shard(make_llama(), mesh)
        limeify.limeify(later, LimeConfig(sites=limeify.attention_sites(model)))
        out["shard_routers"] = all(is_dtensor(w) for w in limeify.router_parameters(later))

        # 4. what must raise LimeError, on every rank alike (no rank left waiting in a collective)
        late = shard(make_llama(), mesh)
        with torch.no_grad():
            late(input_ids=mine)
        out["late_load_error"] = error_of(lambda: limeify.load_lime(late, adapter))
        out["late_still_plain"] = not limeify.is_limeified(late)
        unmaterialized = shard(make_llama().to("meta"), mesh)
        out["meta_load_error"] = error_of(lambda: limeify.load_lime(unmaterialized, adapter))
        ghost = shard(build(sites_json).to("meta"), mesh)
        out["meta_save_error"] = error_of(lambda: limeify.save_lime(ghost, os.path.join(out_dir, "ghost")))

        def full_disk(directory, *args, **kwargs):
            raise OSError(28, "No space left on device")

        persistence.staged_directory = full_disk  # rank 0 fails to write: the others must not wait forever
        try:
            limeify.save_lime(model, os.path.join(out_dir, "full"))
        except (OSError, LimeError) as exc:
            out["failed_save"] = f"{type(exc).__name__}: {exc}"
        finally:
            persistence.staged_directory = staged

        torch.save(out, os.path.join(out_dir, "results", f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
