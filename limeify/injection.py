"""limeify(): install routers and value-cache hooks on a model in place; unlimeify() removes them.

Hooks are registered once, at limeify time: on the modules that produce K and V, and on the
module enclosing each stack's attention layers (an encoder, a decoder, a tower), to open and
close the value cache of each call of that stack (limeify/calls.py). Each stack has its own
CallTracker, so a stack's layers only ever read K/V of their own stack and call. At call time
a hook only writes raw K/V into the cache and calls the router it looks up on the attention
module, never one captured in a closure: PEFT may swap the router for a wrapper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calls import CallTracker, ValueCache
from .mixing import record
from .config import LimeConfig
from .discovery import discover_sites, execution_devices
from .errors import LimeError
from . import restructure
from .routers import MECHANISMS, ROUTER_ATTR, CallRouters, Router
from .sites import AttentionSite, format_sites, shared_attention, stacks_of

STATE_ATTR = "_lime_state"


@dataclass(frozen=True)
class _Entry:
    role: str
    layer: int
    depth: int
    start: int | None
    end: int | None
    blocks: int
    step: int | None
    heads: int
    attention: nn.Module
    routed: bool
    # The producer's call this entry is for, and the router's name in its CallRouters when the
    # attention module has several sites (None: the module's lime_router is the router).
    call: int = 0
    router_key: str | None = None


class LimeState:
    """Everything limeify added to a model, so it can be found and removed again."""

    def __init__(self, config: LimeConfig, sites: list[AttentionSite], router_layers: list[int]) -> None:
        self.config = config
        self.sites = sites
        self.router_layers = router_layers
        self.trackers = {name: CallTracker(len(group)) for name, group in stacks_of(sites).items()}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.producer_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.producer_hooks: dict[str, list[_ProducerHook]] = {}
        self.router_owners: dict[int, nn.Module] = {}
        self.owner: nn.Module | None = None
        self.warned_adapter = False

    def ensure_bound(self, stack: str) -> None:
        """Re-hook the K/V producers if one was swapped out of the module tree since they were hooked.

        PEFT replaces modules in place: get_peft_model wraps a projection in a LoRA layer,
        merge_and_unload and unload put a plain layer back. The hooks must follow, or LIMe would
        mix K/V before the LoRA update, or not at all. Checked at the start of each call of a
        stack: one dict lookup per producer.
        """
        for hook in self.producer_hooks.get(stack, ()):
            if hook.parent._modules.get(hook.name) is not hook.module:
                _rebind_state(self)
                break
        self._check_adapter()

    def _check_adapter(self) -> None:
        """Warn (once until it changes) when the active PEFT adapter carries no routers of its own.

        PEFT switches all router copies together, so one router tells for all.
        """
        owner = next(iter(self.router_owners.values()), None)
        wrapper = owner._modules.get(ROUTER_ATTR) if owner is not None else None
        copies, name = _adapter_copies(wrapper) if wrapper is not None else (None, None)
        missing = bool(copies) and name is None and not getattr(wrapper, "disable_adapters", False)
        if missing and not self.warned_adapter:
            warnings.warn(
                "the active PEFT adapter has no LIMe routers of its own (it was added without "
                "'lime_router' in modules_to_save, e.g. by add_weighted_adapter), so LIMe uses the "
                "routers limeify installed (identity unless trained before wrapping); "
                "limeify.add_weighted_adapter combines the adapters' routers too",
                stacklevel=2,
            )
        self.warned_adapter = missing

    def remove(self) -> None:
        for handle in self.handles + self.producer_handles:
            handle.remove()
        self.handles.clear()
        self.producer_handles.clear()
        self.producer_hooks.clear()
        for owner in self.router_owners.values():
            if ROUTER_ATTR in owner._modules:
                del owner._modules[ROUTER_ATTR]
        self.router_owners.clear()
        if self.owner is not None:
            restructure.restore(self.owner)


def get_state(model: nn.Module) -> LimeState | None:
    # __dict__, not getattr: PEFT wrappers forward unknown attributes to the wrapped model.
    return model.__dict__.get(STATE_ATTR)


def is_limeified(model: nn.Module) -> bool:
    """True if ``model`` (or the model inside a PEFT wrapper) carries LIMe routers and hooks."""
    return _find_state(model) is not None


def _find_state(model: nn.Module) -> tuple[nn.Module, LimeState] | None:
    for module in model.modules():
        state = get_state(module)
        if state is not None:
            return module, state
    return None


def _resolve(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise LimeError(f"{what} {path!r} is not a submodule of {type(model).__name__}") from None


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


class _ProducerHook:
    """Forward hook on a K/V producer: record raw K/V, return the router's mix.

    A callable object rather than a closure so that ``copy.deepcopy`` of a limeified model
    gives a copy whose hooks refer to the copy's own modules, routers and value cache.
    """

    def __init__(self, tracker: CallTracker, entries: list[_Entry], parent: nn.Module, name: str, module: nn.Module) -> None:
        by_call: dict[int, list[_Entry]] = {}
        for e in entries:
            by_call.setdefault(e.call, []).append(e)
        calls = [sorted(by_call[c], key=lambda e: (e.start or 0)) for c in sorted(by_call)]
        layout = [(e.role, e.start, e.end, e.blocks, e.step) for e in calls[0]]
        if any([(e.role, e.start, e.end, e.blocks, e.step) for e in c] != layout for c in calls):
            raise LimeError(f"{name} runs several attention layers but with different K/V slices; give each call the same slices")
        entries = calls[0]
        # A module run for several layers of its stack: the i-th call in a forward mixes for
        # the i-th of them (its own depth and router); the layout is the same for all.
        self.calls = calls if len(calls) > 1 else None
        self.whole = len(entries) == 1 and entries[0].start is None
        self.tracker = tracker
        self.entries = entries
        self.parent, self.name, self.module = parent, name, module
        # A fused output (e.g. GPT-2's qkv) is cut once with split, not sliced per K/V: the
        # backward of one split is one concatenation, where each slice's backward would
        # zero-fill a full-width gradient and add them up. A per-head layout (GPT-NeoX) is
        # viewed as [..., blocks, step] first and cut the same way inside each block.
        self.sizes: list[int] = []
        self.pieces: list[int] = []
        self.covered = 0
        layouts = {(e.blocks, e.step) for e in entries}
        if len(layouts) > 1:
            raise LimeError(f"{name}: its K/V use different per-head layouts {sorted(layouts, key=str)}; not supported")
        self.blocks, self.step = layouts.pop()
        if not self.whole:
            for e in self.entries:
                if e.start < self.covered:
                    raise LimeError(f"{name}: K/V slices overlap at {e.start}; give disjoint slices in LimeConfig(sites=...)")
                if e.start > self.covered:
                    self.sizes.append(e.start - self.covered)
                self.pieces.append(len(self.sizes))
                self.sizes.append(e.end - e.start)
                self.covered = e.end

    def __call__(self, mod: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            # A projection returning extras beside its output (I-BERT's quantized linear returns
            # (output, scaling factor)): K/V are its one matrix-shaped output.
            at = [i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2]
            if len(at) != 1:
                raise LimeError(f"{self.name} returned {len(output)} values, not one output holding K/V; "
                                "pass LimeConfig(sites=...) naming a module that returns K/V")
            mixed = self(mod, args, output[at[0]])
            return type(output)(mixed if i == at[0] else t for i, t in enumerate(output))
        hidden = args[0] if args else None
        cache = self.tracker.current(self.entries[0].depth, mod, args)
        entries = self.entries if self.calls is None else self.calls[self.tracker.call_index(cache, self, len(self.calls), args)]
        if self.whole:
            return self._mix(entries[0], output, hidden, cache)
        lead, features = output.shape[:-1], output.shape[-1]
        if self.blocks > 1:
            if features != self.blocks * self.step:
                raise LimeError(f"{self.name} produced {features} features, not {self.blocks} blocks of {self.step}")
            output = output.view(*lead, self.blocks, self.step)
        tail = output.shape[-1] - self.covered
        if tail < 0:
            raise LimeError(f"{self.name} produced {output.shape[-1]} features, but its K/V slices end at {self.covered}")
        pieces = list(output.split(self.sizes + [tail] if tail else self.sizes, dim=-1))
        for e, i in zip(entries, self.pieces):
            piece = pieces[i] if self.blocks == 1 else pieces[i].reshape(*lead, -1)
            mixed = self._mix(e, piece, hidden, cache)
            pieces[i] = mixed if self.blocks == 1 else mixed.view(*lead, self.blocks, -1)
        out = torch.cat(pieces, dim=-1)
        return out if self.blocks == 1 else out.view(*lead, features)

    def _mix(self, e: _Entry, raw: torch.Tensor, hidden: torch.Tensor | None, cache: ValueCache) -> torch.Tensor:
        if e.routed:
            router = e.attention._modules[ROUTER_ATTR]
            if e.router_key is None:
                return router(raw, cache, e.role, hidden)
            return router(raw, cache, e.role, hidden, e.router_key)
        return record(raw, cache, e.role, e.depth, e.heads)


class _CallBoundary:
    """Pre-hook opening and forward hook closing a call's value cache on the enclosing module."""

    def __init__(self, state: LimeState, stack: str, opening: bool) -> None:
        self.state, self.stack, self.tracker, self.opening = state, stack, state.trackers[stack], opening

    def __call__(self, mod: nn.Module, *args) -> None:
        if self.opening:
            self.state.ensure_bound(self.stack)
            self.tracker.open()
        else:
            self.tracker.close()


