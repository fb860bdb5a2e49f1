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

import contextlib
import inspect
import io
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import LimeError
from .restructure import expose
from .sites import AttentionSite, KVSource

aten = torch.ops.aten

_SDPA_ATEN = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
try:
    from torch._higher_order_ops.flex_attention import flex_attention as _flex_attention_op

    _FLEX = {_flex_attention_op}
except ImportError:  # a torch without flex attention
    _FLEX = set()
_SOFTMAX_ATEN = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL_ATEN = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default}
_PROJ_ATEN = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_LAYOUT_ATEN = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
                aten.reshape.default, aten._to_copy.default, aten.to.dtype, aten.clone.default}
# A slice of a packed parameter is still a weight (nn.MultiheadAttention's cross-attention
# projects K and V with rows E:3E of in_proj_weight).
_PART_ATEN = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.slice.Tensor,
              aten.narrow.default, operator.getitem}

_SDPA_FX = {F.scaled_dot_product_attention}
_SOFTMAX_FX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MATMUL_FX = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.baddbmm, torch.einsum}

Inputs = tuple[tuple, dict]


@dataclass
class _Attention:
    query: fx.Node
    key: fx.Node
    value: fx.Node


class _Graph:
    """A traced graph plus the few questions discovery asks of it, answered per IR."""

    def __init__(self, gm: fx.GraphModule, run_args: list, kind: str, root: nn.Module | None = None) -> None:
        self.gm, self.run_args, self.kind = gm, run_args, kind
        self.root = gm if root is None else root
        self._leaf_weight: dict[str, bool] = {}
        self.attentions: list[_Attention] | None = None
        self.call_counts: dict[str, int] = {}
        self.module_paths: dict[fx.Node, tuple[str, ...]] = {}
        # Which call of each enclosing module a node runs in: a module run several times in
        # one forward (ALBERT's shared layer) has an output, and a site, per call.
        self.module_calls: dict[fx.Node, dict[str, int]] = {}
        self.module_keys: dict[fx.Node, tuple[str, ...]] = {}
        self.module_output: dict[tuple[str, int], fx.Node] = {}
        fx_calls: dict[str, int] = {}
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
                keys = paths
                if paths:
                    fx_calls[node.target] = fx_calls.get(node.target, -1) + 1
                calls = {path: fx_calls[path] for path in paths}
            else:
                stack = node.meta.get("nn_module_stack") or {}
                paths = tuple(path for path, _ in stack.values())
                keys = tuple(stack)
                # export names a module's later calls "<key>@1", "<key>@2", ...
                calls = {path: int(key.rpartition("@")[2]) if key.rpartition("@")[2].isdigit() else 0
                         for key, (path, _) in stack.items()}
            self.module_paths[node] = paths
            self.module_keys[node] = keys
            self.module_calls[node] = calls
            if node in self.floats:
                for path in paths:
                    self.module_output[path, calls[path]] = node

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [m for m in node.all_input_nodes if m in self.floats]

    def _call(self, node: fx.Node, aten_ops: set, fx_ops: set, method: str | None = None) -> bool:
        if node.op == "call_function":
            return node.target in (aten_ops if self.kind == "export" else fx_ops)
        return self.kind == "fx" and node.op == "call_method" and node.target == method

    def is_sdpa(self, n: fx.Node) -> bool:
        """An op taking (query, key, value) first: SDPA in its forms, or flex attention's operator."""
        return self._call(n, _SDPA_ATEN, _SDPA_FX) or (n.op == "call_function" and n.target in _FLEX)

    def is_softmax(self, n: fx.Node) -> bool:
        return self._call(n, _SOFTMAX_ATEN, _SOFTMAX_FX, "softmax")

    def is_matmul(self, n: fx.Node) -> bool:
        return self._call(n, _MATMUL_ATEN, _MATMUL_FX, "matmul")

    def _is_param(self, n: Any, depth: int = 0) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n.op == "get_attr":
            return isinstance(_fetch_attr(self.gm, n.target), nn.Parameter)
        if depth < 3 and n.op == "call_function" and (n.target in _LAYOUT_ATEN or n.target in _PART_ATEN):
            return self._is_param(n.args[0], depth + 1)
        return False

    def _is_attr(self, n: fx.Node, depth: int = 0) -> bool:
        """A module's own tensor (a weight, a table of positions), not data flowing through it:
        an embedding of positions (RoFormer's rotary table) reads no activation."""
        if n.op == "get_attr":
            return True
        return depth < 3 and n.op == "call_function" and n.target in _LAYOUT_ATEN and isinstance(n.args[0], fx.Node) \
            and self._is_attr(n.args[0], depth + 1)

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
        if n.op != "call_function":
            return None
        paths = self.module_paths[n]
        if n in self.floats and paths and self._is_leaf_with_weight(paths[-1]) and any(
                not self._is_attr(m) for m in self.data_inputs(n)):
            return paths[-1]
        if n.target in _PROJ_ATEN and any(self._is_param(a) for a in n.args):
            return paths[-1] if paths else ""
        return None

    def _is_leaf_with_weight(self, path: str) -> bool:
        """A module with a matrix of its own and no parameterised children: a projection, whatever
        ops its forward exports to (a quantized weight's kernels, ``numpy_T`` + matmul, einsum)."""
        hit = self._leaf_weight.get(path)
        if hit is None:
            try:
                module = self.root.get_submodule(path)
            except AttributeError:
                module = None
            hit = module is not None and any(p.dim() >= 2 for p in module.parameters(recurse=False)) and not any(
                any(True for _ in child.parameters()) for child in module.children())
            self._leaf_weight[path] = hit
        return hit


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
    """The graph's attention ops in forward order (found once per graph)."""
    if g.attentions is None:
        g.attentions = _scan_attention(g)
    return g.attentions


