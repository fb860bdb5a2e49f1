"""limeify: retrofit Layer-Integrated Memory (LIMe) onto existing transformer models."""

from .config import LimeConfig
from .conversion import convert, from_pretrained, save_pretrained
from .discovery import discover_sites
from .errors import LimeError
from .calls import ValueCache
from .injection import attention_sites, describe, is_limeified, limeify, rebind, router_parameters, routers, unlimeify
from .peft_integration import add_weighted_adapter, get_lime_peft_model, load_lime_peft, save_lime_peft
from .persistence import load_lime, read_lime, save_lime
from .training import mark_only_routers_trainable, print_trainable_parameters, router_param_groups
from .mixing import record, static_mix, token_mix
from .routers import Router, available_mechanisms, register_mechanism
from .sites import AttentionSite, KVSource

__version__ = "0.2.0"

__all__ = [
    "AttentionSite",
    "add_weighted_adapter",
    "attention_sites",
    "KVSource",
    "LimeConfig",
    "LimeError",
    "Router",
    "ValueCache",
    "available_mechanisms",
    "convert",
    "from_pretrained",
    "describe",
    "discover_sites",
    "get_lime_peft_model",
    "is_limeified",
    "limeify",
    "load_lime",
    "load_lime_peft",
    "mark_only_routers_trainable",
    "print_trainable_parameters",
    "read_lime",
    "record",
    "rebind",
    "router_param_groups",
    "save_lime",
    "save_pretrained",
    "save_lime_peft",
    "static_mix",
    "token_mix",
    "register_mechanism",
    "router_parameters",
    "routers",
    "unlimeify",
]
