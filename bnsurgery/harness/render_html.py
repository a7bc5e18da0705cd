"""A comparison as one self-contained HTML page (`compare --report`).

The page embeds its plots as base64 PNG when matplotlib is importable (the `[report]` extra):
error per output, error per layer (layer-wise) and accuracy or flip rate per perturbation
(stability). Without matplotlib it still writes the page, with the tables and a note saying
what is missing. The page is saved atomically (onnxio's atomic_write).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bnsurgery.harness.metrics import ErrorMetrics
from bnsurgery.harness.render_text import (
    divergence_line,
    error_cells,
    judged_cell,
    layer_summary,
    nonfinite_cell,
    number_text,
    percent_text,
    plural,
    result_line,
    session_line,
)
from bnsurgery.harness.results import ComparisonResults, LayerwiseResult
from bnsurgery.onnxio import atomic_write

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.pass { color: #0a7a26; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.warn { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em; font-weight: bold; }
.note { color: #555; } img.plot { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _html_table(header: list[str], rows: list[list[Any]], left: int = 2) -> str:
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left else ""
        text = value if isinstance(value, _Raw) else _esc(value)
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML."""


def _verdict(ok: bool | None) -> _Raw:
    if ok is None:
        return _Raw("-")
    return _Raw('<span class="pass">ok</span>' if ok else '<span class="fail">FAIL</span>')


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(plot_id: str, alt: str, data: str) -> str:
    return f'<img class="plot" id="{plot_id}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _positive(value: float) -> float:
    return value if value > 0 and math.isfinite(value) else float("nan")


def _allowed(m: ErrorMetrics) -> float:
    """The largest max abs error the verdict allows: limit x the rounding noise, or atol."""
    if m.rule == "noise":
        return _positive((m.noise_max_abs or 0.0) * (m.limit or 0.0))
    return _positive(m.atol or 0.0)