def _enclosing_module(model: nn.Module, sites: list[AttentionSite]) -> nn.Module:
    """Deepest module that is called once per forward and contains every attention layer.

    Discovery names it in the sites' ``enclosing``; hand-written sites without it get the deepest
    common parent of their producers that is no layer container.
    """
    named = {s.enclosing for s in sites if s.enclosing is not None}
    if named:
        return _resolve(model, named.pop(), "enclosing module")
    paths = [s.key.module.split(".") for s in sites] + [s.value.module.split(".") for s in sites]
    common = []
    for items in zip(*paths):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    common = common[: min(len(p) for p in paths) - 1] if len(sites) == 1 else common
    while common:
        module = model.get_submodule(".".join(common))
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and not any(
            s.key.module == ".".join(common) or s.value.module == ".".join(common) for s in sites
        ):
            return module
        common.pop()
    return model


def _validate_sites(model: nn.Module, sites: list[AttentionSite]) -> None:
    if not sites:
        raise LimeError("LimeConfig.sites is empty; give at least one AttentionSite or leave it None")
    for name, group in stacks_of(sites).items():
        for depth, site in enumerate(group):
            if site.position != depth:
                raise LimeError(
                    f"stack {name or '(model)'!r}: its sites must be in forward order with depth 0, 1, ...; "
                    f"site {site.layer} says depth {site.position} where {depth} was expected"
                )
    for i, site in enumerate(sites):
        if site.layer != i:
            raise LimeError(f"sites must be in forward order with layer == position; site #{i} says layer {site.layer}")
        if site.num_kv_heads < 1 or site.head_dim < 1:
            raise LimeError(f"site {i}: num_kv_heads and head_dim must be positive, got {site.num_kv_heads}, {site.head_dim}")
        _resolve(model, site.attention, f"site {i}: attention module")
        for role, src, dim in (("key", site.key, site.head_dim), ("value", site.value, site.v_head_dim)):
            mod = _resolve(model, src.module, f"site {i}: {role} module")
            width = site.num_kv_heads * dim
            if src.start is not None and (src.end is None or src.width != width):
                raise LimeError(
                    f"site {i}: {role} {src} takes {src.width} features, not num_kv_heads*head_dim = {width}"
                )
            if src.blocks > 1 and (src.step is None or src.end > src.step):
                raise LimeError(f"site {i}: {role} {src}: each of its {src.blocks} blocks must fit in step={src.step}")
            last = width if src.start is None else src.end + (src.blocks - 1) * (src.step or 0)
            out = getattr(mod, "out_features", None) or getattr(mod, "nf", None)
            if out is not None and last > out:
                raise LimeError(f"site {i}: {role} needs {last} output features but {src.module} has {out}")
    _validate_shared(model, sites)


