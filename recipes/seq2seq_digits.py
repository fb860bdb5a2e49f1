#!/usr/bin/env python
"""A small encoder-decoder (BART) trained from scratch to reverse (or sort) digit strings, baseline vs LIMe.

Model: transformers BartForConditionalGeneration, 3 encoder + 3 decoder layers, d_model 128,
4 heads (MHA), FFN 256, learned positions, no dropout, tied embeddings. Vocabulary: 13 tokens,
pad=0, bos=1 (also the decoder start token), eos=2, digits 0-9 = 3..12. Task, generated on the
fly by a seeded generator (no data files): the source is a string of 4..16 random digits, the
target is the string reversed (`--task reverse`, default) or sorted (`--task sort`); both end
with eos. The test set is drawn once from its own seed (`--test-seed`, the same for every seed
of the run); each seed's training examples come from a generator seeded with that seed, and any
example that is also in the test set is dropped, so train and test are disjoint.

LIMe: limeify(model, LimeConfig(init="paper")) right after the model is built (the baseline is
built from the same seed, so both share the base-weight init). limeify finds three stacks in
BART, the encoder's self-attention, the decoder's self-attention and the decoder's
cross-attention, and gives every layer of depth >= 1 of each stack a router over the raw K/V of
its own stack's earlier layers. All weights are trained (AdamW, lr 1e-3, weight decay 0.1 on
matrices, warmup then cosine decay to 10%); the routers use lr 1e-2 and no decay (the paper's),
through limeify.router_param_groups. Both variants of a seed see the same batches in the same order.

The default budget (250 steps x 64 examples, lr 1e-3, strings up to 16 digits) is chosen so that
exact match is not saturated: with strings up to 12 digits (250-700 steps), or 800 steps at up
to 16 digits, both variants reached 100% in our runs and the comparison said nothing. Runs near this budget sit close to a learning transition
(the model finds the position alignment or not), so results vary a lot between seeds: look at
the paired differences, not one seed.

Evaluation on the test set: exact match of greedy `model.generate(..., use_cache=True)` (the
whole generated sequence up to eos equals the target) and token accuracy with teacher forcing
(digits and eos). The table gives mean ± std over the seeds and the paired difference
LIMe − baseline (same seed) with its std.

Outputs in runs/seq2seq_digits/<timestamp>/: config.json, metrics.json, results.md,
loss_curves.png (training loss and teacher-forced test token accuracy, mean over seeds with a
min-max band), router_heatmap.png, and the first seed's checkpoints (checkpoints/*.safetensors,
LIMe routers via limeify.save_lime).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

import limeify
from recipes.train_utils import (
    VARIANT_COLORS, VARIANTS, RecipeRun, add_optimizer_args, autocast, ema, fmt_mean_std, markdown_table, mean_std,
    recipe_parser, set_seed, train_variant, variant_row,
)

RECIPE = "seq2seq_digits"
PAD, BOS, EOS, DIGIT0 = 0, 1, 2, 3
VOCAB_SIZE = DIGIT0 + 10
IGNORE = -100  # label of padding positions (ignored by the loss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = recipe_parser(__doc__, [
        "python -m recipes.seq2seq_digits                  # 3 seeds, ~4 min on 2 CPU cores",
        "python -m recipes.seq2seq_digits --task sort",
        "python -m recipes.seq2seq_digits --seeds 5 --max-steps 400 --max-len 20",
        "python -m recipes.seq2seq_digits --smoke          # tiny model, a few steps, 1 seed",
    ])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...) (default: %(default)s)")
    p.add_argument("--task", choices=["reverse", "sort"], default="reverse",
                   help="target = the digit string reversed or sorted (default: %(default)s)")
    p.add_argument("--min-len", type=int, default=4, help="shortest digit string (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=16, help="longest digit string (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=2000, help="test examples (default: %(default)s)")
    p.add_argument("--test-seed", type=int, default=1_000_003,
                   help="seed of the test set, the same for every training seed (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=250, help="optimizer steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step (default: %(default)s)")
    p.add_argument("--layers", type=int, default=3, help="encoder layers and decoder layers, each (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=128, help="hidden size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=256, help="feed-forward width (default: %(default)s)")
    add_optimizer_args(p, lr=1e-3)
    p.add_argument("--eval-every", type=int, default=50,
                   help="teacher-forced token accuracy on --eval-subset test examples every N steps (default: %(default)s)")
    p.add_argument("--eval-subset", type=int, default=500, help="test examples used during training (default: %(default)s)")
    p.add_argument("--no-save", action="store_true", help="do not write model checkpoints")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.max_steps, args.batch_size, args.eval_every = 1, 6, 16, 3
        args.test_size, args.eval_subset = 64, 32
        args.layers, args.d_model, args.heads, args.ffn = 2, 32, 2, 64
    if args.d_model % args.heads:
        p.error("--d-model must be divisible by --heads")
    if not 1 <= args.min_len <= args.max_len:
        p.error("need 1 <= --min-len <= --max-len")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.layers < 2:
        print("NOTICE: with --layers 1 no stack has a layer of depth >= 1, so LIMe adds no routers.")
    return args


# ----------------------------------------------------------------------------- data


def make_example(rng: random.Random, task: str, min_len: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(source digits, target digits) as tuples of ints 0..9."""
    src = tuple(rng.randrange(10) for _ in range(rng.randint(min_len, max_len)))
    tgt = tuple(reversed(src)) if task == "reverse" else tuple(sorted(src))
    return src, tgt


