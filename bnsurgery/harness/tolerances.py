"""Explicit tolerances: what atol/rtol (`--atol`/`--rtol`) set, per output or for all, and the
dtype defaults that fill the half not given. An output with neither is judged by the
rounding-noise rule (bnsurgery.harness.metrics, docs/verification.md), not by these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnsurgery.errors import BadInputError

NOISE_LIMIT = 8.0  # the default rule: deviation at most 8x the rounding noise
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {  # (atol, rtol)
    "float32": (1e-5, 1e-4),
    "float16": (2.5e-3, 1e-3),
    # bf16 keeps 8 significant bits (fp16 keeps 11): one rounding is ~4e-3 relative.
    "bfloat16": (2e-2, 1e-2),
}
ToleranceArg = Sequence[str] | str | float | None


def machine_epsilon(dtype_name: str) -> float:
    """Machine epsilon of a dtype, by name (the gap between 1 and the next value; one rounding
    is half of it): bfloat16's 2^-7 by hand, numpy's for the others, fp32's for anything that
    is not a float."""
    if dtype_name == "bfloat16":
        return 2.0**-7
    try:
        return float(np.finfo(np.dtype(dtype_name)).eps)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).eps)


def default_tolerance(dtype: np.dtype | str | None) -> tuple[float, float]:
    """(atol, rtol) for an output's dtype: its own pair if it has one, else the fp32 pair."""
    try:
        name = np.dtype(dtype).name if dtype is not None else ""
    except TypeError:
        name = str(dtype)
    return DEFAULT_TOLERANCES.get(name, DEFAULT_TOLERANCES["float32"])


@dataclass(frozen=True)
class ToleranceSpec:
    """User tolerances: a global atol/rtol (None = by dtype) and per-output overrides."""

    atol: float | None = None
    rtol: float | None = None
    per_output_atol: Mapping[str, float] | None = None
    per_output_rtol: Mapping[str, float] | None = None

    @classmethod
    def parse(cls, atol: ToleranceArg = None, rtol: ToleranceArg = None) -> ToleranceSpec:
        """From CLI strings: `1e-4` (every output) or `name:1e-4` (one output), repeatable."""
        g_atol, p_atol = _parse_tolerances(atol, "atol")
        g_rtol, p_rtol = _parse_tolerances(rtol, "rtol")
        return cls(g_atol, g_rtol, p_atol, p_rtol)

    def explicit_for(self, name: str) -> bool:
        """Whether the user set atol or rtol for this output (else the noise rule judges it)."""
        return (
            self.atol is not None
            or self.rtol is not None
            or name in (self.per_output_atol or {})
            or name in (self.per_output_rtol or {})
        )

    def for_output(self, name: str, dtype: Any) -> tuple[float | None, float | None]:
        """(atol, rtol) when the user set either for this output (the other from the dtype's
        defaults); (None, None) when neither: the rounding-noise rule judges it."""
        if not self.explicit_for(name):
            return None, None
        atol, rtol = default_tolerance(dtype)
        if self.atol is not None:
            atol = self.atol
        if self.rtol is not None:
            rtol = self.rtol
        atol = (self.per_output_atol or {}).get(name, atol)
        rtol = (self.per_output_rtol or {}).get(name, rtol)
        return atol, rtol

    def check_names(self, outputs: Sequence[str]) -> None:
        named = set(self.per_output_atol or {}) | set(self.per_output_rtol or {})
        unknown = sorted(named - set(outputs))
        if unknown:
            atol_named = set(self.per_output_atol or {}) & set(unknown)
            raise BadInputError(
                f"tolerance given for unknown output(s) {', '.join(repr(n) for n in unknown)} "
                f"(outputs: {', '.join(repr(o) for o in outputs)})",
                option="atol" if atol_named else "rtol",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "atol": self.atol,
            "rtol": self.rtol,
            "per_output_atol": dict(self.per_output_atol or {}),
            "per_output_rtol": dict(self.per_output_rtol or {}),
            # outputs with no atol/rtol of their own are judged by the rounding-noise rule
            "rule": "rounding-noise",
            "noise_limit": NOISE_LIMIT,
            # fills the other half when only atol or only rtol is given
            "defaults": {k: {"atol": a, "rtol": r} for k, (a, r) in DEFAULT_TOLERANCES.items()},
        }


def _parse_tolerances(values: ToleranceArg, what: str) -> tuple[float | None, dict[str, float]]:
    if values is None:
        return None, {}
    if isinstance(values, int | float | str):
        values = [values]  # type: ignore[list-item]
    overall: float | None = None
    per_output: dict[str, float] = {}
    for item in values:
        text = str(item).strip()
        name, sep, number = text.rpartition(":")
        try:
            value = float(number if sep else text)
        except ValueError:
            raise BadInputError(
                f"bad {{option}} '{text}': expected a number or OUTPUT:NUMBER", option=what
            ) from None
        if not math.isfinite(value) or value < 0:
            raise BadInputError(
                f"bad {{option}} '{text}': must be a finite number >= 0", option=what
            )
        if sep:
            if not name:
                raise BadInputError(f"bad {{option}} '{text}': empty output name", option=what)
            per_output[name] = value
        else:
            overall = value
    return overall, per_output


# ---------------------------------------------------------------------------------------------
