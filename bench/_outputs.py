"""Where a benchmark writes: its --out (by default under the git-ignored bench/.cache/results/),
and the tracked files in docs/ only when asked to, with --write-docs.

A benchmark run as the docs say must not rewrite tracked files as a side effect (new dates and
timings in a diff nobody asked for): regenerating the docs is a deliberate step, this flag or
the render step (bench/render_benchmarks.py). No heavy imports here.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / ".cache" / "results"


def add_arguments(
    parser: argparse.ArgumentParser, name: str, docs: str, *, folder: bool = False
) -> None:
    """--out (a file NAME.json, or a folder NAME/ with `folder`) and --write-docs."""
    default = RESULTS / (name if folder else f"{name}.json")
    parser.add_argument(
        "--out",
        type=Path,
        default=default,
        help=f"where the results go (default: {default.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"also update {docs} (tracked files: regenerate them on purpose only)",
    )


def docs_json(name: str) -> Path:
    """The tracked copy of a benchmark's JSON, which render_benchmarks.py reads."""
    return DOCS / "bench" / f"{name}.json"


def copy_to_docs(source: Path, target: Path) -> None:
    """--write-docs: put a run's file where the docs take it from."""
    if source.resolve() == target.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"wrote {target.relative_to(ROOT)}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args, refusing --write-docs with --smoke (a smoke run's numbers are not
    the docs' numbers)."""
    args = parser.parse_args(argv)
    if args.write_docs and getattr(args, "smoke", False):
        parser.error("--write-docs needs a full run, not --smoke")
    return args


def replace_marked(doc: Path, marker: str, text: str) -> None:
    """--write-docs: put `text` between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->`."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    content = doc.read_text()
    start, stop = content.index(begin) + len(begin), content.index(end)
    doc.write_text(content[:start] + "\n" + text + content[stop:])
    print(f"wrote {doc}")
