"""Third-party passes and validate checks, found through entry points.

A package registers them in its pyproject.toml:

    [project.entry-points."bnsurgery.passes"]
    tag = "my_package.passes:TagPass"          # a Pass factory: TagPass(**options) -> Pass

    [project.entry-points."bnsurgery.checks"]
    max-bn = "my_package.checks:max_bn"        # check(ctx) -> iterable of Finding

Loading never raises: an entry point whose import fails is recorded as a PluginError (group,
name, distribution, error) so that `bnsurgery plugins` and `bnsurgery validate` can name it and go
on with the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from bnsurgery.passes import PluginError

PASS_GROUP = "bnsurgery.passes"
CHECK_GROUP = "bnsurgery.checks"
GROUPS = (PASS_GROUP, CHECK_GROUP)


@dataclass
class LoadedPlugin:
    """An entry point and the object it names."""

    group: str
    name: str
    value: str
    distribution: str | None
    version: str | None
    obj: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "value": self.value,
            "distribution": self.distribution,
            "version": self.version,
        }


def _distribution(entry: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # broken metadata: the plugin still loads
        return None, None


def describe_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_entry_points(group: str, errors: list[PluginError] | None = None) -> list[LoadedPlugin]:
    """Every entry point of `group`, loaded, sorted by name; failures go to `errors`."""
    loaded: list[LoadedPlugin] = []
    seen: set[str] = set()
    for entry in sorted(entry_points(group=group), key=lambda e: e.name):
        if entry.name in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add(entry.name)
        dist, version = _distribution(entry)
        try:
            obj = entry.load()
        except Exception as exc:  # a broken plugin must not break bnsurgery
            if errors is not None:
                errors.append(
                    PluginError(group, entry.name, entry.value, dist, describe_error(exc))
                )
            continue
        loaded.append(LoadedPlugin(group, entry.name, entry.value, dist, version, obj))
    return loaded


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
    from bnsurgery.passes import _REGISTRY, load_builtin_passes
    from bnsurgery.validation.checks import builtin_checks

    errors: list[PluginError] = []
    load_builtin_passes()
    passes = [
        {"name": name, "source": "builtin", "summary": _summary(factory)}
        for name, factory in sorted(_REGISTRY.items())
    ]
    for plugin in load_entry_points(PASS_GROUP, errors):
        entry = plugin.to_dict() | {"source": "plugin", "summary": _summary(plugin.obj)}
        if plugin.name in _REGISTRY:
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
