"""The output `reestimate` and `adapt` share: the drift warning, the before/after evidence of
the guard (passes.adapt_guard, adapt_auto), and writing or refusing the adapted model. Their
shared options (--max-drop, --force, --auto) are cli.options.guard_options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnsurgery.cli.render import emit, info, save_and_emit
from bnsurgery.errors import CheckFailed
from bnsurgery.passes.adapt_guard import drift, drift_warning, harm_figure


def finish(
    as_json: bool,
    outcome: Any,
    reestimate_report: Any,
    payload: dict[str, Any],
    text: Callable[[], str],
    target: Path,
    force: bool,
    **extra: Any,
) -> None:
    """Add the drift figure and the evidence, warn, then write or refuse (exit 1)."""
    relative = "source_relative" in (reestimate_report.extras if reestimate_report else {})
    if reestimate_report is not None and reestimate_report.bns:
        evidence = outcome.evidence if outcome is not None else None
        figure = harm_figure(drift(reestimate_report.bns), evidence)
        figure["warn"] = figure["warn"] and not relative
        payload["drift"] = figure
        if figure["warn"]:
            info(drift_warning(figure))
    if outcome is not None:
        payload.update(outcome.to_dict())

    def full_text() -> str:
        lines = [line for line in [text()] if line]  # no report: no blank first line
        if outcome is not None:
            if outcome.tried:
                lines.append(f"auto: chose {outcome.chosen}: {outcome.reason}")
            lines += outcome.evidence.lines()
        return "\n".join(lines)

    refused = outcome is not None and (outcome.result is None or outcome.evidence.refused)
    if refused and not (force and outcome.result is not None):
        payload["output"] = None
        emit(as_json, payload, full_text)
        ev = outcome.evidence
        if outcome.result is None:
            why = f"--auto found no adaptation to write: {outcome.reason}"
        else:
            why = (
                f"adaptation lowers held-out accuracy {ev.accuracy_before:.2f} % -> "
                f"{ev.accuracy_after:.2f} % (more than --max-drop {ev.max_drop:g} points; "
                "--force writes it anyway)"
            )
        raise CheckFailed(f"{why}; {target} was not written")
    if refused:
        outcome.evidence.forced = True
        payload.update(outcome.to_dict())
    given = extra.pop("model", None)
    model = outcome.result.model if outcome is not None else given
    save_and_emit(as_json, model, target, payload, full_text, **extra)
