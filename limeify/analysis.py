"""Analysis tools for LIMe models: representation entropy, linear probes, router
heatmaps, depthwise circuits and plots.

Every function works on plain tensors, so it applies to any model (limeified or not)
whose hidden states or router weights the caller has collected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "renyi_entropy",
    "layerwise_renyi_entropy",
    "router_heatmap",
    "plot_router_heatmap",
    "probe_separability",
    "layerwise_probe",
    "TopToken",
    "top_tokens",
    "circuits_report_markdown",
    "plot_lines",
]


# ----------------------------------------------------------------------------- entropy


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardize each column of x [T, D] over rows; constant columns become 0."""
    centered = x - x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, correction=0, keepdim=True)
    # A constant column's mean can differ from its entries by a rounding error, which
    # would give a tiny std and blow the noise up to unit scale: treat it as constant.
    scale = x.abs().amax(dim=0, keepdim=True)
    constant = std <= 1e-10 * scale
    return torch.where(constant, torch.zeros_like(centered), centered / torch.where(constant, 1.0, std))


def renyi_entropy(features: torch.Tensor, alpha: float = 0.5) -> float:
    """Matrix-based Renyi entropy of one sequence's token features [T, D].

    Features are z-scored over tokens, K = Z Z^T, p = eig(K) / trace(K), and the entropy
    is log(sum p^alpha) / (1 - alpha) (Shannon entropy for alpha = 1). Higher values mean
    less representation collapse. Fully constant features give 0.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [T, D], got shape {tuple(features.shape)}")
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    z = _zscore(features.detach().to(torch.float64))
    # Z Z^T and Z^T Z share their nonzero eigenvalues; decompose the smaller one.
    gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    total = eig.sum()
    if total <= 0:
        return 0.0
    p = eig / total
    if alpha == 1:
        p = p[p > 0]
        return float(-(p * p.log()).sum())
    return float(torch.log((p[p > 0] ** alpha).sum()) / (1.0 - alpha))


def layerwise_renyi_entropy(
    hidden_states: Sequence[torch.Tensor],
    alpha: float = 0.5,
    attention_mask: torch.Tensor | None = None,
) -> list[float]:
    """Per layer, the mean over batch items of `renyi_entropy` of each [T, D] sequence.

    hidden_states: one [B, T, D] tensor per layer; attention_mask: [B, T], nonzero for
    real tokens (padding is excluded).
    """
    out = []
    for hs in hidden_states:
        values = []
        for b in range(hs.shape[0]):
            seq = hs[b] if attention_mask is None else hs[b][attention_mask[b].bool()]
            values.append(renyi_entropy(seq, alpha))
        out.append(sum(values) / len(values))
    return out


# ----------------------------------------------------------------------------- routers


def router_heatmap(
    weights: Sequence[torch.Tensor], num_kv_heads: int, per_source: bool = False
) -> torch.Tensor:
    """[n_layers, max_sources] matrix of mean |w| per source layer, rows summing to 1.

    weights: routers in layer order. By default (cross-head routers) weights[i] of a layer
    l has shape [G, (l+1)*G], column j*G + g' reading KV head g' of source layer j. With
    per_source=True each router has shape [heads, l+1], one weight per source layer (the
    per-layer softmax form); the shape is not guessed because e.g. [2, 4] fits both forms.
    Entries for sources a layer cannot read are NaN.
    """
    g = num_kv_heads
    rows = []
    for i, w in enumerate(weights):
        w = w.detach().abs().to(torch.float64)
        if per_source:
            if w.dim() != 2:
                raise ValueError(f"router {i}: expected [heads, sources], got {tuple(w.shape)}")
            per_src = w.mean(dim=0)
        else:
            if w.dim() != 2 or w.shape[0] != g or w.shape[1] % g:
                raise ValueError(f"router {i}: expected [{g}, (l+1)*{g}], got {tuple(w.shape)}")
            per_src = w.reshape(g, w.shape[1] // g, g).mean(dim=(0, 2))
        # An all-zero router (e.g. untrained) yields a zero row rather than NaNs.
        rows.append(per_src / per_src.sum().clamp_min(torch.finfo(torch.float64).tiny))
    width = max(r.numel() for r in rows)
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def plot_router_heatmap(
    matrix: torch.Tensor,
    path: str | Path,
    layer_indices: Sequence[int] | None = None,
    title: str = "Router weight per source layer",
) -> None:
    """Write `matrix` (from `router_heatmap`) as a PNG heatmap; NaN cells are left blank.

    layer_indices labels the rows with real layer numbers (default 0..n_layers-1).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = matrix.detach().cpu().to(torch.float64).numpy()
    n_rows, n_cols = data.shape
    fig = Figure(figsize=(max(4.0, 1.5 + 0.35 * n_cols), max(3.0, 1.2 + 0.3 * n_rows)))
    FigureCanvasAgg(fig)  # draw with Agg without touching pyplot's global backend
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("source layer")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(list(layer_indices) if layer_indices is not None else range(n_rows))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- probes