def _scan_attention(g: _Graph) -> list[_Attention]:
    found = []
    for node in g.gm.graph.nodes:
        if g.is_sdpa(node):
            q, k, v = node.args[:3]
            found.append(_Attention(q, k, v))
        elif g.is_softmax(node):
            scores = _bfs(node, lambda n: n.all_input_nodes, g.is_matmul, depth=6)
            probs_mm = _bfs(node, lambda n: list(n.users), g.is_matmul, depth=6)
            qk, pv = _operands(scores), _operands(probs_mm)
            if qk is None or pv is None:
                continue
            (q, kt), v = qk, pv[1]
            if g._is_param(q) or g._is_param(kt) or g._is_param(v):
                continue
            found.append(_Attention(q, kt, v))
    return found


def _operands(node: fx.Node | None) -> tuple[Any, Any] | None:
    """The two multiplied operands of a matmul-like node: ``matmul``/``bmm`` (a, b), ``baddbmm``
    (bias, a, b: scores plus an ALiBi bias), two-operand ``einsum`` (equation, [a, b])."""
    if node is None:
        return None
    args = node.args
    name = getattr(node.target, "__name__", str(node.target))
    if "einsum" in name:
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return tuple(operands) if len(operands) == 2 else None
    if "baddbmm" in name:
        return (args[1], args[2]) if len(args) >= 3 else None
    return (args[0], args[1]) if len(args) >= 2 else None


def _producer(g: _Graph, start: fx.Node, attention_paths: tuple[str, ...], role: str, index: int) -> tuple[str, int]:
    """The module enclosing the parameterised projections that feed ``start``, and which of its calls."""
    projections: dict[str, fx.Node] = {}
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        path = g.projection_module(node)
        if path is not None:
            projections[path] = node
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
    path = _common_prefix([p.split(".") for p in projections])
    call = g.module_calls[next(iter(projections.values()))].get(path, 0)
    if not path or path in attention_paths or (path, call) not in g.module_output:
        raise LimeError(
            f"attention op #{index}: its {role} input comes from several projections "
            f"({sorted(projections)}) with no separate module producing {role}; wrap the "
            f"{role} projection in its own nn.Linear or pass LimeConfig(sites=...)"
        )
    return path, call


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


