"""Graph analysis that finds attention sites and the modules (or slices) producing K and V.

The model is traced once, at limeify time, on a small example input: with plain
``torch.fx.symbolic_trace`` when that works (simple user modules), otherwise with
``torch.export.export(..., strict=False)``, which handles transformers' models. In the graph
we find each attention op (``scaled_dot_product_attention``, or ``matmul -> softmax ->
matmul``) and walk back from its key and value inputs to the nearest parameterised
projections; the module enclosing them is the producer.

Which features of the producer's output are K (a slice of a fused qkv output) is then read
off numerically, not by pattern-matching split/slice/view ops: the graph is re-run with each
producer's output as a leaf tensor and the gradient of the attention's key input tells which
output features reach it. The head size is the query's last dimension; the number of KV
heads is the slice width over the head size, taken before any GQA repetition.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import LimeError
from .sites import AttentionSite, KVSource

aten = torch.ops.aten

_SDPA_ATEN = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
_SOFTMAX_ATEN = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL_ATEN = {aten.matmul.default, aten.bmm.default}
_PROJ_ATEN = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_LAYOUT_ATEN = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
                aten.reshape.default, aten._to_copy.default, aten.to.dtype, aten.clone.default}

_SDPA_FX = {F.scaled_dot_product_attention}
_SOFTMAX_FX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MATMUL_FX = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul}

Inputs = tuple[tuple, dict]


@dataclass
class _Attention:
    query: fx.Node
    key: fx.Node
    value: fx.Node


class _Graph:
    """A traced graph plus the few questions discovery asks of it, answered per IR."""

    def __init__(self, gm: fx.GraphModule, run_args: list, kind: str) -> None:
        self.gm, self.run_args, self.kind = gm, run_args, kind
        self.module_paths: dict[fx.Node, tuple[str, ...]] = {}
        self.module_output: dict[str, fx.Node] = {}
        if kind == "fx":
            # Record tensor values so walks follow data, not the size arithmetic fx also traces.
            ShapeProp(gm).propagate(*run_args)
        self.floats: set[fx.Node] = set()
        for node in gm.graph.nodes:
            meta = node.meta.get("val")
            meta = node.meta.get("tensor_meta") if meta is None else meta
            metas = meta if isinstance(meta, (list, tuple)) and not hasattr(meta, "dtype") else [meta]
            if any(getattr(getattr(m, "dtype", None), "is_floating_point", False) for m in metas):
                self.floats.add(node)
            if kind == "fx":
                paths = (node.target,) if node.op == "call_module" else ()
            else:
                stack = node.meta.get("nn_module_stack") or {}
                paths = tuple(path for path, _ in stack.values())
            self.module_paths[node] = paths
            if node in self.floats:
                for path in paths:
                    self.module_output[path] = node

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [m for m in node.all_input_nodes if m in self.floats]

    def _call(self, node: fx.Node, aten_ops: set, fx_ops: set, method: str | None = None) -> bool:
        if node.op == "call_function":
            return node.target in (aten_ops if self.kind == "export" else fx_ops)
        return self.kind == "fx" and node.op == "call_method" and node.target == method

    def is_sdpa(self, n: fx.Node) -> bool:
        return self._call(n, _SDPA_ATEN, _SDPA_FX)

    def is_softmax(self, n: fx.Node) -> bool:
        return self._call(n, _SOFTMAX_ATEN, _SOFTMAX_FX, "softmax")

    def is_matmul(self, n: fx.Node) -> bool:
        return self._call(n, _MATMUL_ATEN, _MATMUL_FX, "matmul")

    def _is_param(self, n: Any, depth: int = 0) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n.op == "get_attr":
            return isinstance(_fetch_attr(self.gm, n.target), nn.Parameter)
        if depth < 3 and n.op == "call_function" and n.target in _LAYOUT_ATEN:
            return self._is_param(n.args[0], depth + 1)
        return False

    def projection_module(self, n: fx.Node) -> str | None:
        """Path of the module a parameterised projection node belongs to, else None."""
        if self.kind == "fx":
            if n.op != "call_module":
                return None
            if not any(m in self.floats for m in n.all_input_nodes):
                return None
            mod = self.gm.get_submodule(n.target)
            has_weight = any(p.dim() >= 2 for p in mod.parameters(recurse=False))
            return n.target if has_weight else None
        if n.op == "call_function" and n.target in _PROJ_ATEN and any(self._is_param(a) for a in n.args):
            paths = self.module_paths[n]
            return paths[-1] if paths else ""
        return None


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bfs(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]], hit: Callable[[fx.Node], bool], depth: int) -> fx.Node | None:
    frontier, seen = [start], {start}
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for m in step(node):
                if m in seen:
                    continue
                if hit(m):
                    return m
                seen.add(m)
                nxt.append(m)
        frontier = nxt
    return None


def _find_attention(g: _Graph) -> list[_Attention]:
    found = []
    for node in g.gm.graph.nodes:
        if g.is_sdpa(node):
            q, k, v = node.args[:3]
            found.append(_Attention(q, k, v))
        elif g.is_softmax(node):
            scores = _bfs(node, lambda n: n.all_input_nodes, g.is_matmul, depth=6)
            probs_mm = _bfs(node, lambda n: list(n.users), g.is_matmul, depth=6)
            if scores is None or probs_mm is None or len(scores.args) < 2 or len(probs_mm.args) < 2:
                continue
            q, kt = scores.args[:2]
            if g._is_param(q) or g._is_param(kt) or g._is_param(probs_mm.args[1]):
                continue
            found.append(_Attention(q, kt, probs_mm.args[1]))
    return found


def _producer(g: _Graph, start: fx.Node, attention_paths: tuple[str, ...], role: str, index: int) -> str:
    """The module enclosing the parameterised projections that feed ``start``."""
    projections: set[str] = set()
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        path = g.projection_module(node)
        if path is not None:
            projections.add(path)
            continue
        for m in g.data_inputs(node):
            if m not in seen:
                seen.add(m)
                frontier.append(m)
    if not projections:
        raise LimeError(
            f"attention op #{index}: no parameterised projection feeds its {role} input; "
            "pass LimeConfig(sites=[AttentionSite(...)]) naming the module that produces it"
        )
    parts = [p.split(".") for p in projections]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    path = ".".join(common)
    if not path or path in attention_paths:
        raise LimeError(
            f"attention op #{index}: its {role} input comes from several projections "
            f"({sorted(projections)}) with no separate module producing {role}; wrap the "
            f"{role} projection in its own nn.Linear or pass LimeConfig(sites=...)"
        )
    return path


class _Probe(fx.Interpreter):
    """Re-runs the graph with producer outputs as leaves and captures attention inputs."""

    def __init__(self, gm: fx.GraphModule, leaves: set[fx.Node], watch: set[fx.Node]) -> None:
        super().__init__(gm)
        self.leaves, self.watch = leaves, watch
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.leaves:
            out = out.detach().requires_grad_(True)
        if n in self.leaves or n in self.watch:
            self.values[n] = out
        return out


def _feature_slice(leaf: torch.Tensor, target: torch.Tensor, what: str) -> tuple[int | None, int | None]:
    """Which of ``leaf``'s last-dim features reach ``target``; must be one contiguous range."""
    probe = torch.randn(target.shape, generator=torch.Generator().manual_seed(0), dtype=target.dtype)
    (grad,) = torch.autograd.grad(target, leaf, probe.to(target.device), retain_graph=True, allow_unused=True)
    if grad is None:
        raise LimeError(f"{what}: the producer's output does not reach the attention op")
    used = grad.detach().abs().reshape(-1, grad.shape[-1]).sum(0).nonzero().flatten().tolist()
    if not used:
        raise LimeError(f"{what}: the producer's output does not reach the attention op")
    start, end = used[0], used[-1] + 1
    if end - start != len(used):
        raise LimeError(f"{what}: K/V use non-contiguous features of the producer output; pass LimeConfig(sites=...)")
    if start == 0 and end == leaf.shape[-1]:
        return None, None
    return start, end


