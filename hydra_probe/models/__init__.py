"""Model access: architecture tables, the adapter and the loaders."""

from .adapter import Adapter
from .sites import Site
from .tables import ArchTable, register_table, supported_model_types, table_for
from .wrapper import HookedModel, load_default_model, load_model, resolve_device, text_causal_lm

__all__ = [
    "Adapter",
    "ArchTable",
    "HookedModel",
    "Site",
    "load_default_model",
    "load_model",
    "register_table",
    "resolve_device",
    "supported_model_types",
    "table_for",
    "text_causal_lm",
]