def _feature_slice(leaf: torch.Tensor, target: torch.Tensor, what: str) -> tuple[int | None, int | None, int, int | None]:
    """Which of ``leaf``'s last-dim features reach ``target``: ``(start, end, blocks, step)``.

    One contiguous range, or equally wide ranges at a constant stride (a per-head fused layout).
    """
    probe = torch.randn(target.shape, generator=torch.Generator().manual_seed(0), dtype=target.dtype)
    (grad,) = torch.autograd.grad(target, leaf, probe.to(target.device), retain_graph=True, allow_unused=True)
    if grad is None:
        raise LimeError(f"{what}: the producer's output does not reach the attention op")
    used = grad.detach().abs().reshape(-1, grad.shape[-1]).sum(0).nonzero().flatten().tolist()
    if not used:
        raise LimeError(f"{what}: the producer's output does not reach the attention op")
    runs = [[used[0], used[0] + 1]]
    for i in used[1:]:
        if i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    start, end = runs[0]
    if len(runs) == 1:
        return (None, None, 1, None) if start == 0 and end == leaf.shape[-1] else (start, end, 1, None)
    step = runs[1][0] - start
    if any(e - s != end - start or s != start + i * step for i, (s, e) in enumerate(runs)):
        raise LimeError(
            f"{what}: K/V use features {_ranges(runs)} of the producer output, not one range or equal ranges "
            "at a constant stride; pass LimeConfig(sites=[AttentionSite(...)]) with K/V producers that "
            "output them (see the README's hand-written sites)"
        )
    return start, end, len(runs), step


def _ranges(runs: list[list[int]]) -> str:
    shown = ", ".join(f"{s}:{e}" for s, e in runs[:4])
    return f"[{shown}{', ...' if len(runs) > 4 else ''}]"


def _trace(model: nn.Module, args: tuple, kwargs: dict) -> _Graph:
    try:
        gm = fx.symbolic_trace(model)
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        run_args = [bound.arguments[n.target] for n in gm.graph.nodes if n.op == "placeholder"]
        graph = _Graph(gm, run_args, "fx")
        if _find_attention(graph):
            # fx inlines every module it does not keep as a leaf, so which ran (and how often)
            # comes from one eager run.
            graph.call_counts = {path: c.count for path, c in _record_calls(model, args, kwargs).items()}
            return graph
    except Exception:  # fx cannot trace most transformers models; export handles them
        pass
    try:
        # On data-dependent shapes torch prints the partial graph to stderr; the error says enough.
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as exc:
        raise LimeError(
            f"could not trace {type(model).__name__} with torch.fx or torch.export ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass example_inputs= that the model "
            "accepts, or explicit LimeConfig(sites=[...])"
        ) from exc
    gm = ep.module()
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return _Graph(gm, flat, "export", root=model)


def _param_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def _image_token_count(model: nn.Module, pixels: torch.Tensor) -> int:
    """How many image tokens one image becomes in a VLM's text, from its own feature function."""
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    feats = getattr(out, "pooler_output", None) if not isinstance(out, (torch.Tensor, list, tuple)) else out
    feats = feats if feats is not None else getattr(out, "last_hidden_state", out)
    if isinstance(feats, (list, tuple)):
        feats = feats[0]
    return feats.numel() // feats.shape[-1] // pixels.shape[0] if feats.dim() == 3 else feats.numel() // feats.shape[-1]


def _config_value(config: Any, *names: str) -> Any:
    """The first of ``names`` set on ``config`` or on one of its sub-configs (vision, audio, backbone)."""
    subs = [getattr(config, f"{kind}_config", None) for kind in ("vision", "audio", "backbone", "encoder")] + [config]
    for sub in subs:
        for name in names:
            value = getattr(sub, name, None) if sub is not None else None
            if value is not None:
                return value
    return None


