"""Plugins: a real package (tests/plugin_pkg) installed into a temporary venv registers a pass
and checks through entry points; `bnsurgery plugins` lists them, a pipeline runs the pass, and
a check that raises is reported by name while the others run."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES

from bnsurgery.entry_points import load_entry_points
from bnsurgery.pipeline.plugins import list_plugins

PLUGIN_PKG = Path(__file__).parent / "plugin_pkg"


def test_builtin_passes_and_checks_are_listed(cli):
    code, out, _ = cli("plugins", "--json")
    payload = json.loads(out)
    assert code == 0
    builtin_passes = [p["name"] for p in payload["passes"] if p["source"] == "builtin"]
    assert builtin_passes == ["adapt", "fold", "insert", "reestimate", "validate"]
    assert [c["name"] for c in payload["checks"] if c["source"] == "builtin"][:2] == [
        "onnx-checker",
        "shape-inference",
    ]


def test_the_passes_layer_registers_its_passes_without_the_layers_above():
    code = (
        "import sys\n"
        "from bnsurgery.passes.registry import registered_passes\n"
        "names = sorted(registered_passes())\n"
        "above = sorted(m for m in sys.modules if m.startswith(('bnsurgery.validation',\n"
        "    'bnsurgery.pipeline', 'bnsurgery.integrations', 'bnsurgery.cli')))\n"
        "print(names, above)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['adapt', 'fold', 'insert', 'reestimate'] []"


def test_an_unknown_group_loads_nothing_and_raises_nothing():
    errors: list = []
    assert load_entry_points("bnsurgery.no-such-group", errors) == [] and errors == []


def test_text_listing_says_every_plugin_loaded_when_none_failed(cli, monkeypatch):
    import bnsurgery.pipeline.plugins as plugins

    monkeypatch.setattr(plugins, "load_entry_points", lambda group, errors=None: [])
    code, out, _ = cli("plugins")
    assert code == 0 and "every plugin loaded" in out
    assert list_plugins().errors == []


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory) -> Path:
    """A fresh venv that sees this environment's packages (bnsurgery included) plus the example
    plugin, installed with pip from a copy of tests/plugin_pkg (the source tree stays clean).

    `--system-site-packages` would show the *base* interpreter's packages, which is not this
    environment when the tests themselves run in a venv (as .ci/run does); a .pth file that
    adds this environment's site-packages (their own .pth files included, so the editable
    bnsurgery install) works in both cases. pip and setuptools come from there too, and the
    plugin goes into the new venv (its sys.prefix).
    """
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_PKG, root / "pkg")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    parents = [p for p in [*site.getsitepackages(), site.getusersitepackages()]
               if Path(p).is_dir()]  # fmt: skip
    (Path(purelib) / "_bnsurgery_test_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    )
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", str(source)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return python


def bnsurgery_in(python: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(python), "-m", "bnsurgery", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_installed_plugin_is_listed_with_its_distribution(plugin_venv):
    done = bnsurgery_in(plugin_venv, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    [tag] = [p for p in payload["passes"] if p["name"] == "tag"]
    assert (tag["source"], tag["distribution"], tag["version"]) == (
        "plugin", "bnsurgery-example-plugin", "0.1.0",
    )  # fmt: skip
    checks = {c["name"]: c["source"] for c in payload["checks"]}
    assert checks["example-bn-count"] == checks["example-broken"] == "plugin"
    [broken] = payload["errors"]
    assert (broken["group"], broken["name"]) == ("bnsurgery.passes", "example-missing")
    assert "NoSuchPass" in broken["error"]
    text = bnsurgery_in(plugin_venv, "plugins").stdout
    assert "example-missing" in text and "failed to load (1)" in text


@pytest.mark.slow
def test_pipeline_runs_the_plugin_pass(plugin_venv, tmp_path):
    pipeline = tmp_path / "tagged.toml"
    pipeline.write_text(
        '[[step]]\npass = "fold"\n\n[[step]]\npass = "tag"\nvalue = "gate-1"\n\n'
        '[[step]]\npass = "validate"\nskip = ["example-broken"]\n'
    )
    out = tmp_path / "tagged.onnx"
    done = bnsurgery_in(plugin_venv, "run", pipeline, SAMPLES / "digits_mlp.onnx", "-o", out,
                        "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["steps"]
    assert [s["pass"] for s in steps] == ["fold", "tag", "validate"]
    assert steps[1]["report"] == {"key": "bnsurgery.example.tag", "value": "gate-1"}
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["bnsurgery.example.tag"] == "gate-1"


@pytest.mark.slow
def test_a_plugin_check_that_raises_is_reported_by_name_and_the_others_run(plugin_venv):
    done = bnsurgery_in(plugin_venv, "validate", SAMPLES / "digits_mlp.onnx", "--json")
    assert done.returncode == 1
    payload = json.loads(done.stdout)
    [crash] = [f for f in payload["findings"] if f["id"] == "check-crashed"]
    assert crash["check"] == "example-broken"
    assert "RuntimeError: example plugin failure" in crash["message"]
    assert "bnsurgery-example-plugin" in crash["message"]
    statuses = {c["name"]: c["status"] for c in payload["checks"]}
    assert statuses["example-broken"] == "crashed"
    assert statuses["example-bn-count"] == statuses["provider-parity"] == "ran"
    [count] = [f for f in payload["findings"] if f["id"] == "example-bn-count"]
    assert count["message"] == "2 BatchNormalization node(s)"
    skipped = bnsurgery_in(plugin_venv, "validate", SAMPLES / "digits_mlp.onnx",
                           "--skip", "example-broken")  # fmt: skip
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr


@pytest.mark.slow
def test_a_pipeline_naming_a_plugin_that_fails_to_load_names_it(plugin_venv, tmp_path):
    pipeline = tmp_path / "missing.toml"
    pipeline.write_text('[[step]]\npass = "example-missing"\n')
    done = bnsurgery_in(plugin_venv, "run", pipeline, SAMPLES / "digits_mlp.onnx")
    assert done.returncode == 2
    assert "missing.toml:2: step 1: the plugin pass 'example-missing'" in done.stderr
    assert "NoSuchPass" in done.stderr
