"""A comparison as text for the terminal: the summary, the table of outputs, each verdict,
where the nodes ran, the layer-wise first divergence, stability, and the result line.

The cell formatters here (`number_text`, `error_cells`, `judged_cell`, ...) serve the HTML page
too (harness.render_html), so both show the same numbers the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bnsurgery.harness.metrics import ErrorMetrics, ratio_text
from bnsurgery.harness.results import ComparisonResults, LayerwiseResult


def number_text(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def percent_text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def cosine_text(value: float | None) -> str:
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


def nonfinite_cell(m: ErrorMetrics) -> str:
    return f"{m.reference_nan + m.reference_inf} / {m.candidate_nan + m.candidate_inf}"


def error_cells(m: ErrorMetrics) -> list[str]:
    """The error columns the text and HTML output tables share: max abs, max rel, mean abs,
    cosine, top-1, top-5, accuracy reference/candidate."""
    return [
        number_text(m.max_abs),
        number_text(m.max_rel),
        number_text(m.mean_abs),
        cosine_text(m.cosine),
        percent_text(m.top1_agreement),
        percent_text(m.top5_agreement),
        accuracy_cell(m),
    ]


def judged_cell(m: ErrorMetrics) -> str:
    """The verdict's number in a few characters: "0.8x/8x" of the noise, or the tolerances."""
    if m.nothing_finite:
        return "all NaN/Inf"
    if m.rule == "noise":
        return f"{ratio_text(math.inf if m.ratio is None else m.ratio)} / {m.limit:g}x noise"
    return f"atol {number_text(m.atol)} rtol {number_text(m.rtol)}"


def accuracy_cell(m: ErrorMetrics) -> str:
    if m.reference_accuracy is None:
        return "-"
    return f"{percent_text(m.reference_accuracy)} / {percent_text(m.candidate_accuracy)}"


def session_line(report: ComparisonResults) -> str:
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
        f"first divergence at {where}: max abs {number_text(m.max_abs)}, "
        f"max rel {number_text(m.max_rel)}, {m.verdict()}"
    )


def render_text(report: ComparisonResults) -> str:
    lines: list[str] = []
    for note in report.fallbacks:
        lines.append(f"WARNING: {note}")
    lines.append(f"reference  {session_line(report)}")
    if report.candidate:
        lines.append(f"candidate  {report.candidate}")
    d = report.data
    labels = "with labels" if d.get("labels") else "no labels"
    lines.append(
        f"data       {d['source']}: {plural(d.get('samples') or 0, 'sample')}, "
        f"{plural(d.get('batches', 0), 'batch', 'batches')} of up to "
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
                        *error_cells(m),
                        number_text(m.noise_max_abs),
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
        caveat = report.divergence_caveat(lw)
        if caveat:
            lines.append(f"  note: {caveat}")
    if report.stability is not None:
        lines += ["", *_stability_text(report)]
    lines.append("")
    lines.append(result_line(report))
    return "\n".join(lines)


def placement_lines(report: ComparisonResults) -> list[str]:
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


def result_line(report: ComparisonResults) -> str:
    if not report.pairs:
        return "result: nothing compared (stability only)"
    fallback = sum(p.session.fallback for p in report.pairs) + report.reference_session.fallback
    caveat = f" ({fallback} run(s) on a FALLBACK provider, see the warning)" if fallback else ""
    if report.passed:
        n = len(report.pairs)
        return f"result: PASS, {plural(n, 'comparison')} within tolerance{caveat}"
    parts = []
    for pair in report.failures:
        bad = [m for m in pair.outputs if not m.passed]
        names = ", ".join(
            f"{m.name} ({m.verdict()}, max abs {number_text(m.max_abs)})" for m in bad
        )
        parts.append(f"{pair.model} on {pair.session.describe()}: {names}")
    return "result: FAIL, beyond tolerance: " + "; ".join(parts) + caveat


def plural(n: int, word: str, plural_form: str = "") -> str:
    """`1 sample`, `2 samples`; `plural_form` where adding an s is wrong (`batches`)."""
    return f"{n} {word if n == 1 else plural_form or word + 's'}"


def _stability_text(report: ComparisonResults) -> list[str]:
    st = report.stability
    assert st is not None
    lines = []
    for ms in st.perturbation:
        acc = (
            f", clean accuracy {percent_text(ms.clean_accuracy)}"
            if ms.clean_accuracy is not None
            else ""
        )
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
                    number_text(p.mean_abs_change),
                    number_text(p.max_abs_change),
                    percent_text(p.relative_change),
                    percent_text(p.flip_rate),
                    percent_text(p.accuracy),
                ]
            )
        lines += text_table(rows, "  ")
    for d in st.determinism:
        verdict = (
            "bitwise equal"
            if d.bitwise_equal
            else f"NOT bitwise equal (max abs diff {number_text(d.max_abs_difference)})"
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
            f"fp16, {f.model} on {f.provider}: max abs error {number_text(worst)} ({verdict} fp16 "
            f"tolerance), weights overflowing to inf: {overflow}, flushed to zero: {flushed}, "
            f"inf in outputs: {f.output_inf}, first tensor with inf: {f.first_overflow or 'none'}"
        )
    for note in st.notes:
        lines.append(f"  note: {note}")
    return lines