def _random(shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _non_text_inputs(model: nn.Module, config: Any, params: Any, batch: int, seq_len: int) -> list[dict]:
    """Candidate pixel and audio inputs, first the likeliest; a layout a config cannot tell
    (frames before or after mel bins) gives one candidate each."""
    device, dtype = _trace_device(model), _param_dtype(model)[1]
    found: list[dict] = [{}]
    if "pixel_values" in params:
        size = _config_value(config, "image_size")
        if size is not None or not any(n in params for n in ("input_ids", "input_features", "input_values")):
            # A vision model whose config names no image size (a conv backbone): 64 px divides
            # the usual patch sizes and strides.
            size = 64 if size is None else size if isinstance(size, int) else size[0]
            channels = _config_value(config, "num_channels") or 3
            found = [{**f, "pixel_values": _random((batch, channels, size, size), device, dtype)} for f in found]
    bins = _config_value(config, "num_mel_bins", "feature_size", "input_feat_size", "n_mels")
    if "input_features" in params and bins:
        # Speech encoders downsample their frames by 2 to at most max_source_positions.
        frames = 2 * (_config_value(config, "max_source_positions") or 32)
        found = [{**f, "input_features": _random(shape, device, dtype)}
                 for f in found for shape in ((batch, bins, frames), (batch, frames, bins))]
    if "input_values" in params:
        length = _config_value(config, "max_length")
        # A spectrogram patch model (frames x mel bins) or raw audio (a conv front end).
        shapes = [(batch, length, bins)] if length and bins else []
        found = [{**f, "input_values": _random(shape, device, dtype)} for f in found for shape in shapes + [(batch, 4000)]]
    return found


def default_example_inputs(model: nn.Module, batch: int = 1, seq_len: int = 8) -> Inputs:
    """A tiny input for every stack of a transformers model, built from its config.

    Token ids for a text model, pixels for a vision tower, mel features or raw audio for a
    speech encoder, and all of them together where the model takes them: decoder ids of
    another length for an encoder-decoder, pixels for a dual tower, and for a VLM ids that
    hold as many image tokens as its ``get_image_features`` returns for one image. Where the
    config leaves a layout open, the candidates are run once each and the first that runs wins.
    """
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    device = _trace_device(model)
    candidates = _non_text_inputs(model, config, params, batch, seq_len) if config is not None else [{}]
    if len(candidates) > 1:
        candidates = [next((c for c in candidates if _runs(model, c)), candidates[0])]
    kwargs: dict = candidates[0]
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
        if "input_ids" in params and vocab:
            ids = torch.arange(seq_len).remainder(vocab)
            image_token = getattr(config, "image_token_id", None)
            image_token = getattr(config, "image_token_index", None) if image_token is None else image_token
            if image_token is not None and "pixel_values" in kwargs and hasattr(model, "get_image_features"):
                ids = torch.where(ids == image_token, (image_token + 1) % vocab, ids)
                count = _image_token_count(model, kwargs["pixel_values"][:1])
                ids = torch.cat([torch.full((count,), image_token), ids])
            kwargs["input_ids"] = ids.repeat(batch, 1).to(device)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params and vocab:
            # Another length than the encoder's, as in real use.
            kwargs["decoder_input_ids"] = torch.arange(1, seq_len - 2).remainder(vocab).repeat(batch, 1).to(device)
    unbuilt = [name for name in ("pixel_values", "input_features") if name in params and name not in kwargs]
    if kwargs and unbuilt and "input_ids" in kwargs:
        # Tracing the text alone would leave the other towers without routers, silently.
        raise LimeError(
            f"cannot build {' or '.join(unbuilt)} for {type(model).__name__} from its config, so its "
            "non-text stacks would not be traced; pass example_inputs= with every input its stacks take "
            "(e.g. what its processor returns for one image and a short text), or limeify only the part "
            "you use (e.g. its language model)"
        )
    if not kwargs:
        raise LimeError(
            f"cannot build an example input for {type(model).__name__} (no transformers config with "
            "input_ids, pixel_values, input_features or input_values); pass limeify(model, config, "
            "example_inputs=(args, kwargs)) or example_inputs=tensor"
        )
    return (), kwargs


def _runs(model: nn.Module, kwargs: dict) -> bool:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _undispatched(model, kwargs):
            model(**kwargs)
        return True
    except Exception:  # a candidate the model does not take; the next one may fit
        return False
    finally:
        model.train(was_training)


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
    """Find every attention site of ``model``, grouped into stacks, by tracing it once on a small input.

    When the whole model does not export (e.g. a vision tower with data-dependent shapes), its
    submodules are traced one at a time on the inputs they received in one eager run.
    """
    args, kwargs = normalize_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (takes_kwargs and hasattr(text, "use_cache")):
        # A KV cache in the outputs is nothing discovery needs, and export cannot return one.
        kwargs.setdefault("use_cache", False)
    was_training = model.training
    model.eval()
    # Sites name exposed K/V producers; limeify() exposes them first, so this undoes nothing there.
    undo = expose(model)
    try:
        with torch.no_grad(), _undispatched(model, (args, kwargs)):
            parts = _trace_parts(model, args, kwargs)
        ops: list[_Found | _Unresolved] = []
        for prefix, graph, above in parts:
            ops += [_prefixed(op, prefix, above) for op in _graph_ops(graph)]
        if not ops:
            kinds = "/".join(sorted({g.kind for _, g, _ in parts}))
            raise LimeError(
                f"found no attention in {type(model).__name__}: searched its {kinds} graph for "
                "scaled_dot_product_attention and matmul->softmax->matmul; if it has attention "
                "that is computed differently, pass LimeConfig(sites=[AttentionSite(...)])"
            )
        return assign_stacks(model, ops)
    finally:
        undo()
        model.train(was_training)


def execution_devices(model: nn.Module) -> dict[str, torch.device]:
    """Module path -> the device accelerate runs it on (the nearest dispatch hook's), where hooked."""
    devices: dict[str, torch.device] = {}
    for path, module in model.named_modules():
        parent = path.rpartition(".")[0] if path else None
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            devices[path] = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        elif parent is not None and parent in devices:
            devices[path] = devices[parent]
    return devices


def _trace_device(model: nn.Module, inputs: Any = None) -> torch.device:
    """Where discovery runs the model: its inputs' device, else accelerate's main execution
    device, else its first parameter's (never ``meta``)."""
    for t in torch.utils._pytree.tree_leaves(inputs):
        if isinstance(t, torch.Tensor) and not t.is_meta:
            return t.device
    device = execution_devices(model).get("")
    if device is None:
        device = _param_dtype(model)[0]
    return torch.device("cpu") if device.type == "meta" else device


@contextlib.contextmanager
def _undispatched(model: nn.Module, inputs: Any = None):
    """Let export see a model dispatched by accelerate as a plain one on one device, without
    loading or copying its weights.

    accelerate's hooks load offloaded weights and move activations between devices at call
    time (export cannot follow them), and leave ``meta`` tensors behind. For the trace, each
    hooked module runs its own forward, and each weight that is offloaded or on another device
    than the trace stands in as a constant that takes no memory (``expand`` of one number);
    small buffers on another device are copied. Discovery reads structure, not values: which
    features reach K, through reshapes, RoPE and norms.
    """
    device = _trace_device(model, inputs)
    swapped, filled = [], []
    try:
        for module in model.modules():
            if "_old_forward" in module.__dict__ and "forward" in module.__dict__:
                swapped.append((module, module.__dict__["forward"]))
                module.forward = module._old_forward
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is None or t.device == device:
                        continue
                    if t.is_meta or store is module._parameters:
                        scale = 1.0 / t.shape[-1] if t.dim() >= 2 else 1.0
                        stand_in = torch.full((), scale, dtype=t.dtype, device=device).expand(t.shape)
                    else:
                        stand_in = t.to(device)
                    filled.append((store, name, t))
                    store[name] = nn.Parameter(stand_in, requires_grad=False) if store is module._parameters else stand_in
        yield
    finally:
        for store, name, t in filled:
            store[name] = t
        for module, forward in swapped:
            module.forward = forward


@dataclass(frozen=True)
class _Unresolved:
    """An attention op whose K/V producers discovery could not name, and why."""

    attention: str
    error: LimeError


@dataclass(frozen=True)
class _Found:
    """A resolved attention op: its site, the shapes of its raw K and V (the layers of one stack
    must share them), and the modules it ran in as ``(call key, path)``, outermost first."""

    site: AttentionSite
    shapes: tuple
    chain: tuple[tuple[str, str], ...]

    @property
    def attention(self) -> str:
        return self.site.attention


def _graph_ops(graph: _Graph) -> list[_Found | _Unresolved]:
    """Each attention op of one graph, in forward order, as a site or the reason it is none."""
    attentions = _find_attention(graph)
    ops: list[_Found | _Unresolved | None] = [None] * len(attentions)
    producers = {}
    for i, att in enumerate(attentions):
        att_paths = graph.module_paths.get(att.key, ())
        try:
            producers[i] = (_producer(graph, att.key, att_paths, "key", i), _producer(graph, att.value, att_paths, "value", i))
        except Exception as exc:
            ops[i] = _Unresolved(_op_path(graph, att), _explained(exc, f"attention op #{i}"))
    if producers:
        leaves = {graph.module_output[p] for pair in producers.values() for p in pair}
        watch = {n for i in producers for n in (attentions[i].query, attentions[i].key, attentions[i].value)}
        probe = _Probe(graph.gm, leaves, watch)
        with torch.enable_grad():
            try:
                probe.run(*graph.run_args)
            except Exception as exc:
                failed = _explained(exc, "re-running the traced graph to see which features reach K and V")
                return [op or _Unresolved(_op_path(graph, attentions[i]), failed) for i, op in enumerate(ops)]
            used: dict = {}
            for i, (k, v) in producers.items():
                try:
                    site = _site(graph, i, attentions[i], k, v, probe.values, used)
                except Exception as exc:
                    ops[i] = _Unresolved(_common_parent(k[0], v[0]), _explained(exc, f"attention op #{i}"))
                    continue
                k_raw, v_raw = (probe.values[graph.module_output[p]] for p in (k, v))
                shapes = (tuple(k_raw.shape[:-1]), site.num_kv_heads, site.head_dim,
                          tuple(v_raw.shape[:-1]), site.v_head_dim)
                ops[i] = _Found(site, shapes, _chain(graph, [attentions[i].key, graph.module_output[k], graph.module_output[v]]))
    return ops


def _chain(graph: _Graph, nodes: list[fx.Node]) -> tuple[tuple[str, str], ...]:
    """The modules (with which of their calls) that ``nodes`` all ran in, from the graph's root.

    export keys a module's later calls ``@1``, ``@2``. A plain fx trace keeps only leaf
    modules: there the chain is the ancestors of the nodes' modules that ran once.
    """
    if graph.kind == "export":
        chains = [list(zip(graph.module_keys[n], graph.module_paths[n])) for n in nodes]
    else:
        paths = [p for n in nodes for p in graph.module_paths[n]]
        parts = _common_prefix([p.split(".") for p in paths]).split(".") if paths else []
        chains = [[]]
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            if graph.call_counts.get(path, 0) > 1:
                break
            if graph.call_counts.get(path) == 1:
                chains[0].append((path, path))
    common = [("", "")]
    for links in zip(*chains):
        if len(set(links)) != 1:
            break
        common.append(links[0])
    return tuple(common)


def _explained(exc: Exception, what: str) -> LimeError:
    """A discovery failure as a LimeError that says what to do (an unexpected one included)."""
    if isinstance(exc, LimeError):
        return exc
    first = str(exc).splitlines()[0] if str(exc) else ""
    error = LimeError(
        f"{what}: discovery failed ({type(exc).__name__}: {first}); describe the attention layers with "
        "LimeConfig(sites=[AttentionSite(...)]) (see the README's hand-written sites)"
    )
    error.__cause__ = exc  # the traceback stays reachable (limeify --debug)
    return error


def _op_path(graph: _Graph, att: _Attention) -> str:
    """The module an attention op runs in (export records it; a plain fx trace does not)."""
    paths = graph.module_paths.get(att.value, ()) or graph.module_paths.get(att.key, ())
    return paths[-1] if paths else ""


def _prefixed(op: _Found | _Unresolved, prefix: str, above: tuple) -> _Found | _Unresolved:
    """``op`` of the part traced at ``prefix``, in the whole model's terms; ``above``: chain
    links of the modules between the model and the part that ran (see :func:`_trace_parts`)."""
    if not prefix:
        return op
    join = lambda path: f"{prefix}.{path}" if path else prefix  # noqa: E731
    if isinstance(op, _Unresolved):
        return _Unresolved(join(op.attention), op.error)
    site = replace(op.site, attention=join(op.attention), key=replace(op.site.key, module=join(op.site.key.module)),
                   value=replace(op.site.value, module=join(op.site.value.module)))
    # Each part was traced on its first call, within the first call of each module above it.
    chain = (("", ""),) + above + tuple((join(key), join(path)) for key, path in op.chain)
    return replace(op, site=site, chain=chain)


def _trace_parts(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, _Graph, tuple]]:
    """The whole model's graph, or else graphs of the largest submodules that trace, in call order.

    With each part, the modules above it that ran (an encoder around its layers) as chain links,
    so a stack whose layers are traced part by part still opens its per-call cache on the
    deepest module that ran them all, not on the whole model (which ``generate`` never calls
    for the encoder).
    """
    try:
        return [("", _trace(model, args, kwargs), ())]
    except LimeError as exc:
        whole = exc
    try:
        calls = _record_calls(model, args, kwargs)
    except Exception:  # the model does not even run on these inputs: the trace error says more
        raise whole from None
    parts: list[tuple[int, str, _Graph]] = []
    # Modules that ran but neither they nor their parameterised children trace: any attention in
    # them would silently get no LIMe.
    opaque: list[str] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if not any(p.dim() >= 2 for p in child.parameters()):
                continue
            if child_path in calls:
                call = calls[child_path]
                try:
                    graph = _trace(child, call.args, call.kwargs)
                except LimeError:
                    graph = None
                if graph is not None:
                    if _find_attention(graph):
                        parts.append((call.order, child_path, graph))
                    continue
                if any(p.dim() >= 2 for p in child.parameters(recurse=False)):
                    opaque.append(child_path)
            visit(child_path, child)

    visit("", model)
    if opaque or not parts:
        detail = f"; of its parts, {', '.join(opaque[:5])}{' ...' if len(opaque) > 5 else ''} do not trace either" if opaque else ""
        raise LimeError(f"{whole}{detail}") from whole
    def above(path: str) -> tuple:
        names = path.split(".")
        ancestors = (".".join(names[:i]) for i in range(1, len(names)))
        return tuple((a, a) for a in ancestors if a in calls)

    return [(path, graph, above(path)) for _, path, graph in sorted(parts, key=lambda part: part[0])]