def _validate_shared(model: nn.Module, sites: list[AttentionSite]) -> None:
    """Sites with the same K/V producers must be successive calls of them in one stack, which
    names the module whose one call runs them all."""
    by_producers: dict[tuple, list[AttentionSite]] = {}
    for site in sites:
        by_producers.setdefault((site.key.module, site.value.module), []).append(site)
    repeated = {id(s) for group in by_producers.values() if len(group) > 1 for s in group}
    for group in by_producers.values():
        if len(group) > 1 and (len({s.stack for s in group}) > 1 or len({(s.key, s.value) for s in group}) > 1):
            raise LimeError(
                f"sites {[s.layer for s in group]} share their K/V producers but not one stack and the same "
                "K/V features; sites of one producer must be its successive calls in one stack"
            )
    for name, group in stacks_of(sites).items():
        named = {s.enclosing for s in group if s.enclosing is not None}
        if len(named) > 1:
            raise LimeError(f"stack {name or '(model)'!r}: its sites name different enclosing modules {sorted(named)}")
        if not named and any(id(s) in repeated for s in group):
            raise LimeError(
                f"stack {name or '(model)'!r} runs one attention module for several layers, so limeify needs the "
                "module whose single call runs them all (where each call's value cache opens): give its sites "
                "AttentionSite(..., enclosing='<path, e.g. encoder>'); discovery fills it in from torch.export"
            )
        if named:
            _resolve(model, next(iter(named)), f"stack {name or '(model)'!r}: enclosing module")


