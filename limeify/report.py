"""`limeify analyze`: router heatmaps, entropy, probes and depthwise circuits of a model on a text."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from . import analysis
from .injection import is_limeified, lime_state, limeify, routers, unlimeify
from .errors import LimeError
from .routers import DynamicRouter, identity_block
from .sites import stacks_of

DEFAULT_PROBE_WORDS = ("is", "are", "was", "were")


def _chunks(tokenizer, text: str, seq_len: int, max_chunks: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = min(max_chunks, max(1, ids.numel() // seq_len))
    ids = ids[: n * seq_len]
    return ids.view(n, -1)


def _word_groups(tokenizer, words) -> dict[str, list[int]]:
    groups = {}
    for word in words:
        ids = {t[0] for t in (tokenizer.encode(v, add_special_tokens=False) for v in (word, " " + word)) if len(t) == 1}
        if ids:
            groups[word] = sorted(ids)
    return groups


def _hidden_states(model: nn.Module, chunks: torch.Tensor, progress) -> list[torch.Tensor]:
    per_layer = None
    with torch.no_grad():
        for row in progress(chunks, desc="forward"):
            out = model(row[None], output_hidden_states=True)
            states = [h[0].float().cpu() for h in out.hidden_states]
            per_layer = [[s] for s in states] if per_layer is None else [p + [s] for p, s in zip(per_layer, states)]
    return [torch.stack(p) for p in per_layer]


def _dynamic_inputs(model: nn.Module, chunks: torch.Tensor) -> dict[int, torch.Tensor]:
    """Inputs each dynamic router saw (its K call), concatenated over chunks: ``{layer: [N, D]}``."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer, router in routers(model).items():
        def grab(mod, args, layer=layer):
            if args[2] == "k":
                seen.setdefault(layer, []).append(args[3].reshape(-1, args[3].shape[-1]).detach())
        handles.append(router.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for row in chunks:
                model(row[None])
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(xs) for layer, xs in seen.items()}


