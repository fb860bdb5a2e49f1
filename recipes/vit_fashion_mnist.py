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

import numpy as np
import torch
import torch.nn.functional as F

from recipes.common import load_images
from recipes.train_utils import (
    VARIANT_COLORS, VARIANTS, RecipeRun, add_optimizer_args, autocast, ema, fmt_mean_std, mean_std, plot_panels,
    recipe_parser, train_variant, variant_row,
)

RECIPE = "vit_fashion_mnist"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = recipe_parser(__doc__, [
        "python -m recipes.vit_fashion_mnist                 # ~5-8 min on 2 CPU cores",
        "python -m recipes.vit_fashion_mnist --seeds 3       # mean +- std over 3 seeds",
        "python -m recipes.vit_fashion_mnist --dataset digits",
        "python -m recipes.vit_fashion_mnist --max-steps 5000 --device cuda",
    ])
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
    add_optimizer_args(p, lr=1e-3)
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
    sub_x, sub_y = x_test[: args.eval_subset], y_test[: args.eval_subset]

    def loss_fn(model, idx):
        logits = model(pixel_values=x_train[idx].to(device)).logits
        return F.cross_entropy(logits.float(), y_train[idx].to(device))

    t = train_variant(variant, seed, args, device, lambda: build_model(args, x_train.shape[-1], patch, 10), x_train.shape[0],
                      loss_fn, lambda model: accuracy(model, sub_x, sub_y, device), metric="acc")
    train_time = t.timer.as_dict()
    test_acc = accuracy(t.model, x_test, y_test, device)
    print(f"{variant} seed {seed}: test accuracy {test_acc:.4f} ({x_test.shape[0]} images), {t.params:,} params "
          f"({t.router_params:,} router), {train_time['wall_s']:.0f} s")
    return {"variant": variant, "seed": seed, "params": t.params, "router_params": t.router_params, "train_losses": t.losses,
            "acc_curve": t.evals, "test_acc": test_acc, "train_time": train_time}, t.model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seeds = [args.seed + i for i in range(args.seeds)]
    run = RecipeRun(RECIPE, args, seeds, argv)

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
    run.write_config(dataset=name, dataset_requested=args.dataset, patch_size=patch, normalization={"mean": mean, "std": std},
                     data={"train": int(x_tr.shape[0]), "test": int(x_te.shape[0])})

    results = run.train_variants(lambda variant, seed: train_one(variant, seed, args, data, run.device, patch),
                                 kv_heads=args.heads, router_title="ViT LIMe routers")

    rows = []
    for v in VARIANTS:
        accs = [100 * r["test_acc"] for r in results[v]]
        rows.append(variant_row("ViT baseline" if v == "baseline" else 'ViT + LIMe (init="paper")', results[v], {
            "test accuracy (%)": fmt_mean_std(accs, 2),
            "final train loss (EMA)": round(mean_std(ema(r["train_losses"], 0.1)[-1] for r in results[v])[0], 4)}))
    diffs = [100 * (l["test_acc"] - b["test_acc"]) for b, l in zip(results["baseline"], results["lime"])]
    verdict = (f"LIMe minus baseline test accuracy: {fmt_mean_std(diffs, 2)} points; LIMe higher in "
               f"{sum(d > 0 for d in diffs)} of {len(diffs)} seed(s), equal in {sum(d == 0 for d in diffs)}.")
    if name != args.dataset:
        verdict += " (Dataset: scikit-learn digits fallback, not Fashion-MNIST.)"
    table = run.write_results(rows, f"{args.layers}-layer ViT from scratch on {name}, baseline vs LIMe",
                              f"Test accuracy on all {x_te.shape[0]} test images after {args.max_steps} steps "
                              f"x {args.batch_size} images. {verdict}\n")

    loss_series, acc_series, loss_styles, acc_styles = {}, {}, {}, {}
    for v in VARIANTS:
        for r in results[v]:
            label = v + (f" s{r['seed']}" if len(seeds) > 1 else "")
            loss_series[label] = (range(1, len(r["train_losses"]) + 1), ema(r["train_losses"], 0.1))
            acc_series[label] = ([s for s, _ in r["acc_curve"]], [100 * a for _, a in r["acc_curve"]])
            loss_styles[label] = {"color": VARIANT_COLORS[v]}
            acc_styles[label] = {"color": VARIANT_COLORS[v], "marker": "o"}
    plot_panels(run.out / "curves.png", [
        {"title": "training loss (EMA 0.1)", "xlabel": "step", "ylabel": "cross-entropy", "series": loss_series, "styles": loss_styles},
        {"title": f"test accuracy ({min(args.eval_subset, x_te.shape[0])} images)", "xlabel": "step", "ylabel": "accuracy (%)",
         "series": acc_series, "styles": acc_styles},
    ], suptitle=f"ViT on {name}: baseline vs LIMe")

    metrics = {"dataset": name, "runs": results, "acc_change_points": diffs, "verdict": verdict,
               "summary": {v: {"test_acc_mean": mean_std(r["test_acc"] for r in results[v])[0],
                               "test_acc_std": mean_std(r["test_acc"] for r in results[v])[1]} for v in VARIANTS}}
    return run.finish(metrics, table, verdict)


if __name__ == "__main__":
    main()