@dataclass
class _Calls:
    order: int  # of its first call among all submodules'
    args: tuple  # what that first call got
    kwargs: dict
    count: int = 1


def _record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, _Calls]:
    """Each submodule that ran in one eager forward: its first call and how often it ran."""
    calls: dict[str, _Calls] = {}
    handles = []
    for path, module in model.named_modules():
        def note(mod, a, kw, path=path):
            if path in calls:
                calls[path].count += 1
            else:
                calls[path] = _Calls(len(calls), a, kw)
        handles.append(module.register_forward_pre_hook(note, with_kwargs=True))
    try:
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def assign_stacks(model: nn.Module, ops: list[_Found | _Unresolved]) -> list[AttentionSite]:
    """Group attention ops (in forward order) into stacks and number them; see :func:`stack_names`.

    Layers of one named stack whose raw K/V differ in shape (windowed and global attention,
    pooled tokens, sliding and full layers with other head sizes) cannot mix: each shape is a
    stack of its own, named ``<stack>#1``, ``#2``, ... after the first. An op whose producers
    could not be named is dropped when it is alone in its stack (a stack's first layer has no
    router, so LIMe does not change it), and otherwise raises. Each stack's ``enclosing`` is
    the deepest module one call of which ran all its layers (where its per-call value cache
    opens): the model may call a stack's layers without calling their container's parent.
    """
    # Two attention ops in one module with K/V of their own (LiLT's text and layout streams)
    # are two stacks: name those by their K producer instead.
    producers: dict[str, set] = {}
    for op in ops:
        if isinstance(op, _Found):
            producers.setdefault(op.attention, set()).add(op.site.key.module)
    names = stack_names(model, [op.site.key.module if isinstance(op, _Found) and len(producers[op.attention]) > 1
                                else op.attention for op in ops])
    shapes: dict[str, list[tuple]] = {}
    for i, op in enumerate(ops):
        if isinstance(op, _Found):
            seen = shapes.setdefault(names[i], [])
            if op.shapes not in seen:
                seen.append(op.shapes)
            k = seen.index(op.shapes)
            names[i] = f"{names[i]}#{k}" if k else names[i]
    sizes: dict[str, int] = {}
    for name in names:
        sizes[name] = sizes.get(name, 0) + 1
    found: dict[str, list[_Found]] = {}
    for op, name in zip(ops, names):
        if isinstance(op, _Unresolved):
            if sizes[name] == 1:
                continue
            raise LimeError(f"stack {name!r}, attention at {op.attention or 'the top level'}: {op.error}") from op.error
        found.setdefault(name, []).append(op)
    enclosing = {name: _enclosing(members) for name, members in found.items()}
    sites, depth = [], {}
    for op, name in zip(ops, names):
        if isinstance(op, _Found):
            depth[name] = depth.get(name, -1) + 1
            sites.append(replace(op.site, layer=len(sites), stack=name, depth=depth[name], enclosing=enclosing[name]))
    return sites