def make_test_set(args: argparse.Namespace) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """`args.test_size` distinct examples from the test seed."""
    rng, seen, out = random.Random(args.test_seed), set(), []
    for _ in range(100 * args.test_size):
        ex = make_example(rng, args.task, args.min_len, args.max_len)
        if ex[0] not in seen:
            seen.add(ex[0])
            out.append(ex)
            if len(out) == args.test_size:
                return out
    raise SystemExit(f"could not draw {args.test_size} distinct test strings of length {args.min_len}..{args.max_len}")


def make_train_set(args: argparse.Namespace, seed: int, n: int, exclude: set) -> tuple[list, int]:
    """n training examples from `seed`, skipping sources in `exclude`; also returns how many were skipped."""
    rng, out, dropped = random.Random(seed), [], 0
    while len(out) < n:
        ex = make_example(rng, args.task, args.min_len, args.max_len)
        if ex[0] in exclude:
            dropped += 1
            if dropped > 100 * n:
                raise SystemExit("the test set covers (almost) every string; use a smaller --test-size or longer strings")
            continue
        out.append(ex)
    return out, dropped


def encode(examples: list, max_len: int) -> dict[str, torch.Tensor]:
    """input_ids [N, max_len+1] (digits, eos, pad...), attention_mask, labels [N, max_len+1] (target, eos, -100...)."""
    n, width = len(examples), max_len + 1
    ids = torch.full((n, width), PAD, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (src, tgt) in enumerate(examples):
        ids[i, : len(src) + 1] = torch.tensor([DIGIT0 + d for d in src] + [EOS])
        labels[i, : len(tgt) + 1] = torch.tensor([DIGIT0 + d for d in tgt] + [EOS])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


# ----------------------------------------------------------------------------- model and metrics


def build_model(args: argparse.Namespace):
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    cfg = BartConfig(vocab_size=VOCAB_SIZE, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
                     encoder_attention_heads=args.heads, decoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn,
                     decoder_ffn_dim=args.ffn, max_position_embeddings=max(32, args.max_len + 2), dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                     decoder_start_token_id=BOS, forced_eos_token_id=None, attn_implementation="sdpa")
    model = BartForConditionalGeneration(cfg)
    # Plain greedy decoding: no forced tokens, no n-gram blocking, no length penalties from defaults.
    model.generation_config = GenerationConfig(decoder_start_token_id=BOS, bos_token_id=BOS, eos_token_id=EOS,
                                               pad_token_id=PAD, do_sample=False, num_beams=1)
    return model


@torch.no_grad()
def token_accuracy(model, data: dict[str, torch.Tensor], device, limit: int | None = None, batch: int = 500) -> float:
    """Teacher-forced accuracy of the argmax over all label positions (target digits and eos)."""
    was = model.training
    model.eval()
    n = data["input_ids"].shape[0] if limit is None else min(limit, data["input_ids"].shape[0])
    correct = total = 0
    for i in range(0, n, batch):
        b = {k: v[i : min(i + batch, n)].to(device) for k, v in data.items()}
        with autocast(device):
            logits = model(**b).logits
        mask = b["labels"] != IGNORE
        correct += int(((logits.argmax(-1) == b["labels"]) & mask).sum())
        total += int(mask.sum())
    model.train(was)
    return correct / total


def decode(row: list[int]) -> tuple[int, ...] | None:
    """Generated ids after the decoder start token -> digits up to eos; None if no eos or a non-digit before it."""
    if EOS not in row:
        return None
    body = row[: row.index(EOS)]
    if any(not DIGIT0 <= t < DIGIT0 + 10 for t in body):
        return None
    return tuple(t - DIGIT0 for t in body)


@torch.no_grad()
def generate(model, data: dict[str, torch.Tensor], device, max_len: int, use_cache: bool = True,
             limit: int | None = None, batch: int = 500) -> list[tuple[int, ...] | None]:
    """Greedy decoding of every source (at most max_len + 1 new tokens: the digits and eos)."""
    was = model.training
    model.eval()
    n = data["input_ids"].shape[0] if limit is None else min(limit, data["input_ids"].shape[0])
    out = []
    for i in range(0, n, batch):
        with autocast(device):
            gen = model.generate(input_ids=data["input_ids"][i : i + batch].to(device),
                                 attention_mask=data["attention_mask"][i : i + batch].to(device),
                                 max_new_tokens=max_len + 1, do_sample=False, num_beams=1, use_cache=use_cache)
        assert bool((gen[:, 0] == BOS).all()), "generate() should start every output with the decoder start token"
        out += [decode(row) for row in gen[:, 1:].tolist()]
    model.train(was)
    return out


def sites_info(model) -> dict:
    """The attention stacks limeify found, each with its sites (global layer numbers) and which have routers."""
    with_router = set(limeify.routers(model))
    stacks: dict[str, dict] = {}
    for site in limeify.attention_sites(model):
        s = stacks.setdefault(site.stack, {"layers": [], "router_layers": []})
        s["layers"].append(site.layer)
        if site.layer in with_router:
            s["router_layers"].append(site.layer)
    return {"stacks": stacks, "n_stacks": len(stacks),
            "n_stacks_with_routers": sum(1 for s in stacks.values() if s["router_layers"])}


# ----------------------------------------------------------------------------- training


def train_one(variant: str, seed: int, args: argparse.Namespace, test: list, test_data: dict, device):
    n_train = args.max_steps * args.batch_size  # every step sees fresh examples
    examples, dropped = make_train_set(args, seed, n_train, exclude={src for src, _ in test})
    train = encode(examples, args.max_len)

    def loss_fn(model, idx):
        return model(**{k: v[idx].to(device) for k, v in train.items()}).loss

    t = train_variant(variant, seed, args, device, lambda: build_model(args), n_train, loss_fn,
                      lambda model: token_accuracy(model, test_data, device, limit=args.eval_subset), metric="tok_acc")
    train_time = t.timer.as_dict()
    tok_acc = token_accuracy(t.model, test_data, device)
    preds = generate(t.model, test_data, device, args.max_len)
    hits = [p == tgt for p, (_, tgt) in zip(preds, test)]
    exact = sum(hits) / len(hits)
    by_len: dict[int, list[bool]] = {}
    for (src, _), hit in zip(test, hits):
        by_len.setdefault(len(src), []).append(hit)
    # KV-cache check: greedy decoding without the cache must give the same outputs.
    k = min(64, len(test))
    cache_agreement = sum(a == b for a, b in zip(preds[:k], generate(t.model, test_data, device, args.max_len,
                                                                     use_cache=False, limit=k))) / k
    print(f"{variant} seed {seed}: exact match {exact:.4f}, token accuracy {tok_acc:.4f} ({len(test)} test examples), "
          f"{t.params:,} params ({t.router_params:,} router), {train_time['wall_s']:.0f} s; "
          f"cached vs uncached greedy agree on {cache_agreement:.0%} of {k}")
    result = {"variant": variant, "seed": seed, "params": t.params, "router_params": t.router_params,
              "train_examples": n_train, "train_examples_dropped_in_test": dropped, "train_losses": t.losses,
              "tok_acc_curve": t.evals, "exact_match": exact, "token_accuracy": tok_acc,
              "exact_match_by_len": {n: sum(h) / len(h) for n, h in sorted(by_len.items())},
              "cache_agreement": cache_agreement, "train_time": train_time,
              "samples": [{"source": "".join(map(str, src)), "target": "".join(map(str, tgt)),
                           "output": None if p is None else "".join(map(str, p))}
                          for (src, tgt), p in list(zip(test, preds))[:5]]}
    if variant == "lime":
        result.update(sites_info(t.model))
    return result, t.model


def plot_curves(path: Path, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Training loss (EMA) and teacher-forced test token accuracy: mean over seeds, min-max band."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for v in VARIANTS:
        runs, color = results[v], VARIANT_COLORS[v]
        losses = np.array([ema(r["train_losses"], 0.05) for r in runs])
        steps = np.arange(1, losses.shape[1] + 1)
        accs = np.array([[100 * a for _, a in r["tok_acc_curve"]] for r in runs])
        acc_steps = [s for s, _ in runs[0]["tok_acc_curve"]]
        label = f"{v} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        for ax, xs, ys in ((ax_loss, steps, losses), (ax_acc, acc_steps, accs)):
            ax.plot(xs, ys.mean(0), color=color, label=label)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.2, linewidth=0)
    ax_loss.set(title="training loss (EMA 0.05)", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_acc.set(title=f"test token accuracy, teacher forced ({min(args.eval_subset, args.test_size)} examples)",
               xlabel="step", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"BART {args.layers}+{args.layers} layers, {args.task} digits: baseline vs LIMe (band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seeds = [args.seed + i for i in range(args.seeds)]
    run = RecipeRun(RECIPE, args, seeds, argv)

    test = make_test_set(args)
    test_data = encode(test, args.max_len)
    print(f"Task {args.task}: digit strings of length {args.min_len}..{args.max_len}; {len(test)} test examples "
          f"(seed {args.test_seed}); per seed {args.max_steps} steps x {args.batch_size} fresh training examples "
          f"(seeded by the seed, test strings dropped)")

    # The architecture limeify sees, once, before any training.
    set_seed(seeds[0])
    probe = build_model(args)
    limeify.limeify(probe, limeify.LimeConfig(init="paper"))
    print(limeify.describe(probe))
    architecture = sites_info(probe)
    del probe
    run.write_config(task=args.task, vocab={"pad": PAD, "bos": BOS, "eos": EOS, "digits": f"{DIGIT0}..{DIGIT0 + 9}"},
                     data={"test": len(test), "train_per_seed": args.max_steps * args.batch_size}, lime_sites=architecture)

    results = run.train_variants(lambda variant, seed: train_one(variant, seed, args, test, test_data, run.device),
                                 kv_heads=args.heads,
                                 router_title="BART LIMe routers (row: layer; column: source depth in its stack)")

    rows = []
    for v in VARIANTS:
        rows.append(variant_row("BART baseline" if v == "baseline" else 'BART + LIMe (init="paper")', results[v], {
            "exact match (%)": fmt_mean_std([100 * r["exact_match"] for r in results[v]], 2),
            "token acc. (%)": fmt_mean_std([100 * r["token_accuracy"] for r in results[v]], 2),
            "final train loss (EMA)": round(mean_std(ema(r["train_losses"], 0.05)[-1] for r in results[v])[0], 4)}))
    em_diffs = [100 * (l["exact_match"] - b["exact_match"]) for b, l in zip(results["baseline"], results["lime"])]
    tok_diffs = [100 * (l["token_accuracy"] - b["token_accuracy"]) for b, l in zip(results["baseline"], results["lime"])]
    rows.append({"model": "LIMe − baseline (paired by seed)", "params": "", "router params": "", "seeds": len(seeds),
                 "exact match (%)": fmt_mean_std(em_diffs, 2), "token acc. (%)": fmt_mean_std(tok_diffs, 2)})

    d_mean, d_std = mean_std(em_diffs)
    wins = sum(d > 0 for d in em_diffs)
    if len(seeds) < 2:
        verdict = (f"LIMe − baseline exact match: {d_mean:+.2f} points on 1 seed; "
                   f"run --seeds 3 or more to compare it with the seeds' spread.")
    else:
        spread = (f"exceeds the seeds' spread (|mean| {abs(d_mean):.2f} > std {d_std:.2f} of the paired differences)"
                  if abs(d_mean) > d_std else
                  f"does NOT exceed the seeds' spread (|mean| {abs(d_mean):.2f} <= std {d_std:.2f} of the paired differences)")
        verdict = (f"LIMe − baseline exact match: {d_mean:+.2f} ± {d_std:.2f} points over {len(seeds)} seeds; "
                   f"the difference {spread}; LIMe higher in {wins} of {len(seeds)} seeds, "
                   f"equal in {sum(d == 0 for d in em_diffs)}.")
    lens = sorted(results["baseline"][0]["exact_match_by_len"])
    by_len_rows = [{"length": n, **{f"{v} exact match (%)": round(100 * mean_std(r["exact_match_by_len"][n] for r in results[v])[0], 2)
                                    for v in VARIANTS}} for n in lens]
    table = run.write_results(
        rows, f"BART {args.layers}+{args.layers} layers from scratch, {args.task} digit strings, baseline vs LIMe",
        f"Exact match: greedy generate (use_cache=True) on all {len(test)} test examples; token accuracy: teacher forced, "
        f"over target digits and eos. {args.max_steps} steps x {args.batch_size} examples per seed; seeds {seeds}. "
        f"\n\n{verdict}\n\nLIMe routers per stack: "
        + "; ".join(f"`{name}` layers {s['router_layers']}" for name, s in results["lime"][0]["stacks"].items())
        + f"\n\nExact match by source length (mean over seeds):\n\n{markdown_table(by_len_rows)}")
    plot_curves(run.out / "loss_curves.png", results, args)

    summary = {v: {"exact_match_mean": mean_std(r["exact_match"] for r in results[v])[0],
                   "exact_match_std": mean_std(r["exact_match"] for r in results[v])[1],
                   "token_accuracy_mean": mean_std(r["token_accuracy"] for r in results[v])[0],
                   "token_accuracy_std": mean_std(r["token_accuracy"] for r in results[v])[1]} for v in VARIANTS}
    metrics = {"task": args.task, "seeds": seeds, "summary": summary, "runs": results,
               "exact_match_diff_points": em_diffs, "token_accuracy_diff_points": tok_diffs,
               "exact_match_diff_mean": d_mean, "exact_match_diff_std": d_std, "verdict": verdict,
               "lime_sites": architecture}
    return run.finish(metrics, table, verdict)


if __name__ == "__main__":
    main()
