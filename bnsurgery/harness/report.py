"""CompareReport, what `bnsurgery.compare()` returns: the results of a comparison
(harness.results) with their three renderings, `to_dict()` (JSON, harness.render_json),
`render_text()` (harness.render_text) and `write_html(path)` (harness.render_html).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnsurgery.harness import render_html, render_json, render_text
from bnsurgery.harness.results import ComparisonResults


class CompareReport(ComparisonResults):
    """Everything `bnsurgery compare` found; `passed` is False when any output is beyond
    tolerance. `to_dict()` is the stable JSON schema (docs/compare.md)."""

    def to_dict(self) -> dict[str, Any]:
        return render_json.report_dict(self)

    def render_text(self) -> str:
        return render_text.render_text(self)

    def write_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the self-contained HTML page atomically; returns the path."""
        return render_html.write_html(self, path)