def probe_separability(
    features: torch.Tensor,
    labels: torch.Tensor,
    folds: int = 5,
    seed: int = 0,
    steps: int = 200,
    l2: float = 1e-3,
) -> float:
    """K-fold cross-validated accuracy of a multinomial logistic-regression probe.

    features [N, D], labels [N] (any integers). Each fold standardizes with its training
    statistics and fits by full-batch LBFGS (up to `steps` iterations, L2 penalty `l2`).
    Returns correct predictions over all held-out folds divided by N.
    """
    n = features.shape[0]
    if not 2 <= folds <= n:
        raise ValueError(f"need 2 <= folds <= N, got folds={folds}, N={n}")
    x_all = features.detach().reshape(n, -1).to(torch.float64).cpu()
    classes, y_all = torch.unique(labels.detach().cpu(), return_inverse=True)
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
    correct = 0
    for f in range(folds):
        train, test = fold_of != f, fold_of == f
        mean = x_all[train].mean(0)
        std = x_all[train].std(0, correction=0)
        std = torch.where(std > 0, std, 1.0)
        x_tr, x_te = (x_all[train] - mean) / std, (x_all[test] - mean) / std
        w = torch.zeros(x_all.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x_tr @ w + b, y_all[train]) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)  # LBFGS runs the closure with grad enabled, even under no_grad
        with torch.no_grad():
            correct += int(((x_te @ w + b).argmax(1) == y_all[test]).sum())
    return correct / n


def layerwise_probe(
    hidden_states: Sequence[torch.Tensor],
    token_ids: torch.Tensor,
    groups: dict[str, list[int]],
    attention_mask: torch.Tensor | None = None,
    folds: int = 5,
    seed: int = 0,
) -> list[float]:
    """Per-layer probe accuracy at telling token groups apart (e.g. is/are/was/were).

    hidden_states: one [B, T, D] tensor per layer; token_ids [B, T]; groups maps a label
    to the token ids of that class (class order = dict order). Tokens in no group, and
    padding where attention_mask [B, T] is 0, are ignored.
    """
    labels = torch.full(token_ids.shape, -1, dtype=torch.long)
    for cls, ids in enumerate(groups.values()):
        hit = torch.isin(token_ids.cpu(), torch.as_tensor(ids, dtype=token_ids.dtype))
        if (labels[hit] >= 0).any():
            raise ValueError("a token id appears in more than one group")
        labels[hit] = cls
    keep = labels >= 0
    if attention_mask is not None:
        keep &= attention_mask.cpu().bool()
    if labels[keep].unique().numel() < 2:
        raise ValueError("need tokens from at least two groups")
    return [probe_separability(hs.cpu()[keep], labels[keep], folds, seed) for hs in hidden_states]


# ----------------------------------------------------------------------------- circuits


@dataclass
class TopToken:
    """One high-scoring token: its position, text, score and surrounding tokens."""

    position: int
    token: str
    score: float
    left: str
    right: str