def _enclosing(members: list[_Found]) -> str:
    common = ""
    for links in zip(*(m.chain for m in members)):
        if len(set(links)) != 1:
            break
        common = links[0][1]
    return common


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def stack_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Name the stack of each attention module path (in forward order).

    Layers of one stack are the entries of one layer container (``ModuleList``, ``Sequential``)
    at the same path inside each entry: ``model.decoder.layers.*.self_attn`` and
    ``model.decoder.layers.*.encoder_attn`` are two stacks (self- and cross-attention) of one
    decoder, ``text_model.encoder.layers.*.self_attn`` another tower's. For each path the
    deepest container that holds the same path in another entry wins. Attention modules in no
    such container (a model whose few layers are plain attributes) form one stack when no
    other stack lies among them, else a stack each.
    """
    candidates = [_container_patterns(model, path) for path in paths]
    counts: dict[str, int] = {}
    for patterns in candidates:
        for pattern in set(patterns):
            counts[pattern] = counts.get(pattern, 0) + 1
    names = [next((p for p in patterns if counts[p] > 1), None) for patterns in candidates]
    loose = [path for path, name in zip(paths, names) if name is None]
    if loose:
        common = _common_prefix([path.split(".") for path in loose])
        grouped = [name for name in names if name is not None]
        inside = any(not common or name.startswith(common + ".") for name in grouped)
        names = [name if name is not None else (path if inside else common) for path, name in zip(paths, names)]
    return names


def _container_patterns(model: nn.Module, path: str) -> list[str]:
    """``container.*.rest`` for each layer container on ``path``, deepest first."""
    parts = path.split(".") if path else []
    patterns = []
    for i in range(len(parts)):
        container = ".".join(parts[:i])
        try:
            module = model.get_submodule(container) if container else model
        except AttributeError:
            break
        if isinstance(module, _CONTAINERS):
            patterns.append(".".join(parts[:i] + ["*"] + parts[i + 1:]))
    return patterns[::-1]


def _common_prefix(paths: list[list[str]]) -> str:
    common = []
    for items in zip(*paths):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _site(graph: _Graph, i: int, att: _Attention, k: tuple[str, int], v: tuple[str, int], values: dict, used: dict) -> AttentionSite:
    (k_path, k_call), (v_path, v_call) = k, v
    k_leaf = values[graph.module_output[k]]
    v_leaf = values[graph.module_output[v]]
    key = KVSource(k_path, *_feature_slice(k_leaf, values[att.key], f"attention #{i} key"))
    value = KVSource(v_path, *_feature_slice(v_leaf, values[att.value], f"attention #{i} value"))
    q = values[att.query]
    d, dv = q.shape[-1], values[att.value].shape[-1]
    k_width = key.width or k_leaf.shape[-1]
    v_width = value.width or v_leaf.shape[-1]
    if key.blocks > 1 and (key.end - key.start) % d:
        # Each head's K block is only part of the K its query meets: multi-head latent attention
        # routes the per-head content part (k_nope) and leaves the shared rotary part as it is.
        d = key.end - key.start
    if k_width % d or v_width % dv or k_width // d != v_width // dv:
        raise LimeError(
            f"attention #{i}: K has {k_width} features and V {v_width}, not a whole number of "
            f"heads of size {d}/{dv} each with equal head counts; pass LimeConfig(sites=...)"
        )
    for src, call in ((key, k_call), (value, v_call)):
        if (src.module, call, src.start) in used and used[src.module, call, src.start] != i:
            raise LimeError(f"the output {src.module} feeds two attention ops (#{used[src.module, call, src.start]} and #{i}); not supported")
        used[src.module, call, src.start] = i
    return AttentionSite(
        layer=i,
        attention=_common_parent(k_path, v_path),
        key=key,
        value=value,
        num_kv_heads=k_width // d,
        head_dim=d,
        value_head_dim=dv if dv != d else None,
        num_heads=_query_heads(q, v_leaf, values[att.value]),
        hidden_size=_input_features(graph, k_path),
    )


def _query_heads(q: torch.Tensor, v_leaf: torch.Tensor, value: torch.Tensor) -> int | None:
    """Query heads of an attention op: ``[..., H, T, d]``, or ``[B*H, T, d]`` where the batch is
    folded into the heads (``bmm``), unfolded by the V producer's batch (its tokens per value)."""
    if q.dim() >= 4:
        return q.shape[-3]
    if q.dim() == 3:
        batch = v_leaf.numel() // (v_leaf.shape[-1] * value.shape[-2])
        return q.shape[0] // batch if batch and q.shape[0] % batch == 0 else None
    return None


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
            # The first op of the projection reads its input (or, quantized, a scaled copy of it).
            vals = [m.meta.get("val") for m in graph.data_inputs(node)]
            vals = [v for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 2]
            return int(vals[0].shape[-1]) if vals else None
    return None
