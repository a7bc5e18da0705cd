"""What `bnsurgery plugins` lists: the built-in and third-party passes and validate checks, and
the plugins that failed to load.

Plugins are entry points (bnsurgery.entry_points has the groups and the loader); a pass plugin
is usable by name in a pipeline (bnsurgery.pipeline.registry), a check plugin runs in every
`bnsurgery validate` (bnsurgery.validation.gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnsurgery.entry_points import CHECK_GROUP, PASS_GROUP, PluginError, load_entry_points
from bnsurgery.pipeline.registry import builtin_passes
from bnsurgery.validation.checks import builtin_checks


@dataclass
class PluginListing:
    """What `bnsurgery plugins` shows: built-ins and plugins of both groups, and failures."""

    passes: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    errors: list[PluginError]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "checks": self.checks,
            "errors": [e.to_dict() for e in self.errors],
        }


def _summary(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def list_plugins() -> PluginListing:
    """Built-in and third-party passes and checks; plugins that fail to load are in `errors`."""
    errors: list[PluginError] = []
    builtins = builtin_passes()
    passes = [
        {"name": name, "source": "builtin", "summary": _summary(factory)}
        for name, factory in builtins.items()
    ]
    for plugin in load_entry_points(PASS_GROUP, errors):
        entry = plugin.to_dict() | {"source": "plugin", "summary": _summary(plugin.obj)}
        if plugin.name in builtins:
            entry["note"] = f"ignored: the built-in pass '{plugin.name}' has this name"
        passes.append(entry)
    checks = [
        {"name": c.name, "source": "builtin", "severity": c.severity, "summary": c.summary}
        for c in builtin_checks()
    ]
    builtin_names = {c["name"] for c in checks}
    for plugin in load_entry_points(CHECK_GROUP, errors):
        entry = plugin.to_dict() | {"source": "plugin", "summary": _summary(plugin.obj)}
        if plugin.name in builtin_names:
            entry["note"] = f"ignored: the built-in check '{plugin.name}' has this name"
        checks.append(entry)
    return PluginListing(passes, checks, errors)


__all__ = ["PluginListing", "list_plugins"]
