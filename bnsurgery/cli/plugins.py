"""`bnsurgery plugins`: the passes and validate checks available, built-in and third-party."""

from __future__ import annotations

import click

from bnsurgery.cli.options import json_option
from bnsurgery.cli.render import emit
from bnsurgery.pipeline.plugins import PluginListing, list_plugins


def _origin(entry: dict) -> str:
    if entry["source"] == "builtin":
        return "built-in"
    dist = entry.get("distribution") or "?"
    version = entry.get("version")
    return f"{dist} {version}" if version else dist


def render_text(listing: PluginListing) -> str:
    lines = []
    for title, entries in (("passes", listing.passes), ("checks", listing.checks)):
        lines.append(f"{title} ({len(entries)}):")
        width = max((len(e["name"]) for e in entries), default=0)
        origin_width = max((len(_origin(e)) for e in entries), default=0)
        for entry in entries:
            summary = entry.get("summary") or entry.get("value", "")
            note = f"  [{entry['note']}]" if entry.get("note") else ""
            lines.append(
                f"  {entry['name']:<{width}}  {_origin(entry):<{origin_width}}  {summary}{note}"
            )
        lines.append("")
    if listing.errors:
        lines.append(f"failed to load ({len(listing.errors)}):")
        for error in listing.errors:
            dist = f" ({error.distribution})" if error.distribution else ""
            lines.append(f"  {error.group} {error.name}{dist} = {error.value}: {error.error}")
    else:
        lines.append("every plugin loaded")
    return "\n".join(lines)


@click.command("plugins")
@json_option()
def plugins_command(as_json: bool) -> None:
    """List passes (entry points `bnsurgery.passes`) and validate checks (`bnsurgery.checks`),
    built-in and from installed plugins; plugins that fail to load are listed with the error.

    \b
    Example:
      bnsurgery plugins --json
    """
    listing = list_plugins()
    emit(as_json, listing.to_dict(), lambda: render_text(listing))
