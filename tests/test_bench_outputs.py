"""A benchmark run as the docs say writes to its own output, never over tracked files in docs/:
those are regenerated on purpose, with --write-docs (or the render step, render_benchmarks.py).

Each script's main() is called with its default arguments, and stopped right after it parsed
them; its output paths must lie outside docs/ and --write-docs must be off (or the script
refuses to run without an --out the user chooses).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
from conftest import REPO

BENCH = REPO / "bench"
DOCS = REPO / "docs"
# Every benchmark script (the helpers and the render step aside).
SCRIPTS = sorted(
    p.stem
    for p in BENCH.glob("*.py")
    if not p.stem.startswith("_") and p.stem != "render_benchmarks"
)
# Those that keep a tracked copy of their results in docs/ (fold_node_counts prints a table
# that is pasted into docs/fold.md by hand, and needs --out; fold_identity records or checks
# hashes in bench/, never under docs/).
WRITE_DOCS = sorted(set(SCRIPTS) - {"fold_node_counts", "fold_identity"})


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


@pytest.fixture
def parsed_defaults(monkeypatch):
    """main() of a script, run until it has parsed its (default) arguments."""
    monkeypatch.syspath_prepend(str(BENCH))
    original = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)

    def run(script: str, *argv: str) -> argparse.Namespace | None:
        """The parsed namespace, or None when the script refuses to run without arguments."""
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
        module = importlib.import_module(script)
        with pytest.raises((Parsed, SystemExit)) as stopped:
            module.main(list(argv)) if module.main.__code__.co_argcount else module.main()
        if isinstance(stopped.value, SystemExit):
            assert stopped.value.code == 2  # argparse: a required argument is missing
            return None
        return stopped.value.namespace

    return run


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_default_run_writes_nothing_under_docs(parsed_defaults, script: str) -> None:
    args = parsed_defaults(script)
    if args is None:  # nothing runs, nothing is written, until the user names an --out
        return
    paths = {k: v for k, v in vars(args).items() if isinstance(v, Path)}
    assert "out" in paths, f"{script} has no --out"
    assert not [k for k, v in paths.items() if _inside(v, DOCS)], paths
    assert args.write_docs is False


@pytest.mark.parametrize("script", WRITE_DOCS)
def test_write_docs_is_how_a_script_updates_the_docs(parsed_defaults, script: str) -> None:
    args = parsed_defaults(script, "--write-docs")
    assert args is not None and args.write_docs is True


def test_a_smoke_run_cannot_write_the_docs(capsys) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import reestimate_speed
    finally:
        sys.path.remove(str(BENCH))
    with pytest.raises(SystemExit) as exited:
        reestimate_speed.main(["--smoke", "--write-docs"])
    assert exited.value.code == 2
    assert "--write-docs needs a full run" in capsys.readouterr().err
