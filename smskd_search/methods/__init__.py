"""KD methods, one file each, registered by name in :data:`METHODS`."""

import importlib
import pkgutil

from smskd_search.methods.base import (
    METHODS,
    KDBatch,
    Method,
    MethodContext,
    MethodParams,
    build_method,
    register_method,
)

# Import every method module so that each registers itself.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "common", "pair_defaults"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "KDBatch", "Method", "MethodContext", "MethodParams", "build_method", "register_method"]