def _trace(model: nn.Module, args: tuple, kwargs: dict) -> _Graph:
    try:
        gm = fx.symbolic_trace(model)
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        run_args = [bound.arguments[n.target] for n in gm.graph.nodes if n.op == "placeholder"]
        graph = _Graph(gm, run_args, "fx")
        if _find_attention(graph):
            return graph
    except Exception:  # fx cannot trace most transformers models; export handles them
        pass
    try:
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as exc:
        raise LimeError(
            f"could not trace {type(model).__name__} with torch.fx or torch.export ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass example_inputs= that the model "
            "accepts, or explicit LimeConfig(sites=[...])"
        ) from exc
    gm = ep.module()
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return _Graph(gm, flat, "export")


def default_example_inputs(model: nn.Module, batch: int = 1, seq_len: int = 8) -> Inputs:
    """A tiny input built from a transformers model's config (input ids or pixel values)."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kwargs: dict = {}
    if config is not None and name == "input_ids" and getattr(config, "vocab_size", None):
        ids = torch.arange(seq_len, device=device).remainder(config.vocab_size).repeat(batch, 1)
        return (ids,), kwargs
    if config is not None and name == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        pixels = torch.randn(batch, getattr(config, "num_channels", 3), size, size, device=device)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return (pixels.to(dtype),), kwargs
    raise LimeError(
        f"cannot build an example input for {type(model).__name__} (no transformers config with "
        "input_ids or pixel_values); pass limeify(model, config, example_inputs=(args, kwargs)) "
        "or example_inputs=tensor"
    )


def normalize_inputs(example_inputs: Any) -> Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise LimeError("example_inputs must be a tensor, a tuple of args, a dict of kwargs, or (args, kwargs)")


def discover_sites(model: nn.Module, example_inputs: Any = None) -> list[AttentionSite]:
    """Find every attention site of ``model`` by tracing it once on a small input."""
    args, kwargs = normalize_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)
    if "use_cache" in inspect.signature(model.forward).parameters:
        # A KV cache in the outputs is nothing discovery needs, and export cannot return one.
        kwargs.setdefault("use_cache", False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            graph = _trace(model, args, kwargs)
        attentions = _find_attention(graph)
        if not attentions:
            raise LimeError(
                f"found no attention in {type(model).__name__}: searched its {graph.kind} graph for "
                "scaled_dot_product_attention and matmul->softmax->matmul; if it has attention "
                "that is computed differently, pass LimeConfig(sites=[AttentionSite(...)])"
            )
        producers = []
        for i, att in enumerate(attentions):
            att_paths = graph.module_paths.get(att.key, ())
            k_path = _producer(graph, att.key, att_paths, "key", i)
            v_path = _producer(graph, att.value, att_paths, "value", i)
            producers.append((k_path, v_path))
        leaves = {graph.module_output[p] for pair in producers for p in pair}
        watch = {n for att in attentions for n in (att.query, att.key, att.value)}
        probe = _Probe(graph.gm, leaves, watch)
        with torch.enable_grad():
            probe.run(*graph.run_args)
            return _sites(graph, attentions, producers, probe.values)
    finally:
        model.train(was_training)


def _sites(graph: _Graph, attentions: list[_Attention], producers: list[tuple[str, str]], values: dict) -> list[AttentionSite]:
    sites, used = [], {}
    for i, (att, (k_path, v_path)) in enumerate(zip(attentions, producers)):
        k_leaf = values[graph.module_output[k_path]]
        v_leaf = values[graph.module_output[v_path]]
        ks, ke = _feature_slice(k_leaf, values[att.key], f"attention #{i} key")
        vs, ve = _feature_slice(v_leaf, values[att.value], f"attention #{i} value")
        q = values[att.query]
        d, dv = q.shape[-1], values[att.value].shape[-1]
        k_width = (ke - ks) if ks is not None else k_leaf.shape[-1]
        v_width = (ve - vs) if vs is not None else v_leaf.shape[-1]
        if k_width % d or v_width % dv or k_width // d != v_width // dv:
            raise LimeError(
                f"attention #{i}: K has {k_width} features and V {v_width}, not a whole number of "
                f"heads of size {d}/{dv} each with equal head counts; pass LimeConfig(sites=...)"
            )
        for key in ((k_path, ks), (v_path, vs)):
            if key in used and used[key] != i:
                raise LimeError(f"the output {key[0]} feeds two attention ops (#{used[key]} and #{i}); not supported")
            used[key] = i
        parent = _common_parent(k_path, v_path)
        sites.append(
            AttentionSite(
                layer=i,
                attention=parent,
                key=KVSource(k_path, ks, ke),
                value=KVSource(v_path, vs, ve),
                num_kv_heads=k_width // d,
                head_dim=d,
                value_head_dim=dv if dv != d else None,
                num_heads=q.shape[-3] if q.dim() >= 3 else None,
                hidden_size=_input_features(graph, k_path),
            )
        )
    return sites


def _common_parent(k_path: str, v_path: str) -> str:
    k, v = k_path.split("."), v_path.split(".")
    common = []
    for a, b in zip(k, v):
        if a != b:
            break
        common.append(a)
    if common == k or common == v:
        common = common[:-1]
    return ".".join(common)


def _input_features(graph: _Graph, path: str) -> int | None:
    try:
        mod = graph.gm.get_submodule(path) if graph.kind == "fx" else None
    except AttributeError:
        mod = None
    weight = getattr(mod, "weight", None) if mod is not None else None
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[1]
    for node in graph.gm.graph.nodes:
        if graph.projection_module(node) is not None and path in graph.module_paths.get(node, ()):
            x = node.args[1] if node.target is aten.addmm.default else node.args[0]
            val = x.meta.get("val") if isinstance(x, fx.Node) else None
            return int(val.shape[-1]) if isinstance(val, torch.Tensor) else None
    return None
