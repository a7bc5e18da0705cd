"""`bnsurgery providers`: the ONNX Runtime installed, its execution providers and plugin EPs."""

from __future__ import annotations

from typing import Any

import click

from bnsurgery.cli.options import ep_library_option, json_option
from bnsurgery.cli.render import emit
from bnsurgery.errors import BnSurgeryError, EnvironmentProblem
from bnsurgery.runtime import installation as runtime
from bnsurgery.runtime.providers import ALIASES, alias_of

SCHEMA = "bnsurgery.providers/1"


def survey(ep_libraries: list[str]) -> dict[str, Any]:
    """Everything the command reports, as its JSON document."""
    dists = runtime.flavours()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "distributions": [d.to_dict() for d in dists],
        "warnings": runtime.conflicts(dists),
        "onnxruntime": None,
        "error": None,
        "providers": [],
        "plugin_packages": [],
        "libraries": [],
        "devices": [],
    }
    if not dists:
        doc["warnings"].append(f"no ONNX Runtime distribution is installed: {runtime.INSTALL_LINE}")
    try:
        ort = runtime.onnxruntime()
    except BnSurgeryError as exc:
        doc["error"] = str(exc)
        return doc
    doc["onnxruntime"] = {"version": ort.__version__, "path": getattr(ort, "__file__", None)}
    available = list(ort.get_available_providers())
    doc["providers"] = [{"name": n, "alias": alias_of(n)} for n in available]
    if not runtime.supports_plugins():
        return doc
    for name, path in runtime.parse_library_specs(ep_libraries).items():
        runtime.register_library(name, path)  # the user's own: its failure is the command's
    for package in runtime.plugin_packages():
        entry = package.to_dict()
        if package.library_path and package.error is None:
            try:
                runtime.register_library(
                    package.ep_name, package.library_path, package.distribution
                )
            except BnSurgeryError as exc:
                entry["error"] = str(exc)
        doc["plugin_packages"].append(entry)
    doc["libraries"] = [lib.to_dict() for lib in runtime.registered_libraries()]
    for device in ort.get_ep_devices():
        doc["devices"].append(
            {
                "ep_name": device.ep_name,
                "alias": alias_of(device.ep_name) if device.ep_name in ALIASES.values() else None,
                "ep_vendor": device.ep_vendor,
                "device_type": str(device.device.type).rsplit(".", 1)[-1],
                "device_vendor": device.device.vendor,
                "version": dict(device.ep_metadata).get("version"),
            }
        )
    return doc


def render_text(doc: dict[str, Any]) -> str:
    lines = []
    for warning in doc["warnings"]:
        lines.append(f"WARNING: {warning}")
    lines.append("ONNX Runtime distributions:")
    for dist in doc["distributions"]:
        lines.append(f"  {dist['name']} {dist['version']}  ({dist['location']})")
    if not doc["distributions"]:
        lines.append("  none")
    if doc["error"]:
        lines.append(f"onnxruntime: {doc['error']}")
        return "\n".join(lines)
    lines.append(f"onnxruntime {doc['onnxruntime']['version']}: {doc['onnxruntime']['path']}")
    lines.append("execution providers (use the short name or the full one in --providers):")
    for provider in doc["providers"]:
        lines.append(f"  {provider['alias']:<10}  {provider['name']}")
    if doc["plugin_packages"] or doc["libraries"]:
        lines.append("plugin EP libraries:")
        for lib in doc["libraries"]:
            origin = f" (package {lib['package']})" if lib["package"] else ""
            eps = ", ".join(lib["ep_names"]) or "no device here"
            lines.append(f"  {lib['name']}: {eps}  {lib['path']}{origin}")
        for package in doc["plugin_packages"]:
            if package["error"]:
                lines.append(
                    f"  {package['distribution']} {package['version']}: {package['error']}"
                )
    if doc["devices"]:
        lines.append("EP devices (get_ep_devices):")
        for device in doc["devices"]:
            version = f" {device['version']}" if device["version"] else ""
            lines.append(
                f"  {device['ep_name']}{version}  {device['device_type']} "
                f"({device['device_vendor']}; EP by {device['ep_vendor']})"
            )
    return "\n".join(lines)


@click.command("providers")
@ep_library_option("Also register this plugin execution provider library (repeatable).")
@json_option()
def providers_command(ep_libraries: tuple[str, ...], as_json: bool) -> None:
    """List the ONNX Runtime installed (and warn when two flavours collide), its execution
    providers, plugin EP libraries and their devices.

    \b
    Example:
      bnsurgery providers --json
    """
    doc = survey(list(ep_libraries))
    emit(as_json, doc, lambda: render_text(doc))
    if doc["error"]:
        raise EnvironmentProblem(doc["error"])
