"""Passes by name: `register` and the built-in passes of this layer.

A pass class registers itself under its name with `@register("fold")`. The built-in passes
live in the modules of BUILTIN_PASS_MODULES, which are imported on first use (they load onnx
and numpy; `import bnsurgery` must not). The full registry that pipelines read, with
validate's pass and third-party plugins, is bnsurgery.pipeline.registry: it sits above the
layers whose passes it names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bnsurgery.passes.base import Pass

PassFactory = Callable[..., Pass]

_REGISTERED: dict[str, PassFactory] = {}

# The modules of this layer whose import registers a built-in pass.
BUILTIN_PASS_MODULES = (
    "bnsurgery.passes.fold",
    "bnsurgery.passes.insert",
    "bnsurgery.passes.reestimate",
    "bnsurgery.passes.adapt",
)


def register(name: str) -> Callable[[Any], Any]:
    """Register a pass factory (usually the class) under `name`."""

    def decorator(factory: Any) -> Any:
        _REGISTERED[name] = factory
        return factory

    return decorator


def registered_passes() -> dict[str, PassFactory]:
    """Every pass registered so far, the built-ins of this layer included, by name."""
    for module in BUILTIN_PASS_MODULES:
        importlib.import_module(module)
    return dict(_REGISTERED)


__all__ = ["BUILTIN_PASS_MODULES", "PassFactory", "register", "registered_passes"]
