"""Router-only DDP training of a tiny limeified LLaMA, launched by test_training.py.

Launch (2 CPU processes, gloo)::

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT tests/ddp_worker.py OUT_DIR [SITES_JSON]

Each rank trains on its shard of one fixed global batch and writes its final router weights
and per-step losses to ``OUT_DIR/rank{r}.pt``. ``train`` is also called in-process by the test
for the single-process reference on the whole global batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import limeify  # noqa: E402
from limeify import AttentionSite, LimeConfig  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 12


def build(sites_json: str | None = None):
    """Same init on every rank and in the single-process run (no reliance on DDP's broadcast).

    ``sites_json``: sites discovered once by the test (skips tracing the model in every process).
    """
    from conftest import make_llama

    model = make_llama()
    sites = None
    if sites_json:
        with open(sites_json) as f:
            sites = [AttentionSite.from_dict(d) for d in json.load(f)]
    torch.manual_seed(7)
    limeify.limeify(model, LimeConfig(init="paper", sites=sites))  # non-trivial routers from the start
    limeify.mark_only_routers_trainable(model, verbose=False)
    return model.train()


def global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(3, 60, (GLOBAL_BATCH, SEQ), generator=g)


def train(model, batch: torch.Tensor, module=None) -> list[float]:
    """``STEPS`` AdamW steps on ``batch`` with the paper's router settings; returns the losses.

    ``model`` is what is called (the DDP wrapper under DDP), ``module`` the limeified model.
    """
    module = module or model
    opt = torch.optim.AdamW(limeify.router_param_groups(module, router_lr=1e-2))
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(out_dir: str, sites_json: str | None = None) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build(sites_json)
        ddp = DDP(model, find_unused_parameters=False)
        per_rank = GLOBAL_BATCH // world
        shard = global_batch()[rank * per_rank : (rank + 1) * per_rank]
        losses = train(ddp, shard, module=model)
        routers = [w.detach().clone() for w in limeify.router_parameters(model)]
        grads_seen = [w.grad is not None and bool(w.grad.abs().sum() > 0) for w in limeify.router_parameters(model)]
        torch.save({"rank": rank, "world": world, "routers": routers, "losses": losses, "grads_seen": grads_seen},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
