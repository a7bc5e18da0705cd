"""The ONNX Runtime this process has: its import, its distributions, and plugin EP libraries.

bnsurgery depends on no particular flavour of onnxruntime (`onnxruntime`, `onnxruntime-gpu`,
`onnxruntime-openvino`, ... all install the same `onnxruntime/` package): the user's own build
is kept, and the extras `cpu`, `gpu` and `openvino` pick one. So the import can fail, and two
flavours can overwrite each other's files; both are said in one line with the fix.

Plugin execution providers are shared libraries registered with ONNX Runtime's environment
(`register_execution_provider_library`, ORT 1.22+); they then offer devices
(`get_ep_devices()`) that a session attaches with `SessionOptions.add_provider_for_devices`.
Libraries are registered once per process (ORT refuses a second registration of a name) and
remembered here with the EP names whose devices they added. Installed plugin packages
(`onnxruntime-ep-*`, `onnxruntime-ggml`) that expose their library path are found on demand.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as metadata
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bnsurgery.errors import BadInputError, EnvironmentProblem, first_line_or_type

INSTALL_LINE = (
    "install one ONNX Runtime: pip install 'bnsurgery[cpu]' (onnxruntime), 'bnsurgery[gpu]' "
    "(onnxruntime-gpu) or 'bnsurgery[openvino]' (onnxruntime-openvino)"
)
# installed plugin EP packages with these name prefixes are probed for their library path
PLUGIN_PACKAGE_PREFIXES = ("onnxruntime-ep-", "onnxruntime-ggml")

_lock = threading.Lock()
# registration name -> Library, for every library registered by this process
_libraries: dict[str, Library] = {}


def onnxruntime() -> ModuleType:
    """`import onnxruntime`, or EnvironmentProblem (exit 3) naming the packages to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        owners = [d.name for d in flavours()]
        found = f"; installed but not importable: {', '.join(owners)} ({exc})" if owners else ""
        raise EnvironmentProblem(f"ONNX Runtime is not installed: {INSTALL_LINE}{found}") from None
    return ort


# -- distributions -----------------------------------------------------------------------------
@dataclass
class Distribution:
    """An installed distribution that writes the `onnxruntime/` package (a flavour)."""

    name: str
    version: str
    location: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "location": self.location}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def flavours() -> list[Distribution]:
    """Every installed distribution whose files include `onnxruntime/__init__.py`."""
    found: dict[tuple[str, str], Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        normal = _normal(name)
        if not (normal.startswith("onnxruntime") or normal.startswith("ort-")):
            continue
        files = dist.files or []
        if any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in files):
            location = str(dist.locate_file("onnxruntime"))
            found.setdefault((normal, location), Distribution(name, dist.version, location))
    return sorted(found.values(), key=lambda d: d.name)


def conflicts(dists: list[Distribution] | None = None) -> list[str]:
    """One warning per `onnxruntime/` directory that two or more flavours write, with the fix."""
    by_dir: dict[str, list[Distribution]] = {}
    for dist in flavours() if dists is None else dists:
        by_dir.setdefault(dist.location, []).append(dist)
    warnings = []
    for location, owners in by_dir.items():
        if len(owners) < 2:
            continue
        names = [d.name for d in owners]
        keep = next((n for n in names if _normal(n) != "onnxruntime"), names[0])
        warnings.append(
            f"{' and '.join(names)} are installed together and share {location}: the one "
            f"installed last overwrote the other's files; keep one: pip uninstall -y "
            f"{' '.join(names)} && pip install {keep}"
        )
    return warnings


# -- plugin EP libraries -----------------------------------------------------------------------
@dataclass
class Library:
    """A plugin EP library registered with ONNX Runtime, and the EP names it added."""

    name: str
    path: str
    ep_names: list[str] = field(default_factory=list)
    package: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "ep_names": list(self.ep_names),
            "package": self.package,
        }


def supports_plugins() -> bool:
    ort = onnxruntime()
    return hasattr(ort, "register_execution_provider_library") and hasattr(ort, "get_ep_devices")


# The parameter that names plugin EP libraries (NAME=PATH strings or a mapping), in errors.
OPTION = "ep_libraries"


def parse_library_specs(specs: Any) -> dict[str, str]:
    """`NAME=PATH` strings (or a mapping) -> {name: path}; bad input (exit 2) when malformed
    or when the file does not exist."""
    if not specs:
        return {}
    items = list(specs.items()) if isinstance(specs, dict) else [_split_spec(s) for s in specs]
    libraries: dict[str, str] = {}
    for name, path in items:
        name = str(name).strip()
        if not name:
            raise BadInputError(f"{{option}} '{name}={path}': the name is empty", option=OPTION)
        if name in libraries and libraries[name] != str(path):
            raise BadInputError(
                f"{{option}}: '{name}' is given twice with different paths", option=OPTION
            )
        if not Path(path).is_file():
            raise BadInputError(f"{{option}} {name}={path}: no such file", option=OPTION)
        libraries[name] = str(path)
    return libraries