def limeify(model: nn.Module, config: LimeConfig | None = None, example_inputs: Any = None) -> nn.Module:
    """Retrofit LIMe onto ``model`` in place and return it.

    With the default ``LimeConfig()`` (static lookup, identity init) the model's outputs are
    unchanged until its routers are trained. Attention sites are discovered by tracing the
    model once on ``example_inputs`` (built from ``model.config`` when omitted), unless
    ``config.sites`` gives them.

    Raises:
        LimeError: the model is already limeified, has no attention that can be analysed,
            or the given sites do not match it. The model is left as it was.
    """
    config = config or LimeConfig()
    if is_limeified(model):
        raise LimeError("model is already limeified; call limeify.unlimeify(model) first to start over")
    # Modules that hide their K/V projection (nn.MultiheadAttention) expose it before discovery.
    undo = restructure.expose(model)
    try:
        sites = list(config.sites) if config.sites is not None else discover_sites(model, example_inputs)
        _validate_sites(model, sites)
        router_layers = config.router_layers(sites)
        for site in sites:
            owner = _resolve(model, site.attention, "attention module")
            if ROUTER_ATTR in owner._modules:
                raise LimeError(f"{site.attention} already has a {ROUTER_ATTR!r}; remove it (or unlimeify) first")
        restructure.settle(model, {src.module for site in sites for src in (site.key, site.value)})
    except BaseException:
        undo()
        raise

    state = LimeState(config, sites, router_layers)
    state.owner = model
    try:
        _install(model, state)
    except BaseException:
        state.remove()
        raise
    setattr(model, STATE_ATTR, state)
    from . import distributed  # it builds on this module

    if distributed.is_sharded(model):
        # Routers FSDP does not manage would train separately on each rank.
        try:
            distributed.shard_routers(model)
        except BaseException:
            unlimeify(model)
            raise
    return model


