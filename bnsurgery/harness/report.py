"""Show a CompareReport: a text table for the terminal, and a self-contained HTML page.

The JSON form is `CompareReport.to_dict()` (schema in docs/compare.md). The HTML report embeds
its plots as base64 PNG when matplotlib is importable (the `[report]` extra): error per output,
error per layer (layer-wise) and accuracy or flip rate per perturbation (stability). Without
matplotlib it still writes the page, with the tables and a note saying what is missing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnsurgery.errors import BadInputError
from bnsurgery.harness.metrics import ratio_text

if TYPE_CHECKING:
    from bnsurgery.harness.compare import CompareReport, LayerwiseResult
    from bnsurgery.harness.metrics import ErrorMetrics


def _g(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.9f}"


def text_table(
    rows: Sequence[Sequence[str]], indent: str = "", max_width: int | None = None
) -> list[str]:
    """A plain text table, one line per row: the first row is the header, underlined with
    dashes; each column is as wide as its widest cell, or max_width when that is smaller."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if max_width is not None:
        widths = [min(w, max_width) for w in widths]
    out = []
    for n, row in enumerate(rows):
        out.append(
            indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
        if n == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


def _nonfinite(m: ErrorMetrics) -> str:
    return f"{m.reference_nan + m.reference_inf} / {m.candidate_nan + m.candidate_inf}"


def _error_cells(m: ErrorMetrics) -> list[str]:
    """The error columns the text and HTML output tables share: max abs, max rel, mean abs,
    cosine, top-1, top-5, accuracy reference/candidate."""
    return [
        _g(m.max_abs),
        _g(m.max_rel),
        _g(m.mean_abs),
        _cos(m.cosine),
        _pct(m.top1_agreement),
        _pct(m.top5_agreement),
        _accuracy(m),
    ]


def judged_cell(m: ErrorMetrics) -> str:
    """The verdict's number in a few characters: "0.8x/8x" of the noise, or the tolerances."""
    if m.nothing_finite:
        return "all NaN/Inf"
    if m.rule == "noise":
        return f"{ratio_text(math.inf if m.ratio is None else m.ratio)} / {m.limit:g}x noise"
    return f"atol {_g(m.atol)} rtol {_g(m.rtol)}"


def _accuracy(m: ErrorMetrics) -> str:
    if m.reference_accuracy is None:
        return "-"
    return f"{_pct(m.reference_accuracy)} / {_pct(m.candidate_accuracy)}"


def _session_line(report: CompareReport) -> str:
    info = report.reference_session
    return f"{report.reference} on {info.describe()}, {info.opt_level}"


def layer_summary(lw: LayerwiseResult) -> str:
    counts = lw.counts()
    how = ", ".join(
        f"{counts[f'by_{k}']} by {k}" for k in ("map", "structure", "name") if counts[f"by_{k}"]
    )
    return (
        f"{counts['matched']} tensors matched ({how or 'none'}), "
        f"{counts['unmatched']} without counterpart"
    )


def divergence_line(lw: LayerwiseResult) -> str:
    first = lw.first_divergence
    if first is None:
        if not lw.layers:
            return "no tensor could be matched, so no layer was compared"
        return "no divergence: every matched tensor is within tolerance"
    m, match = first.metrics, first.match
    where = f"{match.reference_op} node '{match.reference_node}' (tensor '{match.reference}')"
    if match.candidate_node and (
        match.candidate_node != match.reference_node or match.candidate != match.reference
    ):
        where += (
            f", in the candidate {match.candidate_op} node '{match.candidate_node}' "
            f"(tensor '{match.candidate}')"
        )
    return (
        f"first divergence at {where}: max abs {_g(m.max_abs)}, max rel {_g(m.max_rel)}, "
        f"{m.verdict()}"
    )


def divergence_caveat(report: CompareReport, lw: LayerwiseResult) -> str | None:
    """What a first divergence means when the pair's outputs still agree: most likely two
    tensors paired by name that mean different things, which a tensor map fixes."""
    if lw.first_divergence is None:
        return None
    pair = next((p for p in report.pairs if (p.model, p.provider) == (lw.model, lw.provider)), None)
    if pair is None or not pair.passed:
        return None
    return (
        "the outputs agree, so this is most likely no error: the two graphs name their tensors "
        "differently, and this pairs two tensors that mean different things (after a fold, a "
        "tool may keep the Conv's pre-BN name for the post-BN tensor). Give the correspondence "
        "with --map MAP.json (a `bnsurgery fold --json` report, or a JSON object {reference "
        "tensor: candidate tensor})"
    )


def render_text(report: CompareReport) -> str:
    lines: list[str] = []
    for note in report.fallbacks:
        lines.append(f"WARNING: {note}")
    lines.append(f"reference  {_session_line(report)}")
    if report.candidate:
        lines.append(f"candidate  {report.candidate}")
    d = report.data
    labels = "with labels" if d.get("labels") else "no labels"
    lines.append(
        f"data       {d['source']}: {_plural(d.get('samples') or 0, 'sample')}, "
        f"{_plural(d.get('batches', 0), 'batch', 'batches')} of up to "
        f"{d.get('batch_size') or '-'}, {labels}"
    )
    for note in report.notes:
        if note not in report.fallbacks:
            lines.append(f"note       {note}")
    if report.pairs:
        lines.append("")
        rows = [
            [
                "model",
                "provider",
                "level",
                "output",
                "max abs",
                "max rel",
                "mean abs",
                "cosine",
                "top-1",
                "top-5 set",
                "acc ref/cand",
                "noise",
                "judged",
                "result",
            ]
        ]
        for pair in report.pairs:
            for m in pair.outputs:
                rows.append(
                    [
                        pair.model,
                        pair.session.describe(),
                        pair.session.opt_level.replace("ORT_", "").lower(),
                        m.name,
                        *_error_cells(m),
                        _g(m.noise_max_abs),
                        judged_cell(m),
                        "ok" if m.passed else "FAIL",
                    ]
                )
        lines += text_table(rows)
        for pair in report.pairs:
            for m in pair.outputs:
                lines.append(f"  {pair.model} on {pair.provider}, {m.name}: {m.verdict()}")
                if m.note:
                    lines.append(f"  {pair.model} on {pair.provider}, {m.name}: {m.note}")
    placement = placement_lines(report)
    if placement:
        lines.append("")
        lines += placement
    for lw in report.layerwise:
        lines.append("")
        lines.append(f"layer-wise, {lw.model} on {lw.provider}: {layer_summary(lw)}")
        lines.append(f"  {divergence_line(lw)}")
        caveat = divergence_caveat(report, lw)
        if caveat:
            lines.append(f"  note: {caveat}")
    if report.stability is not None:
        lines += ["", *_stability_text(report)]
    lines.append("")
    lines.append(result_line(report))
    return "\n".join(lines)


def placement_lines(report: CompareReport) -> list[str]:
    """Where the nodes ran, for every session not on the CPU provider (the CPU provider runs
    every node by definition): `placement  candidate on openvino: 15 of 16 nodes; on CPU: ...`."""
    sessions = [
        ("reference", report.reference_session),
        *((p.model, p.session) for p in report.pairs),
    ]
    lines = []
    for model, session in sessions:
        if session.placement is None or session.requested == "CPUExecutionProvider":
            continue
        summary = session.placement.summary(session.alias or session.requested)
        lines.append(f"{'placement' if not lines else '':<9}  {model} on {summary}")
    return lines


def result_line(report: CompareReport) -> str:
    if not report.pairs:
        return "result: nothing compared (stability only)"
    fallback = sum(p.session.fallback for p in report.pairs) + report.reference_session.fallback
    caveat = f" ({fallback} run(s) on a FALLBACK provider, see the warning)" if fallback else ""
    if report.passed:
        n = len(report.pairs)
        return f"result: PASS, {_plural(n, 'comparison')} within tolerance{caveat}"
    parts = []
    for pair in report.failures:
        bad = [m for m in pair.outputs if not m.passed]
        names = ", ".join(f"{m.name} ({m.verdict()}, max abs {_g(m.max_abs)})" for m in bad)
        parts.append(f"{pair.model} on {pair.session.describe()}: {names}")
    return "result: FAIL, beyond tolerance: " + "; ".join(parts) + caveat


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _stability_text(report: CompareReport) -> list[str]:
    st = report.stability
    assert st is not None
    lines = []
    for ms in st.perturbation:
        acc = f", clean accuracy {_pct(ms.clean_accuracy)}" if ms.clean_accuracy is not None else ""
        lines.append(f"stability, {ms.model} on {ms.provider}, output '{ms.output}'{acc}:")
        rows = [
            [
                "perturbation",
                "mean abs change",
                "max abs change",
                "relative",
                "top-1 flips",
                "accuracy",
            ]
        ]
        for p in ms.perturbations:
            if not p.applied:
                rows.append([p.name, "(not applicable)", "", "", "", ""])
                continue
            rows.append(
                [
                    p.name,
                    _g(p.mean_abs_change),
                    _g(p.max_abs_change),
                    _pct(p.relative_change),
                    _pct(p.flip_rate),
                    _pct(p.accuracy),
                ]
            )
        lines += text_table(rows, "  ")
    for d in st.determinism:
        verdict = (
            "bitwise equal"
            if d.bitwise_equal
            else f"NOT bitwise equal (max abs diff {_g(d.max_abs_difference)})"
        )
        lines.append(f"determinism, {d.model} on {d.provider} ({d.ran_on}): two runs {verdict}")
    for f in st.fp16:
        if f.error:
            lines.append(f"fp16, {f.model}: could not run: {f.error}")
            continue
        worst = max((m.max_abs for m in f.outputs), default=0.0)
        overflow = sum(f.conversion.get("weights_overflowing_to_inf", {}).values())
        flushed = sum(f.conversion.get("weights_flushed_to_zero", {}).values())
        verdict = "within" if f.passed else "BEYOND"
        lines.append(
            f"fp16, {f.model} on {f.provider}: max abs error {_g(worst)} ({verdict} fp16 "
            f"tolerance), weights overflowing to inf: {overflow}, flushed to zero: {flushed}, "
            f"inf in outputs: {f.output_inf}, first tensor with inf: {f.first_overflow or 'none'}"
        )
    for note in st.notes:
        lines.append(f"  note: {note}")
    return lines


# --- HTML -------------------------------------------------------------------------------------

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


def plot_outputs(report: CompareReport) -> str | None:
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


def plot_stability(report: CompareReport) -> str | None:
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


def render_html(report: CompareReport) -> str:
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
        ["reference", _session_line(report)],
        ["candidate", report.candidate or "-"],
        ["providers", ", ".join(report.providers)],
        [
            "data",
            f"{d['source']}: {_plural(d.get('samples') or 0, 'sample')}, "
            f"{_plural(d.get('batches', 0), 'batch', 'batches')}",
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
                        *_error_cells(m),
                        _nonfinite(m),
                        _g(m.noise_max_abs),
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
                _g(layer.metrics.max_abs),
                _g(layer.metrics.max_rel),
                _g(layer.metrics.mean_abs),
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


def _stability_html(report: CompareReport, plots: bool) -> str:
    st = report.stability
    assert st is not None
    parts = ["<h2>Stability</h2>"]
    if plots:
        parts.append(plot_stability(report) or "")
    for ms in st.perturbation:
        acc = f", clean accuracy {_pct(ms.clean_accuracy)}" if ms.clean_accuracy is not None else ""
        parts.append(
            f"<p>{_esc(ms.model)} on {_esc(ms.provider)}, output '{_esc(ms.output)}'{_esc(acc)}</p>"
        )
        rows = [
            [
                p.name,
                p.description,
                _g(p.mean_abs_change),
                _g(p.max_abs_change),
                _pct(p.relative_change),
                _pct(p.flip_rate),
                _pct(p.accuracy),
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
                    _g(d.max_abs_difference),
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
                _g(max((m.max_abs for m in f.outputs), default=0.0)),
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


def write_html(report: CompareReport, path: str | os.PathLike[str]) -> Path:
    """Write the HTML report atomically; returns the path."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"--report {target}: folder {folder} does not exist")
    page = render_html(report)
    staging = folder / f".{target.name}.tmp"
    try:
        staging.write_text(page, encoding="utf-8")
        os.replace(staging, target)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise BadInputError(f"--report {target}: cannot write ({exc.strerror})") from None
    return target
