"""limeify: retrofit Layer-Integrated Memory (LIMe) onto existing transformer models."""

from .config import LimeConfig
from .discovery import discover_sites
from .errors import LimeError
from .injection import describe, is_limeified, limeify, router_parameters, routers, unlimeify
from .routers import Router, available_mechanisms, register_mechanism
from .sites import AttentionSite, KVSource

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "KVSource",
    "LimeConfig",
    "LimeError",
    "Router",
    "available_mechanisms",
    "describe",
    "discover_sites",
    "is_limeified",
    "limeify",
    "register_mechanism",
    "router_parameters",
    "routers",
    "unlimeify",
]