def _install(model: nn.Module, state: LimeState) -> None:
    config, sites = state.config, state.sites
    params = next((p for p in model.parameters() if p.is_floating_point()), None)
    mechanism = MECHANISMS[config.mechanism]
    owners = {site.layer: _resolve(model, site.attention, "attention module") for site in sites}
    shared = shared_attention(sites)
    dtype = config.resolve_router_dtype(params.dtype if params is not None else torch.float32)
    executes_on = execution_devices(model)
    for layer in state.router_layers:
        router: Router = mechanism(sites[layer].position, sites[layer], config.init, **config.mechanism_kwargs)
        router.to(device=_router_device(model, sites[layer], executes_on, params), dtype=dtype)
        owner = owners[layer]
        if sites[layer].attention in shared:
            if ROUTER_ATTR not in owner._modules:
                owner.add_module(ROUTER_ATTR, CallRouters())
            owner._modules[ROUTER_ATTR].add_module(str(layer), router)
        else:
            owner.add_module(ROUTER_ATTR, router)
        state.router_owners[layer] = owner

    _bind_producers(model, state)

    for name, group in stacks_of(sites).items():
        enclosing = _enclosing_module(model, group)
        tracker = state.trackers[name]
        tracker.where = f"{type(enclosing).__name__} (stack {name})" if name else type(enclosing).__name__
        state.handles.append(enclosing.register_forward_pre_hook(_CallBoundary(state, name, True)))
        state.handles.append(enclosing.register_forward_hook(_CallBoundary(state, name, False), always_call=True))


def _router_device(model: nn.Module, site: AttentionSite, executes_on: dict, params: torch.Tensor | None) -> torch.device | None:
    """Where the layer computes: its K producer's weights, or the device accelerate runs it on
    when they are offloaded (meta), so a model split over devices keeps each router by its layer."""
    weight = next(iter(_resolve(model, site.key.module, "K producer").parameters()), None)
    if weight is not None and not weight.is_meta:
        return weight.device
    device = executes_on.get(site.key.module)
    if device is not None:
        return device
    return params.device if params is not None and not params.is_meta else None


def _bind_producers(model: nn.Module, state: LimeState) -> None:
    """Hook whatever module now sits at each producer path (a PEFT wrapper after get_peft_model)."""
    routed = set(state.router_layers)
    shared = shared_attention(state.sites)
    by_module: dict[str, list[_Entry]] = {}
    stack_of: dict[str, set[str]] = {}
    calls: dict[tuple[str, str], int] = {}
    for site in state.sites:
        owner = _resolve(model, site.attention, "attention module")
        for role, src, dim in (("k", site.key, site.head_dim), ("v", site.value, site.v_head_dim)):
            call = calls[src.module, role] = calls.get((src.module, role), -1) + 1
            entry = _Entry(role, site.layer, site.position, src.start, src.end, src.blocks, src.step, site.num_kv_heads,
                           owner, site.layer in routed, call, str(site.layer) if site.attention in shared else None)
            by_module.setdefault(src.module, []).append(entry)
            stack_of.setdefault(src.module, set()).add(site.stack)
    for path, entries in by_module.items():
        if any(e.start is None for e in entries) and len({e.role for e in entries}) > 1:
            raise LimeError(f"{path} is both K and V of a site with no slices; give K and V slices in LimeConfig(sites=...)")
        if len(stack_of[path]) > 1:
            raise LimeError(f"{path} produces K/V for two stacks ({sorted(stack_of[path])}); give each stack its own producers")
        module = _resolve(model, path, "K/V producer")
        parent, name = _parent_and_name(model, path)
        stack = next(iter(stack_of[path]))
        hook = _ProducerHook(state.trackers[stack], entries, parent, name, module)
        state.producer_handles.append(module.register_forward_hook(hook))
        state.producer_hooks.setdefault(stack, []).append(hook)