def _split_spec(spec: Any) -> tuple[str, str]:
    text = str(spec)
    if "=" not in text:
        raise BadInputError(
            f"{{option}} '{text}': expected NAME=PATH (e.g. ggml=/path/lib.so)", option=OPTION
        )
    name, path = text.split("=", 1)
    return name, path


def register_library(name: str, path: str, package: str | None = None) -> Library:
    """Register a plugin EP library once per process; the EP names its devices carry.

    A library that registers but reports no device on this machine is EnvironmentProblem
    (exit 3): `ggml: registered, but it reported no device here`."""
    ort = onnxruntime()
    if not supports_plugins():
        raise EnvironmentProblem(
            f"{name}: plugin execution providers need onnxruntime 1.22 or later "
            f"(this is {ort.__version__})"
        )
    with _lock:
        known = _libraries.get(name)
        if known is not None:
            if os.path.realpath(known.path) != os.path.realpath(path):
                raise BadInputError(
                    f"{name}: already registered from {known.path}, not {path}", option=OPTION
                )  # fmt: skip
            library = known
        else:
            before = _device_keys(ort)
            try:
                ort.register_execution_provider_library(name, path)
            except Exception as exc:
                raise EnvironmentProblem(
                    f"{name}: ONNX Runtime could not register {path}: {first_line_or_type(exc)}"
                ) from None
            added = [d.ep_name for d in ort.get_ep_devices() if _key(d) not in before]
            library = Library(name, path, list(dict.fromkeys(added)), package)
            _libraries[name] = library
    if not library.ep_names:
        raise EnvironmentProblem(f"{name}: registered, but it reported no device here")
    return library


def registered_libraries() -> list[Library]:
    with _lock:
        return list(_libraries.values())


def _device_keys(ort: ModuleType) -> set[tuple[str, str, int]]:
    return {_key(d) for d in ort.get_ep_devices()}


def _key(device: Any) -> tuple[str, str, int]:
    return (device.ep_name, device.ep_vendor, int(device.device.device_id))


def ep_devices(ep_name: str) -> list[Any]:
    """The OrtEpDevices of one EP name (a plugin's)."""
    if not supports_plugins():
        return []
    return [d for d in onnxruntime().get_ep_devices() if d.ep_name == ep_name]


def plugin_ep_names() -> list[str]:
    """EP names of the devices registered libraries added."""
    return list(dict.fromkeys(n for lib in registered_libraries() for n in lib.ep_names))


@dataclass
class PluginPackage:
    """An installed package that ships a plugin EP library and says where it is."""

    distribution: str
    version: str
    module: str
    ep_name: str
    library_path: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "ep_name": self.ep_name,
            "library_path": self.library_path,
            "error": self.error,
        }


@functools.cache
def plugin_packages() -> tuple[PluginPackage, ...]:
    """Installed plugin EP packages (`onnxruntime-ep-*`, `onnxruntime-ggml`): their module's
    `get_library_path()`/`library_path()` and `get_ep_name()`/`EP_NAME`."""
    packages: dict[str, PluginPackage] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        normal = _normal(name)
        if not normal.startswith(PLUGIN_PACKAGE_PREFIXES) or normal in packages:
            continue
        module_name = normal.replace("-", "_")
        default_ep = normal.removeprefix("onnxruntime-ep-").removeprefix("onnxruntime-")
        try:
            module = importlib.import_module(module_name)
            path = _call_first(module, ("get_library_path", "library_path"))
            ep_name = _call_first(module, ("get_ep_name",)) or getattr(module, "EP_NAME", None)
            packages[normal] = PluginPackage(
                name, dist.version, module_name, str(ep_name or default_ep), path and str(path)
            )
        except Exception as exc:  # a broken plugin package is listed, not fatal
            packages[normal] = PluginPackage(
                name, dist.version, module_name, default_ep, None, first_line_or_type(exc)
            )
    return tuple(packages.values())


def _call_first(module: ModuleType, names: tuple[str, ...]) -> Any:
    for attr in names:
        function = getattr(module, attr, None)
        if callable(function):
            return function()
    return None


def register_package_for(ep_name: str) -> Library | None:
    """Register the installed plugin package whose EP is `ep_name` (case-insensitive), if any."""
    for package in plugin_packages():
        if package.ep_name.lower() != ep_name.lower() or not package.library_path:
            continue
        return register_library(package.ep_name, package.library_path, package.distribution)
    return None