def top_tokens(
    scores: torch.Tensor,
    tokens: Sequence[str],
    k: int = 5,
    context: int = 5,
    layer_indices: Sequence[int] | None = None,
) -> dict[tuple[int, int, int], list[TopToken]]:
    """Depthwise circuits: the k tokens that weight each source depth the most.

    scores [N_tokens, n_layers, n_sources, n_heads]: routing weight of each token, for
    each layer, source layer and head (e.g. dynamic router softmax outputs); NaN marks
    sources a layer cannot read, which are skipped. tokens: the N_tokens decoded strings
    (with their own whitespace, joined with "" for context), treated as one stream, so
    flattened batches should be separated by the caller. Returns, keyed by (layer,
    source, head) with layer from layer_indices (default 0..n_layers-1), up to k hits
    in descending score with `context` tokens either side.
    """
    if scores.dim() != 4 or scores.shape[0] != len(tokens):
        raise ValueError(f"scores must be [len(tokens), layers, sources, heads], got {tuple(scores.shape)}")
    n, n_layers, n_sources, n_heads = scores.shape
    layer_ids = list(layer_indices) if layer_indices is not None else list(range(n_layers))
    flat = scores.detach().to(torch.float64).cpu().reshape(n, -1)
    vals, pos = flat.nan_to_num(nan=-math.inf).topk(min(k, n), dim=0)
    out: dict[tuple[int, int, int], list[TopToken]] = {}
    for col in range(flat.shape[1]):
        li, rest = divmod(col, n_sources * n_heads)
        src, head = divmod(rest, n_heads)
        hits = [
            TopToken(p, tokens[p], v, "".join(tokens[max(0, p - context) : p]), "".join(tokens[p + 1 : p + 1 + context]))
            for v, p in zip(vals[:, col].tolist(), pos[:, col].tolist())
            if v != -math.inf
        ]
        if hits:
            out[(layer_ids[li], src, head)] = hits
    return out


def _md(text: str) -> str:
    """Make arbitrary token text safe inside a markdown table cell."""
    for ch in "\\|`*_<>[]":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", "⏎").replace("\r", "")


def circuits_report_markdown(
    hits: dict[tuple[int, int, int], list[TopToken]],
    title: str = "Depthwise circuits",
    summary_rows: int = 20,
) -> str:
    """Render `top_tokens` output as markdown: a summary table of the strongest
    (layer, source, head) routes, then one table of top tokens with context per route.
    """
    lines = [f"# {title}", ""]
    strongest = sorted(hits.items(), key=lambda kv: kv[1][0].score, reverse=True)[:summary_rows]
    lines += [
        f"{len(hits)} (layer, source, head) routes; the {len(strongest)} with the highest top score:",
        "",
        "| layer | source | head | top score | top token |",
        "|---:|---:|---:|---:|---|",
    ]
    for (layer, src, head), hs in strongest:
        lines.append(f"| {layer} | {src} | {head} | {hs[0].score:.4g} | {_md(repr(hs[0].token))} |")
    for (layer, src, head), hs in sorted(hits.items()):
        lines += ["", f"## Layer {layer} ← source {src}, head {head}", ""]
        lines += ["| rank | score | token | context |", "|---:|---:|---|---|"]
        for rank, h in enumerate(hs, 1):
            ctx = f"{_md(h.left)}⟦{_md(h.token)}⟧{_md(h.right)}"
            lines.append(f"| {rank} | {h.score:.4g} | {_md(repr(h.token))} | {ctx} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def plot_lines(
    series: dict[str, Sequence[float]],
    path: str | Path,
    xlabel: str = "layer",
    ylabel: str = "",
    title: str = "",
) -> None:
    """Write a PNG line plot with one line per series, x = 0..len-1 (series may differ
    in length); for entropy or probe accuracy per layer, loss curves, etc."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)  # draw with Agg without touching pyplot's global backend
    ax = fig.add_subplot()
    for name, ys in series.items():
        ys = [float(y) for y in ys]
        ax.plot(range(len(ys)), ys, marker="o" if len(ys) <= 50 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