def rebind(model: nn.Module) -> nn.Module:
    """Re-attach LIMe's hooks to the modules now at the K/V producer paths.

    Each call does this by itself when it finds a producer swapped (a PEFT LoRA wrapper, or
    the plain layer ``merge_and_unload`` puts back); call it to do so before the next forward.
    """
    found = _find_state(model)
    if found is None:
        raise LimeError(f"{type(model).__name__} is not limeified; call limeify(model) first")
    _rebind_state(found[1])
    return model


def _rebind_state(state: LimeState) -> None:
    for handle in state.producer_handles:
        handle.remove()
    state.producer_handles.clear()
    state.producer_hooks.clear()
    _bind_producers(state.owner, state)


def unlimeify(model: nn.Module) -> nn.Module:
    """Remove routers and hooks; parameters, state_dict and outputs are as before limeify."""
    found = _find_state(model)
    if found is None:
        raise LimeError(f"{type(model).__name__} is not limeified; nothing to remove")
    owner, state = found
    state.remove()
    delattr(owner, STATE_ATTR)
    return model


def lime_state(model: nn.Module) -> LimeState:
    found = _find_state(model)
    if found is None:
        raise LimeError(f"{type(model).__name__} is not limeified; call limeify(model) first")
    return found[1]


def _adapter_copies(module: nn.Module) -> tuple[nn.ModuleDict | None, str | None]:
    """A PEFT wrapper's per-adapter router copies and the active adapter's name among them."""
    for attr in ("modules_to_save", "ln_tuning_layers"):
        copies = getattr(module, attr, None)
        if isinstance(copies, nn.ModuleDict):
            # PEFT leaves active_adapter [] on a wrapper when the active adapter has no copy there.
            names = getattr(module, "active_adapters", None) or []
            names = [names] if isinstance(names, str) else names
            return copies, next((n for n in names if isinstance(n, str) and n in copies), None)
    return None, None


def active_router(module: nn.Module) -> Router:
    """The router a forward pass uses: unwraps PEFT wrappers to the active adapter's copy.

    An active adapter without router copies (one added without ``lime_router`` in its
    ``modules_to_save``), or adapters disabled, use the wrapped routers limeify installed.
    """
    copies, name = _adapter_copies(module)
    if copies is None:
        return module
    if name is not None and not getattr(module, "disable_adapters", False):
        return copies[name]
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module.original_module


def routers(model: nn.Module) -> dict[int, Router]:
    """Routers in layer order, as ``{layer: router}``."""
    state = lime_state(model)
    found = {}
    for layer, owner in sorted(state.router_owners.items()):
        router = active_router(owner._modules[ROUTER_ATTR])
        found[layer] = router[str(layer)] if isinstance(router, CallRouters) else router
    return found


def router_prefix(site: AttentionSite, shared: bool) -> str:
    """Where a site's router tensors sit in the model's state_dict (``<attention>.lime_router.``)."""
    path = f"{site.attention}.{ROUTER_ATTR}." if site.attention else f"{ROUTER_ATTR}."
    return f"{path}{site.layer}." if shared else path


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The attention sites a limeified model mixes, in layer order."""
    return list(lime_state(model).sites)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each router's mixing weight, in layer order (``[G, (l+1)*G]`` for "static")."""
    return [r.mixing_matrix() for r in routers(model).values()]


def describe(model: nn.Module) -> str:
    """The mechanism, which layers have routers, and the attention sites grouped by stack."""
    state = lime_state(model)
    return f"mechanism={state.config.mechanism}, routers on layers {state.router_layers}\n" + format_sites(state.sites)
