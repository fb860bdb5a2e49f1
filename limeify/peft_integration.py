"""PEFT composition: router-only PeftModels, and LIMe together with LoRA.

PEFT's method registry only accepts names already in its closed ``PeftType`` enum, so limeify
does not register a PEFT method of its own. It rides on two public PEFT mechanisms instead:

* router-only: ``LNTuningConfig(target_modules=["lime_router"])``. LN tuning trains a copy of
  each targeted module whatever its type, which is exactly "train only the routers";
  ``save_pretrained`` writes just the router copies and ``PeftModel.from_pretrained`` restores
  them onto a base model limeified with the same LimeConfig.
* with LoRA: ``LoraConfig(..., modules_to_save=["lime_router"])`` trains LoRA and routers
  together. LIMe's hooks are then re-attached to the LoRA-wrapped projections so the routers
  mix K/V *after* LoRA's update.

In both cases the hooks look the router up on its attention module at call time, so they
always call PEFT's wrapper and never a stale frozen copy.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

from peft import LNTuningConfig, PeftConfig, PeftModel, get_peft_model
import torch
from torch import nn

from .config import LimeConfig
from .errors import LimeError
from .injection import is_limeified, lime_state, limeify, rebind
from .discovery import discover_sites
from .files import staged_directory
from .persistence import CONFIG_NAME, check_saved_stacks, write_lime_config
from .routers import ROUTER_ATTR


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "generate"):
        return "SEQ_2_SEQ_LM"
    return None


def get_lime_peft_model(
    model: nn.Module,
    lime_config: LimeConfig | None = None,
    peft_config: PeftConfig | None = None,
    adapter_name: str = "default",
    example_inputs=None,
) -> PeftModel:
    """Limeify ``model`` (unless it already is) and wrap it in a PeftModel.

    Without ``peft_config`` only the routers train (LN-tuning of the ``lime_router`` modules).
    With a ``LoraConfig`` the routers are added to its ``modules_to_save`` and train with LoRA.
    """
    if not is_limeified(model):
        limeify(model, lime_config, example_inputs=example_inputs)
    elif lime_config is not None:
        raise LimeError("model is already limeified; pass lime_config=None or unlimeify it first")
    if peft_config is None:
        peft_config = LNTuningConfig(target_modules=[ROUTER_ATTR], task_type=_task_type(model))
    elif isinstance(peft_config, LNTuningConfig):
        pass
    else:
        saved = list(getattr(peft_config, "modules_to_save", None) or [])
        if ROUTER_ATTR not in saved:
            peft_config = copy.deepcopy(peft_config)  # the caller's config stays as it was
            peft_config.modules_to_save = saved + [ROUTER_ATTR]
    with warnings.catch_warnings():
        # LN tuning works with any module type; PEFT warns about every non-norm layer it wraps.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name)
    rebind(peft_model)
    return peft_model


def save_lime_peft(peft_model: PeftModel, directory: str | os.PathLike) -> None:
    """``peft_model.save_pretrained(directory)`` plus the LimeConfig needed to rebuild the base.

    Atomically, as :func:`limeify.save_lime`: a failure leaves ``directory`` as it was.
    """
    with staged_directory(directory) as tmp:
        peft_model.save_pretrained(tmp)
        write_lime_config(peft_model, tmp)


def load_lime_peft(base: nn.Module, directory: str | os.PathLike, is_trainable: bool = False, example_inputs=None) -> PeftModel:
    """Limeify ``base`` with the saved LimeConfig and load the PEFT adapter onto it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LimeError(f"missing {path}; save with limeify.save_lime_peft (or limeify the base yourself and use PeftModel.from_pretrained)")
    meta = json.loads(path.read_text())
    config = LimeConfig.from_dict(meta["config"])
    config.sites = discover_sites(base, example_inputs)
    check_saved_stacks(meta.get("fingerprint", {}), config.sites, directory)
    limeify(base, config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
    rebind(model)
    return model


def add_weighted_adapter(peft_model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str, **kwargs) -> None:
    """PEFT's ``add_weighted_adapter`` that combines the adapters' LIMe routers as well.

    PEFT combines the LoRA weights (``kwargs`` such as ``combination_type`` go to it) but
    copies no ``modules_to_save``, and refuses adapters that each carry their own routers.
    Static routers are linear maps of the stacked K/V, so the new adapter's router is
    ``sum(weight * router)`` over ``adapters`` (an adapter without routers counts with the
    routers limeify installed). Other mechanisms' routers are not linear in their parameters:
    they raise ``LimeError``.
    """
    state = lime_state(peft_model)
    if state.config.mechanism != "static":
        raise LimeError(
            f"{state.config.mechanism!r} routers are not linear in their parameters, so a weighted sum of "
            "adapters' routers is not the weighted sum of their mixes; combine adapters with static routers, "
            "or train the combined adapter's routers"
        )
    if len(adapters) != len(weights):
        raise LimeError(f"{len(adapters)} adapters but {len(weights)} weights")
    # A module running several layers holds all their routers in one wrapper: count it once.
    wrappers = list({id(w): w for w in (owner._modules[ROUTER_ATTR] for owner in state.router_owners.values())}.values())
    if not all(isinstance(getattr(w, "modules_to_save", None), nn.ModuleDict) for w in wrappers):
        raise LimeError("the routers are not PEFT modules_to_save; wrap the model with limeify.get_lime_peft_model and a LoraConfig")
    # PEFT refuses to combine adapters with router copies on one module: while it combines the
    # LoRA weights, it sees one of them (the active one, which it re-activates meanwhile).
    sources = [{a: w.modules_to_save[a] for a in adapters if a in w.modules_to_save} for w in wrappers]
    hidden = []
    for w in wrappers:
        shown = next((a for a in w.active_adapters if a in adapters), adapters[0])
        hidden.append({a: w.modules_to_save.pop(a) for a in adapters if a != shown and a in w.modules_to_save})
    try:
        peft_model.add_weighted_adapter(adapters, weights, adapter_name, **kwargs)
    finally:
        for w, copies in zip(wrappers, hidden):
            w.modules_to_save.update(copies)
    for w, copies in zip(wrappers, sources):
        w.update(adapter_name)
        with torch.no_grad():
            for name, target in w.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                target.copy_(sum(weight * copies.get(a, w.original_module).state_dict()[name] for a, weight in zip(adapters, weights)))
