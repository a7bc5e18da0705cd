"""Reports: the text table, the stable JSON schema (docs/compare.md), the HTML page and its
plots, with and without matplotlib, and the page as a real headless Chromium renders it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from onnx import numpy_helper

import bnsurgery
from bnsurgery.harness.render_html import render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    """digits_cnn vs a copy with conv2's weight x 1.5: a failure, layer-wise, stability."""
    folder = tmp_path_factory.mktemp("report")
    data = np.load(SAMPLES / "digits_test.npz")
    np.savez(folder / "d.npz", input=data["input"][:96], label=data["label"][:96])
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    return bnsurgery.compare(
        SAMPLES / "digits_cnn.onnx",
        model,
        data=str(folder / "d.npz"),
        layerwise=True,
        stability=True,
    )


def test_text_table_names_pair_output_and_result(report):
    text = report.render_text()
    assert re.search(r"candidate\s+cpu \(CPUExecutionProvider\)\s+disable_all\s+logits", text)
    assert "first divergence at Conv node '/conv2/Conv'" in text
    assert text.rstrip().splitlines()[-1].startswith("result: FAIL, beyond tolerance: candidate")


def test_json_schema_is_stable(report):
    """The keys documented in docs/compare.md; adding keys is fine, renaming is not."""
    d = json.loads(json.dumps(report.to_dict()))  # strictly JSON: no NaN/inf literals
    assert d["schema"] == "bnsurgery.compare/2" and d["passed"] is False
    assert {"schema", "passed", "reference", "candidate", "providers", "data", "tolerances",
            "fallbacks", "comparisons", "layerwise", "stability", "notes"} <= set(d)  # fmt: skip
    assert {"model", "provider", "session"} <= set(d["reference"])
    assert {"alias", "requested", "active", "ran_on", "fallback", "provider_options",
            "graph_optimization_level", "intra_op_threads", "inter_op_threads",
            "execution_order", "onnxruntime_version",
            "notes"} <= set(d["reference"]["session"])  # fmt: skip
    assert {"source", "samples", "batches", "batch_size", "labels", "synthetic"} <= set(d["data"])
    (pair,) = d["comparisons"]
    assert {"model", "provider", "passed", "session", "outputs"} <= set(pair)
    assert {"name", "dtype", "shape", "elements", "atol", "rtol", "passed", "max_abs", "max_rel",
            "mean_abs", "cosine", "min_atol", "min_rtol", "mismatched", "nan", "inf",
            "top1_agreement", "top5_agreement", "accuracy", "worst_index",
            "note"} <= set(pair["outputs"][0])  # fmt: skip
    (lw,) = d["layerwise"]
    assert {"model", "provider", "mapping", "first_divergence", "layers", "unmatched"} <= set(lw)
    first = lw["first_divergence"]
    assert {"tensor", "candidate_tensor", "matched_by", "node", "op_type", "candidate_node",
            "candidate_op_type", "passed", "max_abs", "max_rel"} <= set(first)  # fmt: skip
    assert {"perturbation", "determinism", "fp16", "notes"} <= set(d["stability"])


def _plots(page: str) -> dict[str, bytes]:
    found = re.findall(
        r'<img class="plot" id="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page
    )
    return {plot_id: base64.b64decode(data) for plot_id, data in found}


@pytest.fixture(scope="module")
def page(report) -> str:
    pytest.importorskip("matplotlib")
    return render_html(report)


def test_html_has_a_plot_per_section_when_matplotlib_is_there(page):
    plots = _plots(page)
    assert set(plots) == {"plot-outputs", "plot-layers-0", "plot-stability"}
    assert all(png.startswith(PNG_MAGIC) for png in plots.values())
    assert 'id="no-plots"' not in page


def test_html_without_matplotlib_has_tables_and_a_note(report, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    page = render_html(report)
    assert "<img" not in page and 'id="no-plots"' in page
    assert "pip install 'bnsurgery[report]'" in page
    assert "<h2>Layer-wise: candidate on cpu</h2>" in page and "<h2>Stability</h2>" in page


def test_cli_writes_the_report_and_says_so(cli, tmp_path):
    out_html = tmp_path / "r.html"
    code, out, _ = cli(
        "compare", SAMPLES / "digits_mlp.onnx", "--opt-level", "all", "--report", out_html
    )
    assert code == 0 and out.rstrip().endswith(f"wrote {out_html}")
    assert out_html.read_text().startswith("<!DOCTYPE html>")
    code, _, err = cli(
        "compare", SAMPLES / "digits_mlp.onnx", "--opt-level", "all",
        "--report", tmp_path / "missing" / "r.html",
    )  # fmt: skip
    assert code == 2 and "does not exist" in err


# -- a real browser ------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.querySelectorAll("img.plot"));
  const ok = imgs.filter((img) => img.complete && img.naturalWidth > 100);
  document.body.setAttribute("data-plots", imgs.length + "/" + ok.length);
});
</script>
"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_headless_chromium_renders_the_plots(page, tmp_path):
    html = tmp_path / "report.html"
    html.write_text(page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*base, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert 'data-plots="3/3"' in dom  # three plots, each decoded by the browser
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, "--window-size=1280,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 50_000


def test_docs_screenshot_is_committed():
    """docs/compare-report.png: the HTML report as headless Chromium shows it."""
    shot = Path(__file__).resolve().parents[1] / "docs" / "compare-report.png"
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_layer_plot_labels_name_the_nodes_not_the_op_types() -> None:
    from bnsurgery.harness.compare import compare
    from bnsurgery.harness.render_html import layer_tick_labels, short_node_name

    model = SAMPLES / "digits_cnn.onnx"
    report = compare(model, model, layerwise=True, show_progress=False)
    labels = layer_tick_labels(report.layerwise[0])
    bns = [label for label in labels if label.endswith("BatchNormalization")]
    assert len(bns) == 4 and len(set(bns)) == 4  # /bn1/..., /bn2/...: told apart
    assert short_node_name("/a" * 40).startswith("…") and len(short_node_name("/a" * 40)) == 28
