"""The JSON form of a comparison: the `bnsurgery.compare/2` document (schema in docs/compare.md).

Strictly JSON: infinities and NaN are written as the strings "inf", "-inf" and "nan" by the
parts' own `to_dict()` (harness.metrics), never as bare literals.
"""

from __future__ import annotations

from typing import Any

from bnsurgery.harness.results import ComparisonResults, LayerwiseResult

SCHEMA = "bnsurgery.compare/2"


def report_dict(results: ComparisonResults) -> dict[str, Any]:
    """The whole document: reference, candidate, data, tolerances, every comparison, the
    layer-wise ones (null when none ran), stability and notes."""
    return {
        "schema": SCHEMA,
        "passed": results.passed,
        "reference": {
            "model": results.reference,
            "provider": results.providers[0],
            "session": results.reference_session.to_dict(),
        },
        "candidate": {"model": results.candidate} if results.candidate else None,
        "providers": list(results.providers),
        "data": results.data,
        "tolerances": results.tolerances.to_dict(),
        "fallbacks": results.fallbacks,
        "comparisons": [p.to_dict() for p in results.pairs],
        "layerwise": [layerwise_dict(results, lw) for lw in results.layerwise]
        if results.layerwise
        else None,
        "stability": results.stability.to_dict() if results.stability else None,
        "notes": list(results.notes),
    }


def layerwise_dict(results: ComparisonResults, lw: LayerwiseResult) -> dict[str, Any]:
    """One layer-wise comparison, with the caveat its first divergence may need."""
    return {**lw.to_dict(), "note": results.divergence_caveat(lw)}
