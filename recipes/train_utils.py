"""How every recipe runs: setting up a run (flags, device, seeds, run directory, config and result
files), the one training loop (`train_steps`), evaluation, statistics over seeds and plots, and
the skeleton of a from-scratch comparison of variants (RecipeRun, train_variant; the variants are
the baseline, LIMe with learned routers and the fixed uniform-averaging control).

What the recipes train on (models, corpora, images) lives in `recipes.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import limeify
from limeify.analysis import plot_router_heatmap, router_heatmap

# ----------------------------------------------------------------------------- run setup and files


def resolve_device(arg: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(arg)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {arg!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def run_dir(recipe: str, root: str | Path = "runs") -> Path:
    """Create and return a fresh runs/<recipe>/<YYYYmmdd-HHMMSS>/ directory."""
    base = Path(root) / recipe / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    # Two runs started in the same second must not share (and overwrite) a directory.
    while path.exists():
        path = base.with_name(f"{base.name}-{n}")
        n += 1
    path.mkdir(parents=True)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """Write obj as indented JSON; non-JSON values (Paths, dtypes, devices) become strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    # A literal pipe would split the cell.
    return text.replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    """Rows as the text of a Markdown table, columns in first-seen key order."""
    if not rows:
        raise ValueError("a Markdown table needs at least one row")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def write_markdown_table(rows: list[dict], path: str | Path) -> str:
    """Write markdown_table(rows) to path and return its text."""
    text = markdown_table(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The from-scratch variants: the plain model, LIMe with learned routers (the paper's init), and
# the uniform-averaging control (the same routers fixed to the mean of all earlier layers' K/V).
VARIANTS = ("baseline", "lime")
VARIANT_COLORS = {"baseline": "tab:blue", "lime": "tab:orange", "uniform": "tab:green"}


def add_run_args(parser: argparse.ArgumentParser, seed_help: str = "random seed (data order, init)") -> None:
    """Flags every recipe has: --device, --seed, --out-root, --smoke."""
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'. "
                             "On CUDA the forward/backward runs under bf16 autocast (weights stay fp32).")
    parser.add_argument("--seed", type=int, default=0, help=seed_help + " (default: %(default)s)")
    parser.add_argument("--out-root", default="runs",
                        help="outputs go to <out-root>/<recipe>/<timestamp>/ (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="a handful of steps on a tiny slice, to check the recipe end to end (~1 min)")


def recipe_parser(doc: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """Parser of a baseline-vs-LIMe recipe: the docstring's first paragraph, usage examples, the run flags."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + "\n".join("  " + e for e in examples))
    add_run_args(p, seed_help="first seed; each seed fixes init, router init and data order")
    return p


def add_optimizer_args(parser: argparse.ArgumentParser, lr: float, lr_help: str = "peak lr of the base weights") -> None:
    """--lr, --router-lr, --weight-decay, --warmup, --grad-clip; the router lr and decay are the paper's."""
    parser.add_argument("--lr", type=float, default=lr, help=lr_help + " (default: %(default)s)")
    parser.add_argument("--router-lr", type=float, default=1e-2, help="peak lr of LIMe's routers (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW weight decay of base weight matrices; norms and routers get none (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (default: %(default)s)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default: %(default)s)")


class Timer:
    """Wall-clock and process CPU seconds since creation (CPU/wall ~ cores kept busy)."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = self._cpu()

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return self._cpu() - self.cpu0

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 2)}


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU runs stay in fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def env_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@torch.no_grad()
def lm_eval_loss(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats/token) over all tokens of `chunks` [N, T]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, chunks.shape[0], batch_size):
        ids = chunks[i : i + batch_size].to(device)
        with autocast(device):
            logits = model(input_ids=ids).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, router_lr: float | None = None) -> list[dict]:
    """AdamW groups as in the LIMe paper: weight matrices lr/weight_decay, 1-D params (norms,
    biases) no decay, and, when `router_lr` is given (limeified model), the routers at
    `router_lr` with no decay. Each group remembers its peak lr as "peak_lr" for schedules."""
    groups, router_ids = [], set()
    if router_lr is not None:
        groups = limeify.router_param_groups(model, router_lr=router_lr, router_weight_decay=0.0)
        router_ids = {id(p) for g in groups for p in g["params"]}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in router_ids:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay},
               {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    for g in groups:
        g["peak_lr"] = g["lr"]
    return groups


def lr_factor(step: int, total: int, warmup: float, floor: float = 0.1) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then cosine decay to `floor`."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (bias-corrected), to draw readable noisy loss curves."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(values: Iterable[float], digits: int = 4) -> str:
    values = list(values)
    mean, std = mean_std(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_difference(label: str, diffs: Sequence[float], unit: str, better: str) -> dict[str, Any]:
    """Mean and sample std of per-seed paired differences, with a verdict line saying whether the
    mean exceeds the spread (|mean| > std). `better` says which sign favours the first named method
    ("negative" or "positive")."""
    diffs = [float(d) for d in diffs]
    mean, std = mean_std(diffs)
    favours = sum((d < 0) if better == "negative" else (d > 0) for d in diffs)
    if len(diffs) < 2:
        verdict = f"{label}: {mean:+.2f}{unit} on one seed (no spread: run --seeds 3 before concluding)."
    else:
        beyond = "exceeds" if abs(mean) > std else "does NOT exceed"
        verdict = (f"{label}: {mean:+.2f} ± {std:.2f}{unit} over {len(diffs)} seeds, {beyond} the spread "
                   f"({better} = better; better in {favours} of {len(diffs)} seeds).")
    return {"diffs": diffs, "mean": mean, "std": std, "better_in": favours, "n": len(diffs),
            "exceeds_spread": len(diffs) > 1 and abs(mean) > std, "verdict": verdict}


def plot_panels(path: str | Path, panels: list[dict], suptitle: str = "") -> Path:
    """One PNG with side-by-side panels.

    Each panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, optional
    "styles": {label: dict of matplotlib kwargs}, optional "logy": bool}. A series whose ys is a
    list of runs (one list of values per seed) is drawn as its mean with a ±std band.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * len(panels), 4.2))
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global state
    for i, panel in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        styles = panel.get("styles", {})
        for label, (xs, ys) in panel["series"].items():
            xs, ys = list(xs), list(ys)
            if ys and isinstance(ys[0], (list, tuple)):  # one run per seed: mean and a ±std band
                stats = [mean_std(vals) for vals in zip(*ys)]
                means, stds = [m for m, _ in stats], [sd for _, sd in stats]
                line, = ax.plot(xs[: len(means)], means, label=f"{label} (mean of {len(ys)})" if len(ys) > 1 else label,
                                **styles.get(label, {}))
                if len(ys) > 1:
                    ax.fill_between(xs[: len(means)], [m - sd for m, sd in zip(means, stds)],
                                    [m + sd for m, sd in zip(means, stds)], color=line.get_color(), alpha=0.2, linewidth=0)
            else:
                ax.plot(xs, [float(y) for y in ys], label=label, **styles.get(label, {}))
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------- baseline vs LIMe from scratch