def analyze(
    model: nn.Module,
    tokenizer,
    text: str,
    out_dir: str | Path,
    seq_len: int = 128,
    max_chunks: int = 8,
    probe_words=DEFAULT_PROBE_WORDS,
    top_k: int = 5,
    progress=None,
) -> dict:
    """Write the analysis report for a limeified ``model`` (vs its base) to ``out_dir``; returns the summary."""
    from tqdm.auto import tqdm

    progress = progress or (lambda it, desc: tqdm(it, desc=desc))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = not is_limeified(model)
    if ours:
        limeify(model)
    model.eval()
    state = lime_state(model)
    stacks = stacks_of(state.sites)
    if len(stacks) > 1:
        if ours:
            unlimeify(model)
        raise LimeError(
            f"analyze reads a language model's hidden states on text, but this model has {len(stacks)} "
            f"stacks ({', '.join(stacks)}); analyze its language model alone (e.g. limeify it separately)"
        )
    base = unlimeify(copy.deepcopy(model))
    chunks = _chunks(tokenizer, text, seq_len, max_chunks).to(next(model.parameters()).device)

    lime_h = _hidden_states(model, chunks, progress)
    base_h = _hidden_states(base, chunks, progress)
    ent = {"base": analysis.layerwise_renyi_entropy(base_h), "limeified": analysis.layerwise_renyi_entropy(lime_h)}
    analysis.plot_lines(ent, out / "entropy.png", ylabel="matrix Renyi entropy (alpha=0.5)", title="Representation entropy per layer")

    groups = _word_groups(tokenizer, probe_words)
    probe = None
    ids = chunks.cpu()
    counts = {g: int(torch.isin(ids, torch.tensor(v)).sum()) for g, v in groups.items()}
    if sum(1 for n in counts.values() if n) >= 2:
        probe = {name: analysis.layerwise_probe(hs, ids, groups) for name, hs in (("base", base_h), ("limeified", lime_h))}
        analysis.plot_lines(probe, out / "probe.png", ylabel="probe accuracy", title=f"Separability of {'/'.join(groups)}")

    rts = routers(model)
    dynamic = {layer: r for layer, r in rts.items() if isinstance(r, DynamicRouter)}
    inputs = _dynamic_inputs(model, chunks) if dynamic else {}
    weights = [r.mixing_matrix(inputs[layer]) if layer in dynamic else r.mixing_matrix() for layer, r in rts.items()]
    g = state.sites[0].num_kv_heads
    heat = analysis.router_heatmap(weights, g)
    analysis.plot_router_heatmap(heat, out / "router_heatmap.png", layer_indices=list(rts))
    notes = []
    if all(torch.equal(w.detach().cpu(), identity_block(r.layer, g, dtype=w.dtype)) for w, r in zip(weights, rts.values())):
        notes.append("every router is at identity (untrained): the limeified model computes what the base "
                     "model does, so base and limeified columns agree by construction")
    if probe is not None:
        notes.append(f"the probe rests on {sum(counts.values())} tokens "
                     f"({', '.join(f'{w}: {n}' for w, n in counts.items())}); with few tokens per word its "
                     "accuracy moves by whole percents from one token")

    circuits_md = ""
    if dynamic:
        tokens = [tokenizer.decode([t]) for t in ids.flatten().tolist()]
        n_src = max(rts) + 1
        scores = torch.full((len(tokens), len(dynamic), n_src, g), float("nan"))
        for i, (layer, r) in enumerate(dynamic.items()):
            with torch.no_grad():
                w = r.token_weights(inputs[layer]).float().cpu()
            scores[:, i, : layer + 1, :] = w.transpose(1, 2)
        spread = scores.nan_to_num(0.0).amax(0) - scores.nan_to_num(0.0).amin(0)
        if float(spread.max()) < 1e-6:
            notes.append("every token gets the same routing weights (ties everywhere, e.g. untrained dynamic "
                         "routers), so there are no depthwise circuits to list; circuits.md is not written")
        else:
            hits = analysis.top_tokens(scores, tokens, k=top_k, layer_indices=list(dynamic))
            circuits_md = analysis.circuits_report_markdown(hits)
            (out / "circuits.md").write_text(circuits_md)
    for note in notes:
        warnings.warn(f"limeify analyze: {note}", stacklevel=2)

    summary = {
        "mechanism": state.config.mechanism,
        "layers": len(state.sites),
        "tokens": int(ids.numel()),
        "mean_entropy_base": sum(ent["base"]) / len(ent["base"]),
        "mean_entropy_limeified": sum(ent["limeified"]) / len(ent["limeified"]),
        "mean_probe_base": None if probe is None else sum(probe["base"]) / len(probe["base"]),
        "mean_probe_limeified": None if probe is None else sum(probe["limeified"]) / len(probe["limeified"]),
        "probe_tokens": counts,
        "notes": notes,
    }
    (out / "analysis.json").write_text(json.dumps({"summary": summary, "entropy": ent, "probe": probe,
                                                   "heatmap": heat.tolist()}, indent=2))
    (out / "report.md").write_text(_markdown(summary, ent, probe, groups, bool(circuits_md)))
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _markdown(summary: dict, ent: dict, probe: dict | None, groups: dict, circuits: bool) -> str:
    lines = ["# LIMe analysis", "", "| | base | limeified |", "|---|---|---|",
             f"| mean matrix entropy (alpha 0.5) | {_fmt(summary['mean_entropy_base'])} | {_fmt(summary['mean_entropy_limeified'])} |",
             f"| mean probe accuracy ({'/'.join(groups) or 'none found'}) | {_fmt(summary['mean_probe_base'])} | {_fmt(summary['mean_probe_limeified'])} |",
             "", f"Mechanism `{summary['mechanism']}`, {summary['layers']} attention layers, {summary['tokens']} tokens.",
             *[f"\n> **Note:** {note}." for note in summary["notes"]],
             "", "![router heatmap](router_heatmap.png)", "", "## Entropy per hidden-state layer", "",
             "| layer | base | limeified |", "|---|---|---|"]
    lines += [f"| {i} | {_fmt(b)} | {_fmt(l)} |" for i, (b, l) in enumerate(zip(ent["base"], ent["limeified"]))]
    lines += ["", "![entropy](entropy.png)"]
    if probe is not None:
        lines += ["", "## Probe accuracy per layer", "", "| layer | base | limeified |", "|---|---|---|"]
        lines += [f"| {i} | {_fmt(b)} | {_fmt(l)} |" for i, (b, l) in enumerate(zip(probe["base"], probe["limeified"]))]
        lines += ["", "![probe](probe.png)"]
    if circuits:
        lines += ["", "Depthwise circuits (top tokens per layer, source depth and head): [circuits.md](circuits.md)"]
    return "\n".join(lines) + "\n"