def short_node_name(name: str, width: int = 28) -> str:
    """A node name for a plot tick: exporter scopes cut from the left ('/layer1/0/conv1/Conv'
    -> '…/0/conv1/Conv')."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def layer_tick_labels(lw: LayerwiseResult) -> list[str]:
    """The layer plot's x labels: each tensor's producer node, shortened (op types alone would
    read "BatchNormalization" three times)."""
    return [short_node_name(layer.match.reference_node) for layer in lw.layers]


def plot_outputs(report: ComparisonResults) -> str | None:
    from matplotlib.figure import Figure

    bars = [(f"{p.model}@{p.provider}\n{m.name}", m) for p in report.pairs for m in p.outputs]
    if not bars:
        return None
    fig = Figure(figsize=(max(5.0, 1.1 * len(bars) + 2), 3.6))
    ax = fig.add_subplot()
    x = range(len(bars))
    ax.bar([i - 0.2 for i in x], [_positive(m.max_abs) for _, m in bars], 0.4, label="max abs")
    ax.bar([i + 0.2 for i in x], [_positive(m.mean_abs) for _, m in bars], 0.4, label="mean abs")
    ax.scatter(list(x), [_allowed(m) for _, m in bars], marker="_", s=600, c="red", label="allowed")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [label for label, _ in bars], fontsize=8)
    ax.set_ylabel("absolute error")
    ax.set_title("Error per output")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _img("plot-outputs", "error per output", _png(fig))


def plot_layers(lw: LayerwiseResult, index: int) -> str | None:
    from matplotlib.figure import Figure

    if not lw.layers:
        return None
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot()
    xs = list(range(len(lw.layers)))
    ax.semilogy(xs, [_positive(l.metrics.max_abs) for l in lw.layers], ".-", label="max abs")  # noqa: E741
    ax.semilogy(xs, [_positive(l.metrics.mean_abs) for l in lw.layers], ".-", label="mean abs")  # noqa: E741
    ax.semilogy(
        xs, [_allowed(layer.metrics) for layer in lw.layers], "--", c="red", lw=0.8,
        label="allowed",
    )  # fmt: skip
    first = lw.first_divergence
    if first is not None:
        at = lw.layers.index(first)
        ax.axvline(at, c="red", alpha=0.5)
        ax.annotate(
            f"first divergence: {first.match.reference_op} {first.match.reference_node}",
            (at, _positive(first.metrics.max_abs)),
            fontsize=8,
            color="red",
            xytext=(5, 5),
            textcoords="offset points",
        )
    step = max(1, len(xs) // 30)
    ax.set_xticks(
        xs[::step],
        layer_tick_labels(lw)[::step],
        rotation=90,
        fontsize=7,
    )
    ax.set_xlabel("tensor, in the reference's topological order (producer node)")
    ax.set_ylabel("absolute error")
    ax.set_title(f"Error per layer: {lw.model} on {lw.provider}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _img(f"plot-layers-{index}", f"error per layer, {lw.model} on {lw.provider}", _png(fig))


def plot_stability(report: ComparisonResults) -> str | None:
    from matplotlib.figure import Figure

    st = report.stability
    if st is None or not st.perturbation:
        return None
    use_accuracy = all(ms.clean_accuracy is not None for ms in st.perturbation)
    use_flips = any(p.flip_rate is not None for ms in st.perturbation for p in ms.perturbations)
    names = ["clean"] if use_accuracy else []
    names += [p.name for p in st.perturbation[0].perturbations if p.applied]
    fig = Figure(figsize=(max(6.0, 0.8 * len(names) + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / len(st.perturbation)
    for k, ms in enumerate(st.perturbation):
        by_name = {p.name: p for p in ms.perturbations}
        values = []
        for name in names:
            if name == "clean":
                values.append(ms.clean_accuracy)
            elif use_accuracy:
                values.append(by_name[name].accuracy)
            elif use_flips:
                values.append(by_name[name].flip_rate)
            else:
                values.append(by_name[name].relative_change)
        xs = [i + (k - (len(st.perturbation) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=ms.model)
    what = "accuracy" if use_accuracy else ("top-1 flip rate" if use_flips else "relative change")
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.set_ylabel(what)
    ax.set_title(f"{what.capitalize()} per perturbation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _img("plot-stability", f"{what} per perturbation", _png(fig))


def render_html(report: ComparisonResults) -> str:
    plots = matplotlib_available()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>bnsurgery compare report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>bnsurgery compare</h1>",
    ]
    for note in report.fallbacks:
        parts.append(f'<p class="warn">WARNING: {_esc(note)}</p>')
    verdict = "PASS" if report.passed else "FAIL"
    detail = result_line(report).removeprefix("result: ").removeprefix(f"{verdict}, ")
    parts.append(
        f'<p id="result">Result: <span class="{verdict.lower()}">{verdict}</span>, '
        f"{_esc(detail)}</p>"
    )
    d = report.data
    summary = [
        ["reference", session_line(report)],
        ["candidate", report.candidate or "-"],
        ["providers", ", ".join(report.providers)],
        [
            "data",
            f"{d['source']}: {plural(d.get('samples') or 0, 'sample')}, "
            f"{plural(d.get('batches', 0), 'batch', 'batches')}",
        ],
        ["labels", "yes" if d.get("labels") else "no"],
        ["generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],  # noqa: UP017
    ]
    parts.append(_html_table(["", ""], summary))
    for note in report.notes:
        if note not in report.fallbacks:
            parts.append(f'<p class="note">{_esc(note)}</p>')
    if not plots:
        parts.append(
            '<p class="warn" id="no-plots">matplotlib is not installed, so this report has '
            "tables only. Install the plots with <code>pip install 'bnsurgery[report]'</code>."
            "</p>"
        )

    parts.append("<h2>Sessions</h2>")
    sessions = [("reference", report.reference_session)] + [
        (p.model, p.session) for p in report.pairs
    ]
    parts.append(
        _html_table(
            ["model", "requested", "ran on", "fallback", "optimization", "options", "threads"],
            [
                [
                    role,
                    s.alias,
                    ", ".join(s.active),
                    "YES" if s.fallback else "no",
                    s.opt_level,
                    ", ".join(f"{k}={v}" for k, v in s.provider_options.items()) or "-",
                    f"intra {s.intra_op_threads}, inter {s.inter_op_threads} (0 = ORT default)",
                ]
                for role, s in sessions
            ],
            left=7,
        )
    )
    if report.pairs:
        parts.append("<h2>Outputs</h2>")
        rows = []
        for p in report.pairs:
            for m in p.outputs:
                rows.append(
                    [
                        p.model,
                        p.session.describe(),
                        m.name,
                        *error_cells(m),
                        nonfinite_cell(m),
                        number_text(m.noise_max_abs),
                        judged_cell(m),
                        _verdict(m.passed),
                    ]
                )
        parts.append(
            _html_table(
                [
                    "model",
                    "provider",
                    "output",
                    "max abs",
                    "max rel",
                    "mean abs",
                    "cosine",
                    "top-1",
                    "top-5 set",
                    "accuracy ref / cand",
                    "NaN+Inf ref / cand",
                    "noise max abs",
                    "judged",
                    "result",
                ],
                rows,
                left=3,
            )
        )
        if plots:
            parts.append(plot_outputs(report) or "")
    for i, lw in enumerate(report.layerwise):
        parts.append(f"<h2>Layer-wise: {_esc(lw.model)} on {_esc(lw.provider)}</h2>")
        parts.append(f"<p>{_esc(layer_summary(lw))}. {_esc(divergence_line(lw))}.</p>")
        if plots:
            parts.append(plot_layers(lw, i) or "")
        rows = [
            [
                n,
                layer.match.reference_op,
                layer.match.reference_node,
                layer.match.reference,
                layer.match.candidate or "-",
                layer.match.how,
                number_text(layer.metrics.max_abs),
                number_text(layer.metrics.max_rel),
                number_text(layer.metrics.mean_abs),
                _verdict(layer.metrics.passed),
            ]
            for n, layer in enumerate(lw.layers)
        ]
        parts.append(
            _html_table(
                [
                    "#",
                    "op",
                    "node",
                    "tensor",
                    "candidate tensor",
                    "matched by",
                    "max abs",
                    "max rel",
                    "mean abs",
                    "result",
                ],
                rows,
                left=6,
            )
        )
        if lw.unmatched:
            names = ", ".join(f"{u.reference} ({u.reference_op})" for u in lw.unmatched)
            parts.append(f'<p class="note">Without counterpart: {_esc(names)}</p>')
    if report.stability is not None:
        parts.append(_stability_html(report, plots))
    parts.append("</body></html>")
    return "\n".join(parts)


def _stability_html(report: ComparisonResults, plots: bool) -> str:
    st = report.stability
    assert st is not None
    parts = ["<h2>Stability</h2>"]
    if plots:
        parts.append(plot_stability(report) or "")
    for ms in st.perturbation:
        acc = (
            f", clean accuracy {percent_text(ms.clean_accuracy)}"
            if ms.clean_accuracy is not None
            else ""
        )
        parts.append(
            f"<p>{_esc(ms.model)} on {_esc(ms.provider)}, output '{_esc(ms.output)}'{_esc(acc)}</p>"
        )
        rows = [
            [
                p.name,
                p.description,
                number_text(p.mean_abs_change),
                number_text(p.max_abs_change),
                percent_text(p.relative_change),
                percent_text(p.flip_rate),
                percent_text(p.accuracy),
            ]
            if p.applied
            else [p.name, p.description, "not applicable", "", "", "", ""]
            for p in ms.perturbations
        ]
        parts.append(
            _html_table(
                [
                    "perturbation",
                    "what",
                    "mean abs change",
                    "max abs change",
                    "relative",
                    "top-1 flips",
                    "accuracy",
                ],
                rows,
            )
        )
    parts.append("<h3>Determinism</h3>")
    parts.append(
        _html_table(
            ["model", "provider", "ran on", "two runs bitwise equal", "max abs difference"],
            [
                [
                    d.model,
                    d.provider,
                    d.ran_on,
                    "yes" if d.bitwise_equal else "NO",
                    number_text(d.max_abs_difference),
                ]
                for d in st.determinism
            ],
            left=3,
        )
    )
    parts.append("<h3>float16</h3>")
    rows = []
    for f in st.fp16:
        if f.error:
            rows.append([f.model, f.provider, f"could not run: {f.error}", "", "", "", ""])
            continue
        rows.append(
            [
                f.model,
                f.provider,
                number_text(max((m.max_abs for m in f.outputs), default=0.0)),
                _verdict(f.passed),
                sum(f.conversion.get("weights_overflowing_to_inf", {}).values()),
                f.output_inf,
                f.first_overflow or "none",
            ]
        )
    parts.append(
        _html_table(
            [
                "model",
                "provider",
                "max abs error",
                "within fp16 tolerance",
                "weights overflowing to inf",
                "inf in outputs",
                "first tensor with inf",
            ],
            rows,
        )
    )
    for note in st.notes:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    return "\n".join(parts)


def write_html(report: ComparisonResults, path: str | os.PathLike[str]) -> Path:
    """Write the HTML report atomically (rendered once the folder is known to be there);
    returns the path. A folder that does not exist or cannot be written is bad input."""
    return atomic_write(
        path, lambda fh: fh.write(render_html(report).encode("utf-8")), option="report"
    )