@dataclass
class TrainedVariant:
    """What train_variant returns: the model (in eval mode), its size, and its training curves."""

    model: torch.nn.Module
    params: int
    router_params: int
    losses: list[float]
    evals: list[tuple[int, float]]  # (step, evaluate(model))
    timer: Timer  # started just before the step-0 evaluation; the caller decides when to read it


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace, device: torch.device,
                step_loss: Callable[[int], torch.Tensor], steps: Iterable[int],
                after: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """The recipes' AdamW loop: warmup + cosine lr (groups carry ``peak_lr``), autocast, optional
    clipping; ``step_loss(step)`` gives the step's loss, ``after(step, losses)`` runs after each step."""
    for group in opt.param_groups:
        group.setdefault("peak_lr", group["lr"])
    losses: list[float] = []
    for step in steps:
        f = lr_factor(step, args.max_steps, args.warmup)
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * f
        with autocast(device):
            loss = step_loss(step)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if after is not None:
            after(step, losses)
    return losses


def uniform_matrix(layer: int, heads: int) -> torch.Tensor:
    """[G, (layer+1)G]: 1/(layer+1) on each source layer's identity block (head g reads head g of
    layers 0..layer equally)."""
    return torch.cat([torch.eye(heads) / (layer + 1)] * (layer + 1), dim=1)


