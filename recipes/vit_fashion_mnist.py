#!/usr/bin/env python
"""A small ViT trained from scratch on Fashion-MNIST, baseline vs LIMe (limeify init="paper").

Model: transformers ViTForImageClassification, 6 layers, hidden 128, 4 heads (MHA: every head
has its own K/V, so LIMe's routers are [4, 4(l+1)]), MLP 256, 7x7 patches of the 28x28 image
(16 patches + CLS; `--patch-size 4` gives 49 patches, ~3x the compute), no dropout. Data: Fashion-MNIST from the Debian package
`dataset-fashion-mnist`; when it is not installed the recipe falls back to scikit-learn's 8x8
digits (2x2 patches) and says so.

Both variants: same base-weight init (built right after seeding), same batches in the same
order, same steps and schedule (linear warmup, cosine decay to 10%), AdamW lr 1e-3 with weight
decay 0.1 on matrices; LIMe's routers use lr 1e-2 without decay (the paper's settings).
Test accuracy is measured on a fixed subset during training and on the whole test set at
the end.

Outputs in runs/vit_fashion_mnist/<timestamp>/: config.json, metrics.json, results.md,
curves.png (training loss and test accuracy of both), router_heatmap.png, and the final
checkpoints (checkpoints/*.safetensors, LIMe routers via limeify.save_lime).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Idle OpenMP threads sleep instead of spinning (see finetune_routers.py); before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import limeify  # noqa: E402
from common import load_images, resolve_device, run_dir, set_seed, write_json, write_markdown_table  # noqa: E402
from limeify.analysis import plot_router_heatmap, router_heatmap  # noqa: E402
from train_utils import Timer, add_run_args, autocast, ema, env_info, fmt_mean_std, lr_factor, mean_std, param_groups, plot_panels  # noqa: E402

RECIPE = "vit_fashion_mnist"
VARIANTS = ("baseline", "lime")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python recipes/vit_fashion_mnist.py                 # ~5-8 min on 2 CPU cores\n"
        "  python recipes/vit_fashion_mnist.py --seeds 3       # mean +- std over 3 seeds\n"
        "  python recipes/vit_fashion_mnist.py --dataset digits\n"
        "  python recipes/vit_fashion_mnist.py --max-steps 5000 --device cuda",
    )
    add_run_args(p, seed_help="first seed; each seed fixes init, router init and data order")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...) (default: %(default)s)")
    p.add_argument("--dataset", choices=["fashion_mnist", "digits"], default="fashion_mnist",
                   help="Fashion-MNIST (Debian package dataset-fashion-mnist; falls back to digits if absent) "
                        "or scikit-learn's 8x8 digits (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--layers", type=int, default=6, help="transformer layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--intermediate", type=int, default=256, help="MLP width (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=0, help="patch size; 0 = 7 for Fashion-MNIST (28x28), 2 for digits (8x8)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr of the base weights (default: %(default)s)")
    p.add_argument("--router-lr", type=float, default=1e-2, help="peak lr of LIMe's routers (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=60, help="test accuracy on --eval-subset every N steps (default: %(default)s)")
    p.add_argument("--eval-subset", type=int, default=2000, help="test images used during training (default: %(default)s)")
    p.add_argument("--no-save", action="store_true", help="do not write model checkpoints")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.eval_every, args.eval_subset = 4, 32, 2, 64
        args.layers, args.hidden, args.heads, args.intermediate = 2, 32, 2, 64
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    return args


def build_model(args, image_size: int, patch: int, num_labels: int):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=patch, num_channels=1, hidden_size=args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=args.intermediate,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
                    attn_implementation="sdpa")
    return ViTForImageClassification(cfg)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, device, batch: int = 500) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        with autocast(device):
            logits = model(pixel_values=x[i : i + batch].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == y[i : i + batch]).sum())
    model.train(was)
    return correct / x.shape[0]


def train_one(variant, seed, args, data, device, patch):
    x_train, y_train, x_test, y_test = data
    set_seed(seed)
    model = build_model(args, x_train.shape[-1], patch, 10)
    if variant == "lime":
        limeify.limeify(model, limeify.LimeConfig(init="paper"))
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_router = sum(p.numel() for p in limeify.router_parameters(model)) if variant == "lime" else 0
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay, args.router_lr if variant == "lime" else None))
    g = torch.Generator().manual_seed(seed)
    need = args.max_steps * args.batch_size
    order = torch.cat([torch.randperm(x_train.shape[0], generator=g) for _ in range(math.ceil(need / x_train.shape[0]))])[:need]
    order = order.view(args.max_steps, args.batch_size)
    sub_x, sub_y = x_test[: args.eval_subset], y_test[: args.eval_subset]
    timer = Timer()
    losses, evals = [], [(0, accuracy(model, sub_x, sub_y, device))]
    model.train()
    bar = tqdm(range(args.max_steps), desc=f"{variant} seed {seed}", dynamic_ncols=True)
    for step in bar:
        f = lr_factor(step, args.max_steps, args.warmup)
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * f
        idx = order[step]
        with autocast(device):
            logits = model(pixel_values=x_train[idx].to(device)).logits
        loss = F.cross_entropy(logits.float(), y_train[idx].to(device))
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            evals.append((step + 1, accuracy(model, sub_x, sub_y, device)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{evals[-1][1]:.3f}")
    train_time = timer.as_dict()
    evals.append((args.max_steps, accuracy(model, sub_x, sub_y, device)))
    test_acc = accuracy(model, x_test, y_test, device)
    model.eval()
    print(f"{variant} seed {seed}: test accuracy {test_acc:.4f} ({x_test.shape[0]} images), {n_params:,} params "
          f"({n_router:,} router), {train_time['wall_s']:.0f} s")
    return {"variant": variant, "seed": seed, "params": n_params, "router_params": n_router, "train_losses": losses,
            "acc_curve": evals, "test_acc": test_acc, "train_time": train_time}, model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    total = Timer()
    device = resolve_device(args.device)
    out = run_dir(RECIPE, args.out_root)
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"[{RECIPE}] outputs -> {out}  (device {device}; seeds {seeds})")

    name, x_tr, y_tr, x_te, y_te = load_images(args.dataset)
    if name != args.dataset:
        print(f"NOTICE: using scikit-learn digits instead of {args.dataset}; results are NOT Fashion-MNIST numbers.")
    if args.smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:512], y_tr[:512], x_te[:128], y_te[:128]
    patch = args.patch_size or (7 if name == "fashion_mnist" else 2)
    if x_tr.shape[-1] % patch:
        raise SystemExit(f"--patch-size {patch} does not divide the {x_tr.shape[-1]}x{x_tr.shape[-1]} images")
    mean, std = float(x_tr.mean()) / 255.0, float(x_tr.std()) / 255.0

    def prep(x: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0 - mean) / std).unsqueeze(1)

    data = (prep(x_tr), torch.from_numpy(y_tr.astype(np.int64)), prep(x_te), torch.from_numpy(y_te.astype(np.int64)))
    print(f"Dataset {name}: {x_tr.shape[0]} train / {x_te.shape[0]} test images of {x_tr.shape[1]}x{x_tr.shape[2]}, "
          f"patch {patch} -> {(x_tr.shape[-1] // patch) ** 2} patches + CLS; "
          f"{args.max_steps} steps x {args.batch_size} = {args.max_steps * args.batch_size / x_tr.shape[0]:.2f} epochs")
    config = {"recipe": RECIPE, "args": vars(args), "env": env_info(device), "dataset": name,
              "dataset_requested": args.dataset, "patch_size": patch, "normalization": {"mean": mean, "std": std},
              "data": {"train": int(x_tr.shape[0]), "test": int(x_te.shape[0])}}
    write_json(config, out / "config.json")

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            res, model = train_one(variant, seed, args, data, device, patch)
            results[variant].append(res)
            if seed == seeds[0] and variant == "lime":
                weights = [w.detach().cpu() for w in limeify.router_parameters(model)]
                plot_router_heatmap(router_heatmap(weights, args.heads), out / "router_heatmap.png",
                                    layer_indices=list(limeify.routers(model)),
                                    title=f"ViT LIMe routers, seed {seed}")
                limeify.save_lime(model, out / "checkpoints" / "lime_routers")
            if seed == seeds[0] and not args.no_save:
                from safetensors.torch import save_model

                (out / "checkpoints").mkdir(exist_ok=True)
                save_model(model, str(out / "checkpoints" / f"{variant}_seed{seed}.safetensors"))
            del model

    rows = []
    for v in VARIANTS:
        accs = [100 * r["test_acc"] for r in results[v]]
        rows.append({"model": "ViT baseline" if v == "baseline" else 'ViT + LIMe (init="paper")',
                     "params": f"{results[v][0]['params']:,}", "router params": f"{results[v][0]['router_params']:,}",
                     "seeds": len(accs), "test accuracy (%)": fmt_mean_std(accs, 2),
                     "final train loss (EMA)": round(mean_std(ema(r["train_losses"], 0.1)[-1] for r in results[v])[0], 4),
                     "train time / seed (s)": round(mean_std(r["train_time"]["wall_s"] for r in results[v])[0], 1)})
    diffs = [100 * (l["test_acc"] - b["test_acc"]) for b, l in zip(results["baseline"], results["lime"])]
    verdict = (f"LIMe minus baseline test accuracy: {fmt_mean_std(diffs, 2)} points; LIMe higher in "
               f"{sum(d > 0 for d in diffs)} of {len(diffs)} seed(s), equal in {sum(d == 0 for d in diffs)}.")
    if name != args.dataset:
        verdict += " (Dataset: scikit-learn digits fallback, not Fashion-MNIST.)"
    table = write_markdown_table(rows, out / "results.md")
    cmd = "python recipes/vit_fashion_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "results.md").write_text(
        f"# {RECIPE}: {args.layers}-layer ViT from scratch on {name}, baseline vs LIMe\n\n" + table
        + f"\nCommand: `{cmd.strip()}`\n\nTest accuracy on all {x_te.shape[0]} test images after {args.max_steps} steps "
        f"x {args.batch_size} images. {verdict}\n")

    colors = {"baseline": "tab:blue", "lime": "tab:orange"}
    loss_series, acc_series, loss_styles, acc_styles = {}, {}, {}, {}
    for v in VARIANTS:
        for r in results[v]:
            label = v + (f" s{r['seed']}" if len(seeds) > 1 else "")
            loss_series[label] = (range(1, len(r["train_losses"]) + 1), ema(r["train_losses"], 0.1))
            acc_series[label] = ([s for s, _ in r["acc_curve"]], [100 * a for _, a in r["acc_curve"]])
            loss_styles[label] = {"color": colors[v]}
            acc_styles[label] = {"color": colors[v], "marker": "o"}
    plot_panels(out / "curves.png", [
        {"title": "training loss (EMA 0.1)", "xlabel": "step", "ylabel": "cross-entropy", "series": loss_series, "styles": loss_styles},
        {"title": f"test accuracy ({min(args.eval_subset, x_te.shape[0])} images)", "xlabel": "step", "ylabel": "accuracy (%)",
         "series": acc_series, "styles": acc_styles},
    ], suptitle=f"ViT on {name}: baseline vs LIMe")

    metrics = {"dataset": name, "runs": results, "acc_change_points": diffs, "verdict": verdict,
               "summary": {v: {"test_acc_mean": mean_std(r["test_acc"] for r in results[v])[0],
                               "test_acc_std": mean_std(r["test_acc"] for r in results[v])[1]} for v in VARIANTS},
               "total_time": total.as_dict()}
    write_json(metrics, out / "metrics.json")
    print("\n" + table + "\n" + verdict)
    print(f"\nOutputs in {out}. Total {total.wall / 60:.1f} min wall, {total.cpu / 60:.1f} min CPU.")
    return {"out": str(out), "metrics": metrics}


if __name__ == "__main__":
    main()
