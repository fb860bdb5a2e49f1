#!/usr/bin/env python
"""Benchmark limeify against the base model and a naive LIMe reference (issue 6).

Three variants of the same randomly initialised model are compared, interleaved round by
round so that drift in a shared machine's load hits all of them alike:

* ``base``   the transformers model as built from its config;
* ``limeify`` ``limeify.limeify(copy of base)``: one token-major buffer of all layers' raw K (and V)
  per forward, one batched matmul per layer, backward keeps each layer's raw K/V once (O(L) memory);
* ``naive``  the official LIMe approach, written here as forward hooks on the base model's
  K/V projections: a Python list of every layer's raw K/V, and per layer ``torch.cat`` of all
  earlier ones followed by a matmul with the router (O(L^2) memory).

Reported: forward latency (no grad) and forward+backward latency (full training step, every
parameter trainable) as medians after warm-up, greedy decode tokens/s with the KV cache
(batch 1 and 8), bytes of activations saved for backward (``saved_tensors_hooks``,
deduplicated by storage, parameters excluded) at several depths, peak CUDA memory on GPU,
parameters added, and ``torch.compile`` of a limeified model (runs? matches eager? speed
vs compiled base). Ratios are paired per round (``limeify time / base time`` of the same
round) and summarised as median [min-max], so the spread shows the timing noise.

Examples::

    python benchmarks/bench.py --quick                    # seconds, tiny shapes
    python benchmarks/bench.py                            # full run (~10 min on 2 CPU cores)
    python benchmarks/bench.py --batch 4 --seq 256        # the issue's CPU shape (slow on 2 cores)
    python benchmarks/bench.py --profile llama            # torch.profiler tables, base vs limeify
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import limeify  # noqa: E402
from limeify import LimeConfig  # noqa: E402
from limeify import ValueCache, record  # noqa: E402

VARIANTS = ("base", "limeify", "naive")
MIX_ONLY = "mixing alone"


# --------------------------------------------------------------------------------------------
# Saved-activation accounting
# --------------------------------------------------------------------------------------------


class SavedBytes:
    """Counts bytes that autograd saves for backward, deduplicated by storage.

    Use as a context manager around a forward pass. Every tensor autograd packs is reduced to
    its untyped storage; a storage is counted once, with its full ``nbytes()`` (a saved view
    keeps its whole storage alive), however many saved tensors alias it. Storages whose data
    pointer is in ``exclude`` (e.g. the model's parameters) are not counted. The storages seen
    are kept referenced until the counter is dropped, so a freed pointer cannot be reused by a
    different storage and be mistaken for an alias.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = set(exclude or ())
        self.seen: dict[int, torch.UntypedStorage] = {}
        self.bytes = 0
        self.tensors = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen[ptr] = storage
            self.bytes += storage.nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedBytes":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def parameter_pointers(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def saved_bytes(fn: Callable[[], object], exclude: set[int] | None = None) -> int:
    """Bytes saved for backward by ``fn()`` (see :class:`SavedBytes`); keeps the graph alive
    only while counting."""
    with SavedBytes(exclude) as counter:
        out = fn()
    del out
    return counter.bytes


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class Arch:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        kind = "MHA" if self.kv_heads == self.heads else "GQA"
        return (f"{self.name}: {self.layers} layers, hidden {self.hidden}, {self.heads} heads, "
                f"{self.kv_heads} KV heads ({kind}), vocab {self.vocab}")

    def with_(self, **kw) -> "Arch":
        return Arch(**{**self.__dict__, **kw})


def make_archs(args) -> dict[str, Arch]:
    if args.quick:
        return {
            "gpt2": Arch("gpt2", 3, 64, 4, 4, 256),
            "llama-gqa": Arch("llama-gqa", 4, 64, 4, 2, 256, 128),
        }
    return {
        "gpt2": Arch("gpt2", 12, 768, 12, 12, args.vocab),
        "llama-gqa": Arch("llama-gqa", 16, 1024, 16, 4, args.vocab, 2816),
    }


def build_base(arch: Arch, layers: int | None, device, dtype, seq: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    layers = layers or arch.layers
    if arch.name.startswith("gpt2"):
        cfg = GPT2Config(n_layer=layers, n_embd=arch.hidden, n_head=arch.heads, vocab_size=arch.vocab,
                         n_positions=max(1024, seq), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    else:
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=arch.hidden, num_attention_heads=arch.heads,
                          num_key_value_heads=arch.kv_heads, intermediate_size=arch.intermediate,
                          vocab_size=arch.vocab, max_position_embeddings=max(2048, seq),
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).to(device=device, dtype=dtype)
    return model.eval()  # dropout is 0 anyway; eval() only keeps outputs deterministic


class NaiveLime:
    """The official LIMe approach as forward hooks on the base model's K/V projections.

    A Python list per role keeps every layer's raw K/V of the current forward. Layer ``l``
    (with a router) concatenates the ``l + 1`` lists entries along the head axis and applies
    its ``[G, (l+1)G]`` router with one einsum. The concatenation is a new tensor per layer and
    the einsum saves it for the router's gradient, so saved activations grow as O(L^2).
    """

    def __init__(self, model: nn.Module, sites, weights: dict[int, torch.Tensor]) -> None:
        self.raw: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
        self.params = nn.ParameterDict({str(l): nn.Parameter(w.detach().clone()) for l, w in weights.items()})
        model.add_module("naive_lime_routers", self.params)
        self.handles = [model.register_forward_pre_hook(self._reset)]
        by_module: dict[str, list] = {}
        for site in sites:
            for role, src in (("k", site.key), ("v", site.value)):
                by_module.setdefault(src.module, []).append((role, site.layer, src.start, src.end, site.num_kv_heads))
        for path, entries in by_module.items():
            self.handles.append(model.get_submodule(path).register_forward_hook(self._hook(entries)))

    def _reset(self, *_):
        self.raw = {"k": [], "v": []}

    def _mix(self, role: str, layer: int, raw: torch.Tensor, heads: int) -> torch.Tensor:
        sources = self.raw[role]
        del sources[layer:]
        sources.append(raw)
        key = str(layer)
        if key not in self.params:
            return raw
        lead, d = raw.shape[:-1], raw.shape[-1] // heads
        stacked = torch.cat([r.view(*lead, heads, d) for r in sources], dim=-2)  # [..., (l+1)G, d]
        weight = self.params[key].to(raw.dtype)
        return torch.einsum("gs,...sd->...gd", weight, stacked).reshape(raw.shape)

    def _hook(self, entries):
        def hook(mod, args, out):
            if len(entries) == 1 and entries[0][2] is None:
                role, layer, _, _, heads = entries[0]
                return self._mix(role, layer, out, heads)
            pieces, pos = [], 0
            for role, layer, start, end, heads in sorted(entries, key=lambda e: e[2]):
                if start > pos:
                    pieces.append(out[..., pos:start])
                pieces.append(self._mix(role, layer, out[..., start:end], heads))
                pos = end
            if pos < out.shape[-1]:
                pieces.append(out[..., pos:])
            return torch.cat(pieces, dim=-1)

        return hook


_SITE_TEMPLATES: dict[tuple, object] = {}


def sites_for(arch: Arch, layers: int, device, dtype):
    """Attention sites of an ``layers``-deep model of ``arch``.

    ``limeify.discover_sites`` traces the model (seconds per call, more with depth), so it is
    run once per architecture on a 2-layer model; deeper models repeat layer 1's site with
    the layer index substituted in the module paths (the HF models here name layer ``i``'s
    modules ``....{i}....``).
    """
    key = (arch.name, arch.hidden, arch.heads, arch.kv_heads)
    if key not in _SITE_TEMPLATES:
        _SITE_TEMPLATES[key] = limeify.discover_sites(build_base(arch, 2, device, dtype, 16))
    two = _SITE_TEMPLATES[key]
    t = two[1]

    def at(path: str, i: int) -> str:
        assert ".1." in path, path
        return path.replace(".1.", f".{i}.", 1)

    sites = [two[0]]
    for i in range(1, layers):
        sites.append(dataclasses.replace(
            t, layer=i, depth=i, attention=at(t.attention, i),
            key=dataclasses.replace(t.key, module=at(t.key.module, i)),
            value=dataclasses.replace(t.value, module=at(t.value.module, i))))
    return sites[:layers]


def build_variants(arch: Arch, layers: int | None, device, dtype, seq: int) -> dict[str, nn.Module]:
    """base, limeify (paper init, so routers are non-trivial) and naive with the same routers."""
    base = build_base(arch, layers, device, dtype, seq)
    lime = copy.deepcopy(base)
    sites = sites_for(arch, layers or arch.layers, device, dtype)
    limeify.limeify(lime, LimeConfig(init="paper", sites=sites))
    weights = dict(zip(limeify.routers(lime), limeify.router_parameters(lime)))
    naive = copy.deepcopy(base)
    NaiveLime(naive, limeify.attention_sites(lime), weights)
    return {"base": base, "limeify": lime, "naive": naive}


def added_parameters(models: dict[str, nn.Module]) -> dict[str, int]:
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    return {k: n[k] - n["base"] for k in n}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rounds(fns: dict[str, Callable[[], float | None]], warmup: int, repeats: int, device) -> dict[str, list[float]]:
    """Run every fn once per round, rotating the order each round. A fn may return its own
    measured seconds (decode times only its decode steps); otherwise it is timed whole."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            own = fns[name]()
            sync(device)
            elapsed = time.perf_counter() - t0 if own is None else own
            if r >= warmup:
                times[name].append(elapsed)
    return times


@dataclass
class Stat:
    median: float
    ratio: float | None = None  # median over rounds of variant/base, for "time" stats
    lo: float | None = None
    hi: float | None = None
    extra: dict = field(default_factory=dict)


def summarize(times: dict[str, list[float]], invert: bool = False, scale: float = 1.0) -> dict[str, Stat]:
    """Median per variant. Ratios are per round vs base (``invert`` for throughputs)."""
    out = {}
    for name, ts in times.items():
        vals = [scale / t for t in ts] if invert else [t * scale for t in ts]
        base = [scale / t for t in times["base"]] if invert else [t * scale for t in times["base"]]
        ratios = [v / b for v, b in zip(vals, base)]
        best = (max(vals) / max(base)) if invert else (min(vals) / min(base))
        out[name] = Stat(statistics.median(vals), statistics.median(ratios), min(ratios), max(ratios), {"best": best})
    return out


def forward_fn(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def train_fn(model, x):
    def run():
        loss = model(x, labels=x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def mixing_fn(model, x, train: bool):
    """limeify's value-cache work alone, without the model around it.

    Every layer writes random K/V of the model's shape (sliced from a wider tensor where the
    model's K/V are slices of a fused projection) into a value cache and mixes it with the
    limeified model's own routers; with ``train`` it also runs their backward. Timed against
    the base model in the same rounds, this is the overhead limeify cannot go below at this
    shape with these kernels: the rest of its overhead is hooks and glue.
    """
    sites = limeify.attention_sites(model)
    rts = limeify.routers(model)
    param = next(model.parameters())
    raws, grads = [], []
    for site in sites:
        per_role = {}
        for role, src, dim in (("k", site.key, site.head_dim), ("v", site.value, site.v_head_dim)):
            width = site.num_kv_heads * dim
            wide = torch.randn(*x.shape, src.end if src.start is not None else width,
                               device=param.device, dtype=param.dtype, requires_grad=train)
            per_role[role] = (wide, wide[..., src.start:src.end] if src.start is not None else wide)
            grads.append(torch.randn(*x.shape, width, device=param.device, dtype=param.dtype))
        raws.append(per_role)

    def run():
        cache = ValueCache(None, len(sites), grad=train)
        outs = []
        with torch.set_grad_enabled(train):
            for site in sites:
                router = rts.get(site.layer)
                for role in ("k", "v"):
                    raw = raws[site.layer][role][1]
                    outs.append(router(raw, cache, role, None) if router is not None
                                else record(raw, cache, role, site.layer, site.num_kv_heads))
            if train:
                torch.autograd.backward(outs, grads)
                model.zero_grad(set_to_none=True)
                for per_role in raws:
                    for wide, _ in per_role.values():
                        wide.grad = None
    return run


def mixing_flops(model, tokens: int) -> int:
    """Multiply-adds x 2 of one forward's mixes (static routers: ``[G, n] @ [n, d]`` per token)."""
    sites = limeify.attention_sites(model)
    total = 0
    for layer in limeify.routers(model):
        site = sites[layer]
        n = (site.position + 1) * site.num_kv_heads
        total += 2 * tokens * site.num_kv_heads * n * (site.head_dim + site.v_head_dim)
    return total


def model_flops(model, tokens: int) -> int:
    """Multiply-adds x 2 of one forward through every weight matrix (embeddings excluded)."""
    return 2 * tokens * sum(m.weight.numel() for m in model.modules()
                            if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor)
                            and m.weight.dim() == 2 and not isinstance(m, nn.Embedding))


def decode_fn(model, prompt, steps, on_start: Callable[[], None] | None = None):
    # transformers 5.24 renamed past_key_values to cache; the old name still works but warns.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run() -> float:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            past, nxt = out[key], out.logits[:, -1].argmax(-1, keepdim=True)
            sync(prompt.device)
            if on_start is not None:
                on_start()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, use_cache=True, **{key: past})
                past, nxt = out[key], out.logits[:, -1].argmax(-1, keepdim=True)
            sync(prompt.device)
            return time.perf_counter() - t0
    return run