def apply_variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Turn a freshly built model into a variant, in place: "baseline" leaves it as it is, "lime"
    limeifies it with the paper's from-scratch init, "uniform" does the same and then fixes every
    router to `uniform_matrix` and freezes it (the paper's control: reading earlier layers without
    learning how)."""
    if variant not in ("baseline", "lime", "uniform"):
        raise ValueError(f"unknown variant {variant!r}")
    if variant == "baseline":
        return model
    limeify.limeify(model, limeify.LimeConfig(init="paper"))
    if variant == "uniform":
        with torch.no_grad():
            for router in limeify.routers(model).values():
                w = router.mixing_matrix()
                w.copy_(uniform_matrix(router.layer, router.num_kv_heads).to(w))
                w.requires_grad_(False)
    return model


def train_variant(variant: str, seed: int, args: argparse.Namespace, device: torch.device,
                  build: Callable[[], torch.nn.Module], n_examples: int,
                  loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                  evaluate: Callable[[torch.nn.Module], float], metric: str,
                  betas: tuple[float, float] = (0.9, 0.999)) -> TrainedVariant:
    """Build one variant (see `apply_variant`) and train it for args.max_steps AdamW steps.

    `loss_fn(model, example_indices)` runs under autocast. `evaluate(model)` runs at step 0, every
    args.eval_every steps and after the last; `metric` names its value on the progress bar.
    """
    set_seed(seed)
    model = apply_variant(build(), variant)  # right after seeding: every variant of a seed has the same base init
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    router_params = sum(p.numel() for p in limeify.router_parameters(model)) if variant != "baseline" else 0
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay, args.router_lr if variant == "lime" else None),
                            betas=betas)
    g = torch.Generator().manual_seed(seed)  # data order: the same for every variant of a seed
    need = args.max_steps * args.batch_size
    order = torch.cat([torch.randperm(n_examples, generator=g) for _ in range(math.ceil(need / n_examples))])[:need]
    order = order.view(args.max_steps, args.batch_size)
    timer = Timer()
    evals = [(0, evaluate(model))]
    model.train()
    bar = tqdm(range(args.max_steps), desc=f"{variant} seed {seed}", dynamic_ncols=True)

    def after(step: int, losses: list[float]) -> None:
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            evals.append((step + 1, evaluate(model)))
            bar.set_postfix({"loss": f"{losses[-1]:.3f}", metric: f"{evals[-1][1]:.3f}"})

    losses = train_steps(model, opt, args, device, lambda step: loss_fn(model, order[step]), bar, after)
    model.eval()
    return TrainedVariant(model, params, router_params, losses, evals, timer)


def variant_row(name: str, runs: list[dict], metrics: dict[str, Any]) -> dict[str, Any]:
    """A results-table row for one variant over its seeds: size, seed count, `metrics`, mean train time."""
    return {"model": name, "params": f"{runs[0]['params']:,}", "router params": f"{runs[0]['router_params']:,}",
            "seeds": len(runs), **metrics,
            "train time / seed (s)": round(mean_std(r["train_time"]["wall_s"] for r in runs)[0], 1)}


class RecipeRun:
    """One invocation of a baseline-vs-LIMe recipe and its outputs in <out-root>/<recipe>/<timestamp>/."""

    def __init__(self, recipe: str, args: argparse.Namespace, seeds: Sequence[int], argv: Sequence[str] | None) -> None:
        self.total = Timer()
        self.recipe, self.args, self.seeds, self.argv = recipe, args, list(seeds), argv
        self.device = resolve_device(args.device)
        self.out = run_dir(recipe, args.out_root)
        print(f"[{recipe}] outputs -> {self.out}  (device {self.device}; seeds {self.seeds})")

    def write_config(self, **details: Any) -> None:
        write_json({"recipe": self.recipe, "args": vars(self.args), "env": env_info(self.device), **details},
                   self.out / "config.json")

    def train_variants(self, train_one: Callable[[str, int], tuple[dict, torch.nn.Module]], kv_heads: int,
                       router_title: str, variants: Sequence[str] = VARIANTS) -> dict[str, list[dict]]:
        """train_one(variant, seed) for every seed and variant. From the first seed it keeps the LIMe
        router heatmap, the routers (limeify.save_lime) and, unless --no-save, every model's weights."""
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for seed in self.seeds:
            for variant in variants:
                result, model = train_one(variant, seed)
                results[variant].append(result)
                if seed == self.seeds[0]:
                    self._save_first_seed(model, variant, seed, kv_heads, router_title)
                del model  # before the next variant is built: two models need not fit at once
        return results

    def _save_first_seed(self, model: torch.nn.Module, variant: str, seed: int, kv_heads: int, router_title: str) -> None:
        checkpoints = self.out / "checkpoints"
        if variant == "lime":
            weights = [w.detach().cpu() for w in limeify.router_parameters(model)]
            plot_router_heatmap(router_heatmap(weights, kv_heads), self.out / "router_heatmap.png",
                                layer_indices=list(limeify.routers(model)), title=f"{router_title}, seed {seed}")
            limeify.save_lime(model, checkpoints / "lime_routers")
        if not self.args.no_save:
            from safetensors.torch import save_model

            checkpoints.mkdir(exist_ok=True)
            save_model(model, str(checkpoints / f"{variant}_seed{seed}.safetensors"))

    def write_results(self, rows: list[dict], title: str, notes: str) -> str:
        """results.md: title, the table of `rows`, the command that reproduces the run, `notes`. Returns the table."""
        table = markdown_table(rows)
        cmd = f"python -m recipes.{self.recipe} " + " ".join(sys.argv[1:] if self.argv is None else self.argv)
        (self.out / "results.md").write_text(f"# {self.recipe}: {title}\n\n{table}\nCommand: `{cmd.strip()}`\n\n{notes}")
        return table

    def finish(self, metrics: dict[str, Any], table: str, verdict: str) -> dict[str, Any]:
        """Write metrics.json (plus the total time), print the summary and return {"out", "metrics"}."""
        metrics = {**metrics, "total_time": self.total.as_dict()}
        write_json(metrics, self.out / "metrics.json")
        print("\n" + table + "\n" + verdict)
        print(f"\nOutputs in {self.out}. Total {self.total.wall / 60:.1f} min wall, {self.total.cpu / 60:.1f} min CPU.")
        return {"out": str(self.out), "metrics": metrics}
