"""Every pass a pipeline can name: the built-ins (fold, insert, reestimate, adapt, validate)
and the passes third parties register under the entry-point group `bnsurgery.passes`.

    make_pass("fold", backward=False)    # the pass, built with its options
    registry()                           # {name: factory}

It lives above validation because validate's pass is one of them; the passes layer keeps only
`register` and its own built-ins (bnsurgery.passes.registry).
"""

from __future__ import annotations

import logging
from typing import Any

from bnsurgery.entry_points import PASS_GROUP, PluginError, load_entry_points
from bnsurgery.passes import Pass
from bnsurgery.passes.registry import PassFactory, registered_passes
from bnsurgery.validation.gate import ValidatePass

logger = logging.getLogger(__name__)


def builtin_passes() -> dict[str, PassFactory]:
    """The passes bnsurgery ships (and any registered in this process), by name, sorted."""
    found = registered_passes()
    found[ValidatePass.name] = ValidatePass
    return dict(sorted(found.items()))


def registry(errors: list[PluginError] | None = None) -> dict[str, PassFactory]:
    """Built-in passes plus those third parties register under `bnsurgery.passes`.

    A plugin whose entry point fails to load is left out; it is appended to `errors` when a list
    is given (`bnsurgery plugins` shows it). A plugin cannot replace a built-in name.
    """
    found = builtin_passes()
    for plugin in load_entry_points(PASS_GROUP, errors):
        if plugin.name in found:
            logger.debug("plugin pass %r ignored: a built-in pass has this name", plugin.name)
            continue
        found[plugin.name] = plugin.obj
    return found


def make_pass(name: str, **options: Any) -> Pass:
    """The registered pass `name`, built with `options` (KeyError names the known passes)."""
    passes = registry()
    if name not in passes:
        raise KeyError(f"unknown pass '{name}' (known: {', '.join(sorted(passes))})")
    return passes[name](**options)


__all__ = ["builtin_passes", "make_pass", "registry"]