def peak_cuda_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def bench_latency(arch: Arch, args, device, dtype, log) -> dict:
    models = build_variants(arch, None, device, dtype, args.seq)
    variants = [v for v in VARIANTS if v != "naive" or not args.no_naive_latency]
    x = torch.randint(0, arch.vocab, (args.batch, args.seq), device=device)
    res: dict = {"params": added_parameters(models)}
    res["base_params"] = sum(p.numel() for p in models["base"].parameters())
    with torch.no_grad():
        outs = {k: m(x[:1, : min(args.seq, 32)]).logits.float() for k, m in models.items()}
    res["lime_vs_naive_maxdiff"] = (outs["limeify"] - outs["naive"]).abs().max().item()

    tokens = x.numel()
    res["flops"] = {"mix": mixing_flops(models["limeify"], tokens), "base": model_flops(models["base"], tokens)}

    log(f"  [{arch.name}] forward ...")
    fns = {v: forward_fn(models[v], x) for v in variants}
    fns[MIX_ONLY] = mixing_fn(models["limeify"], x, train=False)
    t = timed_rounds(fns, args.warmup, args.repeats, device)
    res["fwd"] = summarize(t, scale=1e3)
    log(f"  [{arch.name}] forward+backward ...")
    for m in models.values():
        m.requires_grad_(True)
    fns = {v: train_fn(models[v], x) for v in variants}
    fns[MIX_ONLY] = mixing_fn(models["limeify"], x, train=True)
    t = timed_rounds(fns, args.warmup, args.repeats, device)
    res["fwdbwd"] = summarize(t, scale=1e3)
    res["peak_mb"] = {v: peak_cuda_mb(train_fn(models[v], x), device) for v in variants}
    for bsz in args.decode_batches:
        log(f"  [{arch.name}] decode batch {bsz} ...")
        prompt = torch.randint(0, arch.vocab, (bsz, args.prompt), device=device)
        fns = {v: decode_fn(models[v], prompt, args.new_tokens) for v in variants
               if v != "naive" or args.naive_decode}
        t = timed_rounds(fns, args.warmup, args.decode_repeats, device)
        res[f"decode{bsz}"] = summarize(t, invert=True, scale=bsz * args.new_tokens)
    del models
    return res


