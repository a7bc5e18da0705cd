"""Provider parity: the model on each requested execution provider against the CPU reference.

The reference is ONNX Runtime CPU with graph optimizations off (ORT_DISABLE_ALL); each requested
provider runs the model as it is deployed, at ORT_ENABLE_ALL (the InferenceSession default)
unless asked otherwise. So `--providers cpu` alone already checks ORT's own CPU graph fusions.
The comparison is the harness's (bnsurgery.harness.compare), on DATA or seeded random inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

from bnsurgery.errors import first_line
from bnsurgery.runtime.providers import OPT_LEVELS
from bnsurgery.validation.checks import Finding, Skip, check
from bnsurgery.validation.checks.context import ValidationContext, describe_mismatch


@check(
    "provider-parity",
    "error",
    "each requested execution provider matches the CPU reference within tolerance",
    "find where the providers part ways: bnsurgery compare MODEL --providers cpu,PROVIDER "
    "--layerwise; then keep that op on CPU or loosen the tolerance knowingly",
    runs_model=True,
)
def provider_parity(ctx: ValidationContext) -> Iterator[Finding]:
    ctx.require_runnable()
    requested = list(ctx.providers)
    if requested == ["cpu"] and ctx.parity_opt_level == "disable_all":
        raise Skip("only the CPU reference itself was asked for")
    providers = ["cpu", *[p for p in requested if p != "cpu"]]
    report = ctx.compare(
        None, providers, opt_level=ctx.parity_opt_level, reference_opt_level="disable_all"
    )
    if isinstance(report, Exception):  # onnxruntime cannot load or run the model
        exc = report
        first = first_line(exc)
        yield provider_parity.finding(
            f"the model does not run on onnxruntime ({', '.join(providers)}): "
            f"{type(exc).__name__}: {first[:300]}",
            hint="the deployment runtime rejects it: check the opset and dtypes the provider "
            "supports (fp64 Conv, bf16 and custom ops are common causes)",
            details={"providers": providers, "error": f"{type(exc).__name__}: {first}"},
        )
        return
    level = OPT_LEVELS.get(ctx.parity_opt_level, ctx.parity_opt_level)
    ctx.details["provider-parity"] = {
        "reference": "cpu, ORT_DISABLE_ALL",
        "opt_level": level,
        "data": report.data,
        "comparisons": [
            {"provider": pair.provider, "passed": pair.passed,
             "placement": (pair.session.placement.to_dict()
                           if pair.session.placement else None),
             "fallback": pair.session.fallback,
             "outputs": [m.to_dict() for m in pair.outputs]}
            for pair in report.pairs if pair.provider in requested
        ],
    }  # fmt: skip
    for note in report.fallbacks:  # allowed (allow_fallback), but never silent
        ctx.notes.append(f"provider-parity: WARNING: {note}")
    for pair in report.pairs:
        if pair.provider not in requested:
            continue  # cpu at the deployment level, when only other providers were asked
        for metrics in pair.outputs:
            if not metrics.passed:
                yield provider_parity.finding(
                    f"{pair.session.describe()} at {level} differs from the CPU reference "
                    f"(ORT_DISABLE_ALL) on output '{metrics.name}': {describe_mismatch(metrics)}",
                    details={"provider": pair.provider, "output": metrics.to_dict()},
                )
