"""BatchNormalization health: mode, parameter values and statistics, one check per problem.

Parameters are read as constants in float64 (checks.context); a BN whose parameters
are graph inputs or computed at run time cannot be judged here and is skipped by these checks
(`bn-not-folded` reports it with reason `not-constant`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bnsurgery.model.bn import affine
from bnsurgery.validation.checks import Finding, check
from bnsurgery.validation.checks.context import BnSite, ValidationContext

SHOWN_CHANNELS = 8  # channel indices listed in a message (details list them all)
FP16_SMALL_EPS = 1e-3  # fp16: epsilon below this, with variances below it, loses precision
PARAM_LABELS = ("scale", "B", "mean", "var")


def channel_list(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


def shown(channels: list[int]) -> str:
    head = ", ".join(str(c) for c in channels[:SHOWN_CHANNELS])
    return f"[{head}, ...]" if len(channels) > SHOWN_CHANNELS else f"[{head}]"


def _judged(ctx: ValidationContext) -> Iterator[BnSite]:
    """BNs with constant, well-formed parameters."""
    return (bn for bn in ctx.batchnorms() if bn.params is not None)


@check(
    "bn-invalid-params",
    "error",
    "every BN has five inputs and four parameter vectors of the channel count",
    "re-export the model; ONNX Runtime rejects a BatchNormalization with wrongly shaped parameters",
)
def invalid_params(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in ctx.batchnorms():
        if bn.problem is not None:
            yield invalid_params.finding(bn.problem, bn)


@check(
    "bn-training-mode",
    "error",
    "no BN runs in training mode",
    "export from an eval-mode model (torch: model.eval(), or "
    "torch.onnx.export(..., training=TrainingMode.EVAL)); or set training_mode=0 and drop "
    "outputs 1-4",
)
def training_mode(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in ctx.batchnorms():
        training, why = bn.in_training_mode()
        if training:
            yield training_mode.finding(
                f"runs in training mode ({why}): it normalises each batch with that batch's "
                "own statistics, so an output depends on the rest of its batch",
                bn,
                details={"opset": bn.view.opset if bn.view else None, "why": why},
            )


@check(
    "bn-nonfinite-params",
    "error",
    "no NaN or Inf in BN scale, bias, mean or var",
    "re-estimate the statistics on representative data (bnsurgery reestimate MODEL --data "
    "DATA) or fix the checkpoint; NaN/Inf reach every output downstream",
)
def nonfinite_params(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in _judged(ctx):
        p = bn.params
        assert p is not None
        bad = {
            label: channel_list(~np.isfinite(value))
            for label, value in zip(PARAM_LABELS, (p.scale, p.bias, p.mean, p.var), strict=True)
        }
        bad = {label: channels for label, channels in bad.items() if channels}
        if bad:
            parts = "; ".join(f"{label} at channels {shown(ch)}" for label, ch in bad.items())
            yield nonfinite_params.finding(
                f"NaN/Inf in the parameters: {parts}",
                bn,
                details={"channels": bad, "channels_total": p.channels},
            )


@check(
    "bn-negative-variance",
    "error",
    "no BN variance is negative",
    "a variance cannot be negative: the checkpoint is corrupt or was edited; re-estimate the "
    "statistics (bnsurgery reestimate MODEL --data DATA)",
)
def negative_variance(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in _judged(ctx):
        var = bn.params.var  # type: ignore[union-attr]
        channels = channel_list(np.isfinite(var) & (var < 0))
        if channels:
            yield negative_variance.finding(
                f"negative variance at {len(channels)} channel(s) {shown(channels)} "
                f"(min {float(np.nanmin(var)):.3g})",
                bn,
                details={"channels": channels, "min_var": float(np.nanmin(var))},
            )


@check(
    "bn-dead-channels",
    "warning",
    "no channel has a near-zero variance (var <= epsilon)",
    "a dead channel (its input was constant in training) amplifies any deviation by "
    "gamma/sqrt(eps): prune it, set its gamma to 0, or re-estimate on representative data",
)
def dead_channels(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in _judged(ctx):
        p = bn.params
        assert p is not None
        eps = bn.epsilon
        finite = np.isfinite(p.var) & np.isfinite(p.scale)
        # A pruned channel (gamma = 0) has no gain to blow up; it is not reported.
        mask = finite & (p.var >= 0) & (p.var <= eps) & (p.scale != 0)
        channels = channel_list(mask)
        if not channels:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            s, _ = affine(p, eps)
        gain = float(np.max(np.abs(s[mask])))
        gain_text = "infinite (var + epsilon = 0)" if not np.isfinite(gain) else f"{gain:.3g}"
        yield dead_channels.finding(
            f"{len(channels)} of {p.channels} channel(s) have near-zero variance "
            f"(var <= epsilon {eps:.3g}): {shown(channels)}; gain gamma/sqrt(var+eps) up to "
            f"{gain_text}",
            bn,
            details={
                "channels": channels,
                "channels_total": p.channels,
                "epsilon": eps,
                "max_gain": gain if np.isfinite(gain) else "inf",
            },
        )


@check(
    "bn-untrained-stats",
    "warning",
    "the running statistics are not the initial mean 0 / var 1 on every channel",
    "train, or re-estimate the statistics on representative data (bnsurgery reestimate MODEL "
    "--data DATA), before export; torch: track_running_stats must be True",
)
def untrained_stats(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in _judged(ctx):
        p = bn.params
        assert p is not None
        if not p.channels or not np.all(p.mean == 0):
            continue
        if np.all(p.var == 1):
            why = "the initial values (mean 0 and var 1"
        elif np.allclose(p.var + bn.epsilon, 1.0, rtol=0, atol=1e-6):
            why = "an identity's (mean 0 and var 1 - epsilon, as bnsurgery insert writes them"
        else:
            continue
        yield untrained_stats.finding(
            f"running statistics are {why}, on all {p.channels} channels): exported before "
            "training, with statistics never tracked, or inserted and never calibrated",
            bn,
            details={"channels_total": p.channels},
        )


@check(
    "bn-small-epsilon",
    "warning",
    "a float16 BN has epsilon >= 1e-3 where its variances are below 1e-3",
    "use epsilon >= 1e-3 for float16, or keep BatchNormalization in float32 when converting "
    "(onnxconverter_common float16: op_block_list=['BatchNormalization'])",
)
def small_epsilon(ctx: ValidationContext) -> Iterator[Finding]:
    for bn in _judged(ctx):
        if not bn.is_float16() or bn.epsilon >= FP16_SMALL_EPS:
            continue
        var = bn.params.var  # type: ignore[union-attr]
        channels = channel_list(np.isfinite(var) & (var >= 0) & (var < FP16_SMALL_EPS))
        if channels:
            yield small_epsilon.finding(
                f"float16 BN with epsilon {bn.epsilon:.3g} < {FP16_SMALL_EPS:g} and "
                f"{len(channels)} channel(s) with var < {FP16_SMALL_EPS:g} {shown(channels)}: "
                "var + eps is dominated by float16 rounding (smallest normal 6.1e-05)",
                bn,
                details={"epsilon": bn.epsilon, "channels": channels},
            )
