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
from torch import nn

from .config import LimeConfig
from .errors import LimeError
from .injection import is_limeified, limeify, rebind
from .discovery import discover_sites
from .persistence import CONFIG_NAME, check_saved_stacks, save_lime_config
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
    """``peft_model.save_pretrained(directory)`` plus the LimeConfig needed to rebuild the base."""
    peft_model.save_pretrained(directory)
    save_lime_config(peft_model, directory)


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