def bench_memory(arch: Arch, args, device, dtype, log) -> list[dict]:
    rows = []
    mem_arch = arch.with_(hidden=args.mem_hidden, heads=max(1, args.mem_hidden // arch.head_dim),
                          kv_heads=max(1, args.mem_hidden // arch.head_dim * arch.kv_heads // arch.heads),
                          intermediate=None if arch.intermediate is None else
                          arch.intermediate * args.mem_hidden // arch.hidden) if args.mem_hidden else arch
    for depth in args.depths:
        log(f"  [{arch.name}] saved activations, depth {depth} ...")
        models = build_variants(mem_arch, depth, device, dtype, args.mem_seq)
        x = torch.randint(0, arch.vocab, (args.mem_batch, args.mem_seq), device=device)
        row = {"depth": depth, "arch": mem_arch}
        for name, m in models.items():
            m.requires_grad_(True)
            row[name] = saved_bytes(lambda: m(x, labels=x).loss, parameter_pointers(m))
        elem = torch.finfo(dtype).bits // 8
        hd = mem_arch.head_dim
        row["raw_kv_per_layer"] = 2 * args.mem_batch * args.mem_seq * mem_arch.kv_heads * hd * elem
        for name in ("limeify", "naive"):
            row[f"{name}_per_layer_ratio"] = (row[name] - row["base"]) / depth / row["raw_kv_per_layer"]
        rows.append(row)
        del models
    return rows


def bench_compile(arch: Arch, args, device, dtype, log) -> dict:
    """torch.compile base and limeify; compare with eager and time compiled forward."""
    import torch._dynamo as dynamo

    carch = arch.with_(layers=args.compile_layers) if args.compile_layers else arch
    res: dict = {"arch": carch}
    try:
        models = build_variants(carch, None, device, dtype, args.compile_seq)
        del models["naive"]
        x = torch.randint(0, arch.vocab, (args.compile_batch, args.compile_seq), device=device)
        with torch.no_grad():
            eager = {k: m(x).logits.float() for k, m in models.items()}
        compiled = {}
        for name, m in models.items():
            dynamo.reset()
            dynamo.utils.counters.clear()
            log(f"  [{arch.name}] torch.compile {name} ...")
            fullgraph = True
            t0 = time.perf_counter()
            try:
                c = torch.compile(m, fullgraph=True, backend=args.compile_backend)
                with torch.no_grad():
                    out = c(x).logits.float()
            except Exception as exc:  # noqa: BLE001 - report and fall back to graph breaks
                fullgraph = False
                res[f"{name}_fullgraph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                dynamo.reset()
                dynamo.utils.counters.clear()
                c = torch.compile(m, backend=args.compile_backend)
                with torch.no_grad():
                    out = c(x).logits.float()
            res[f"{name}_compile_s"] = time.perf_counter() - t0
            res[f"{name}_fullgraph"] = fullgraph
            res[f"{name}_graph_breaks"] = sum(dynamo.utils.counters["graph_break"].values())
            res[f"{name}_maxdiff"] = (out - eager[name]).abs().max().item()
            compiled[name] = c
        t = timed_rounds({k: forward_fn(c, x) for k, c in compiled.items()}, args.warmup, args.repeats, device)
        res["compiled"] = summarize(t, scale=1e3)
        t = timed_rounds({k: forward_fn(m, x) for k, m in models.items()}, args.warmup, args.repeats, device)
        res["eager"] = summarize(t, scale=1e3)
        res["ok"] = True
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result, not a crash
        res["ok"] = False
        res["error"] = f"{type(exc).__name__}: {exc}"[:500]
        res["traceback"] = traceback.format_exc()[-2000:]
    return res


def run_profile(arch: Arch, args, device, dtype) -> str:
    from torch.profiler import ProfilerActivity, profile

    models = build_variants(arch, None, device, dtype, args.seq)
    x = torch.randint(0, arch.vocab, (args.batch, args.seq), device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    text = []
    for mode, make in (("forward", forward_fn), ("forward+backward", train_fn)):
        for name in ("base", "limeify"):
            m = models[name]
            m.requires_grad_(True)
            fn = make(m, x)
            fn()
            with profile(activities=acts) as prof:
                fn()
            text.append(f"### {arch.name} {mode} {name}\n")
            text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    return "\n".join(text)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

TARGETS = {"fwd": ("<=", 1.03), "fwdbwd": ("<=", 1.05), "decode": (">=", 0.97), "mem": ("<=", 1.5), "compile": ("<=", 1.05)}


def fmt_ratio(s: Stat) -> str:
    return f"{s.ratio:.3f} [{s.lo:.2f}-{s.hi:.2f}] (best {s.extra['best']:.3f})"


def verdict(value: float, key: str) -> str:
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "ok" if ok else "MISS"


def environment(device, dtype) -> list[str]:
    import transformers

    lines = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {platform.platform()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        f"- cpu: {_cpu_model()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"limeify {limeify.__version__}",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", dtype {str(dtype).replace('torch.', '')}",
    ]
    try:
        lines.append(f"- load average at start (1/5/15 min): {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass
    return lines


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(args, device, dtype, archs, latency, memory, compiled, env, elapsed) -> str:
    L = []
    L.append("# limeify benchmark results\n")
    L.append(f"Produced by `python benchmarks/bench.py {' '.join(sys.argv[1:])}` in {elapsed:.0f} s.\n")
    L.extend(env)
    L.append(f"- load average at end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    L.append("")
    L.append("Models: random weights from transformers configs, SDPA attention, "
             + "; ".join(a.describe() for a in archs.values()) + ".")
    L.append("limeify uses `LimeConfig(init='paper')` (non-trivial routers; the cost is the same as identity "
             "init); naive is the official concatenate-then-matmul approach written in this file with the "
             "same router weights (max |logits diff| vs limeify listed below).")
    L.append("Ratios are paired per round (variant / base in the same round, order rotated each round), shown "
             "as median [min-max over rounds]; `best` is the ratio of the best (fastest) times, the least "
             "disturbed by other load on a shared machine. Decode ratios are tokens/s ratios (higher is better).\n")

    if latency:
        L.append(f"## Latency (batch {args.batch} x {args.seq} tokens; decode: prompt {args.prompt}, "
                 f"{args.new_tokens} new tokens; {args.warmup} warm-up + {args.repeats} rounds, "
                 f"decode {args.decode_repeats} rounds)\n")
        head = "| model | variant | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |"
        sep = "|---|---|---:|---:|---:|---:|"
        for b in args.decode_batches:
            head += f" decode b{b} tok/s | ratio |"
            sep += "---:|---:|"
        head += " params added |" + (" peak CUDA MiB |" if device.type == "cuda" else "")
        sep += "---:|" + ("---:|" if device.type == "cuda" else "")
        L.extend([head, sep])
        for name, res in latency.items():
            for v in res["fwd"]:
                if v == MIX_ONLY:
                    continue
                row = f"| {name} | {v} | {res['fwd'][v].median:.1f} | {fmt_ratio(res['fwd'][v])} | " \
                      f"{res['fwdbwd'][v].median:.1f} | {fmt_ratio(res['fwdbwd'][v])} |"
                for b in args.decode_batches:
                    s = res[f"decode{b}"].get(v)
                    row += f" {s.median:.1f} | {fmt_ratio(s)} |" if s else " - | - |"
                p = res["params"][v]
                row += f" {p:,} ({100 * p / res['base_params']:.4f}%) |"
                if device.type == "cuda":
                    row += f" {res['peak_mb'][v]:.0f} |"
                L.append(row)
        L.append("")
        L.append("Targets (limeify vs base): forward <= 1.03x, forward+backward <= 1.05x, decode tokens/s >= 0.97x.\n")
        L.append("| model | fwd | fwd+bwd | " + " | ".join(f"decode b{b}" for b in args.decode_batches)
                 + " | max abs logits diff limeify vs naive |")
        L.append("|---|---|---|" + "---|" * len(args.decode_batches) + "---:|")
        for name, res in latency.items():
            s = res["fwd"]["limeify"], res["fwdbwd"]["limeify"]
            cells = [f"{s[0].ratio:.3f} {verdict(s[0].ratio, 'fwd')}", f"{s[1].ratio:.3f} {verdict(s[1].ratio, 'fwdbwd')}"]
            for b in args.decode_batches:
                r = res[f"decode{b}"]["limeify"].ratio
                cells.append(f"{r:.3f} {verdict(r, 'decode')}")
            L.append(f"| {name} | " + " | ".join(cells) + f" | {res['lime_vs_naive_maxdiff']:.2e} |")
        L.append("")
        L.append("### Where limeify's overhead goes\n")
        L.append(f"`{MIX_ONLY}` runs limeify's value-cache writes and mixes (and their backward) for every layer "
                 "on random K/V of the model's shape, with the limeified model's routers but without the "
                 "model, timed in the same rounds as the others. Its time over the base model's time is the "
                 "overhead limeify cannot go below at this shape with these kernels; `glue` = limeify's "
                 "overhead minus it (hooks, slicing, re-assembling a fused projection's output). GFLOP/s "
                 "counts 2 x multiply-adds (mixes: `[G, n] @ [n, d]` per token and layer; base: every weight "
                 "matrix but the embeddings; backward = 2 x forward), so they compare how well each uses the "
                 "machine.\n")
        L.append("| model | pass | base ms | mixing alone ms | mixing alone / base | limeify / base | glue "
                 "| base GFLOP/s | mixing GFLOP/s |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, res in latency.items():
            for key, label, mult in (("fwd", "forward", 1), ("fwdbwd", "forward+backward", 3)):
                st = res[key]
                base_ms, mix_ms = st["base"].median, st[MIX_ONLY].median
                share, lime = st[MIX_ONLY].ratio, st["limeify"].ratio
                L.append(f"| {name} | {label} | {base_ms:.1f} | {mix_ms:.1f} | {share:.3f} [{st[MIX_ONLY].lo:.2f}-"
                         f"{st[MIX_ONLY].hi:.2f}] | {lime:.3f} | {lime - 1 - share:+.3f} | "
                         f"{mult * res['flops']['base'] / base_ms / 1e6:.1f} | "
                         f"{mult * res['flops']['mix'] / mix_ms / 1e6:.1f} |")
        L.append("")
    if memory:
        L.append(f"## Activations saved for backward (batch {args.mem_batch} x {args.mem_seq} tokens, training "
                 "forward with loss; bytes deduplicated by storage, parameters excluded)\n")
        if args.mem_hidden:
            L.append(f"Depth sweep uses hidden size {args.mem_hidden} (head size kept) to save time.\n")
        L.append("`extra/layer ÷ raw K+V` = (variant bytes - base bytes) / depth / (bytes of one layer's raw K "
                 "and V). Target for limeify: <= 1.5 and constant in depth.\n")
        L.append("| model | depth | base MiB | limeify MiB | naive MiB | raw K+V per layer KiB | "
                 "limeify extra/layer ÷ raw K+V | naive extra/layer ÷ raw K+V |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, rows in memory.items():
            for r in rows:
                lr, nr = r["limeify_per_layer_ratio"], r["naive_per_layer_ratio"]
                L.append(f"| {name} | {r['depth']} | {r['base'] / 2**20:.2f} | {r['limeify'] / 2**20:.2f} | "
                         f"{r['naive'] / 2**20:.2f} | {r['raw_kv_per_layer'] / 2**10:.1f} | "
                         f"{lr:.3f} {verdict(lr, 'mem')} | {nr:.3f} |")
        L.append("")

    if compiled:
        L.append(f"## torch.compile (backend {args.compile_backend}, no-grad forward)\n")
        L.append("| model | shape | ok | fullgraph base / limeify | graph breaks base / limeify | compile s base / limeify "
                 "| max diff vs eager base / limeify | compiled ms base / limeify | compiled ratio | eager ratio |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in compiled.items():
            a = r["arch"]
            shape = f"{a.layers}L h{a.hidden}, {args.compile_batch}x{args.compile_seq}"
            if not r.get("ok"):
                L.append(f"| {name} | {shape} | FAILED: {r.get('error', '')[:200]} | | | | | | | |")
                continue
            c, e = r["compiled"], r["eager"]
            L.append(
                f"| {name} | {shape} | yes | {r['base_fullgraph']} / {r['limeify_fullgraph']} | "
                f"{r['base_graph_breaks']} / {r['limeify_graph_breaks']} | "
                f"{r['base_compile_s']:.0f} / {r['limeify_compile_s']:.0f} | "
                f"{r['base_maxdiff']:.1e} / {r['limeify_maxdiff']:.1e} | "
                f"{c['base'].median:.1f} / {c['limeify'].median:.1f} | "
                f"{fmt_ratio(c['limeify'])} {verdict(c['limeify'].ratio, 'compile')} | {fmt_ratio(e['limeify'])} |")
        for name, r in compiled.items():
            for key in ("base_fullgraph_error", "limeify_fullgraph_error"):
                if key in r:
                    L.append(f"\n{name} {key.split('_')[0]} fullgraph=True failed: `{r[key]}`")
            if not r.get("ok") and r.get("traceback"):
                L.append(f"\n<details><summary>{name} traceback</summary>\n\n```\n{r['traceback']}\n```\n</details>")
        L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1].split("Examples::")[0],
        epilog="Examples:\n  bench.py --quick\n  bench.py\n  bench.py --device cuda\n  bench.py --batch 4 --seq 256"
               "\n  bench.py --sections memory --depths 4 8 16 32 64\n  bench.py --profile llama-gqa",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a seconds-long smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available (bf16 there), else cpu (fp32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"), help="markdown results file")
    p.add_argument("--sections", nargs="+", default=["latency", "memory", "compile"],
                   choices=["latency", "memory", "compile"], help="what to run")
    p.add_argument("--archs", nargs="+", default=["gpt2", "llama-gqa"], choices=["gpt2", "llama-gqa"])
    p.add_argument("--vocab", type=int, default=8192,
                   help="vocabulary size (default 8192: a smaller LM head keeps limeify's share of the time "
                        "visible; GPT-2's 50257 would dilute the ratios)")
    g = p.add_argument_group("latency")
    g.add_argument("--batch", type=int, default=None, help="batch for fwd / fwd+bwd (default 4)")
    g.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (default 256 on GPU, 64 on CPU so the full run fits ~10 min on "
                        "2 cores; the issue's CPU shape is --batch 4 --seq 256)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    g.add_argument("--repeats", type=int, default=None, help="timed rounds for fwd and fwd+bwd (default 3 CPU, 20 GPU)")
    g.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    g.add_argument("--prompt", type=int, default=None, help="decode prompt length (default 32)")
    g.add_argument("--new-tokens", type=int, default=None, help="greedy tokens decoded per round (default 16 CPU, 64 GPU)")
    g.add_argument("--decode-repeats", type=int, default=None, help="decode rounds (default 3 CPU, 10 GPU)")
    g.add_argument("--no-naive-latency", action="store_true", help="time base and limeify only")
    g.add_argument("--naive-decode", action="store_true",
                   help="also decode with the naive reference (off by default: with a KV cache each step "
                        "mixes one token, so it does what limeify does, and it costs run time)")
    g = p.add_argument_group("saved activations")
    g.add_argument("--depths", type=int, nargs="+", default=None, help="depths for the memory sweep (default 4 8 16 32)")
    g.add_argument("--mem-batch", type=int, default=None, help="batch for the memory sweep (default 1)")
    g.add_argument("--mem-seq", type=int, default=None, help="tokens for the memory sweep (default 128)")
    g.add_argument("--mem-hidden", type=int, default=None,
                   help="hidden size for the memory sweep (head size and GQA ratio kept; default: the "
                        "architecture's own)")
    g = p.add_argument_group("torch.compile")
    g.add_argument("--compile-layers", type=int, default=None,
                   help="layers of the compiled models (default 4 on CPU to bound compile time, full on GPU)")
    g.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager with --quick, which checks that "
                        "dynamo and AOTAutograd trace the hooks without inductor's C++ compile time)")
    g.add_argument("--compile-batch", type=int, default=None, help="batch for compiled forward (default 2)")
    g.add_argument("--compile-seq", type=int, default=None, help="tokens for compiled forward (default 64)")
    g = p.add_argument_group("profiling")
    g.add_argument("--profile", metavar="ARCH", choices=["gpt2", "llama-gqa"], default=None,
                   help="instead of benchmarking, print torch.profiler tables (base vs limeify, forward and "
                        "forward+backward) for ARCH at the latency shape")
    g.add_argument("--profile-rows", type=int, default=25)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    return args


def fill_defaults(args, device) -> None:
    gpu = device.type == "cuda"
    quick = args.quick
    defaults = dict(
        batch=2 if quick else 4,
        seq=16 if quick else (256 if gpu else 64),
        warmup=1,
        repeats=2 if quick else (20 if gpu else 3),
        prompt=8 if quick else 32,
        new_tokens=4 if quick else (64 if gpu else 16),
        decode_repeats=2 if quick else (10 if gpu else 3),
        depths=[2, 4] if quick else [4, 8, 16, 32],
        mem_batch=1,
        mem_seq=16 if quick else 128,
        compile_layers=2 if quick else (None if gpu else 4),
        compile_batch=1 if quick else 2,
        compile_backend="aot_eager" if quick else "inductor",
        compile_seq=16 if quick else 64,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if quick:
        args.decode_batches = [b for b in args.decode_batches if b <= 2] or [1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device available", file=sys.stderr)
            return 2
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    fill_defaults(args, device)
    archs = {k: v for k, v in make_archs(args).items() if k in args.archs}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    if args.profile:
        print(run_profile(make_archs(args)[args.profile], args, device, dtype))
        return 0

    env = environment(device, dtype)
    start = time.perf_counter()
    latency, memory, compiled = {}, {}, {}
    for name, arch in archs.items():
        if "latency" in args.sections:
            log(f"latency: {arch.describe()}")
            latency[name] = bench_latency(arch, args, device, dtype, log)
        if "memory" in args.sections:
            log(f"saved activations: {name}")
            memory[name] = bench_memory(arch, args, device, dtype, log)
    for name, arch in archs.items():
        if "compile" in args.sections:
            log(f"torch.compile: {name}")
            compiled[name] = bench_compile(arch, args, device, dtype, log)
    text = report(args, device, dtype, archs, latency, memory, compiled, env, time.perf_counter() - start)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
