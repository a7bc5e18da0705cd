"""Entry points of installed packages, loaded without ever raising: the one loader that pipeline
passes (group `bnsurgery.passes`) and validate checks (group `bnsurgery.checks`) share.

A package registers them in its pyproject.toml:

    [project.entry-points."bnsurgery.passes"]
    tag = "my_package.passes:TagPass"          # a Pass factory: TagPass(**options) -> Pass

    [project.entry-points."bnsurgery.checks"]
    max-bn = "my_package.checks:max_bn"        # check(ctx) -> iterable of Finding

An entry point whose import fails is recorded as a PluginError (group, name, distribution,
error) so that `bnsurgery plugins`, pipelines and `bnsurgery validate` can name it and go on with
the others. It depends on nothing but the standard library and bnsurgery.errors, so every layer
may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from bnsurgery.errors import first_line

PASS_GROUP = "bnsurgery.passes"
CHECK_GROUP = "bnsurgery.checks"


@dataclass
class PluginError:
    """An entry point that could not be loaded: reported by name, never fatal."""

    group: str
    name: str
    value: str
    distribution: str | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


def describe_error(exc: BaseException) -> str:
    """`Type: first line of the message`, or the type alone."""
    first = first_line(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _distribution(entry: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # broken metadata: the plugin still loads
        return None, None


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


__all__ = [
    "CHECK_GROUP",
    "PASS_GROUP",
    "LoadedPlugin",
    "PluginError",
    "describe_error",
    "load_entry_points",
]
