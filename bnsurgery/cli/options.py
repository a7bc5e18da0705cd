"""The options several commands share, each defined once: its flags, parameter name, type and
help text.

Every shared option is a factory: `@data_option()` applies it with its shared help, and
`@data_option("DATA to measure on: ...")` where the option plays a narrower role in that command
(`None`: no help line). The parameter names are the Python API's keywords where the API has
them (`shapes`, `provider_options`, `ep_libraries`), so a library error's `option` and the
command's parameter agree (cli.main maps the few flags that differ).

This module imports the library's limits and choices (the modes, the smallest sample count),
so cli.main, which `bnsurgery --help` imports, never imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bnsurgery.errors import UsageError
from bnsurgery.passes.adapt_guard import DEFAULT_MAX_DROP
from bnsurgery.passes.reestimate import MEASURE_OPT_LEVEL, MIN_SAMPLES, MODES
from bnsurgery.runtime.providers import OPT_LEVELS

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _shared(*decls: str, help: str | None, **attrs: Any) -> Callable[..., Decorator]:
    """An option factory: DECLS and ATTRS fixed, HELP the default a command may replace."""

    def option(help_text: str | None = help) -> Decorator:
        return click.option(*decls, help=help_text, **attrs)

    return option


# -- where the result goes -------------------------------------------------------------------
json_option = _shared(
    "--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout."
)
in_place_option = _shared("--in-place", is_flag=True, help="Overwrite MODEL.")
external_data_option = _shared(
    "--external-data", is_flag=True, help="Save weights to <OUT>.data beside OUT."
)


def output_option(suffix: str) -> Decorator:
    """-o/--output, whose default is <stem>.SUFFIX.onnx beside MODEL."""
    return click.option(
        "-o", "--output", type=click.Path(path_type=Path), help=f"Default: <stem>.{suffix}.onnx"
    )


# -- what the model runs on ------------------------------------------------------------------
data_option = _shared(
    "--data",
    help="DATA: file.npz, file.npy, a folder of them, script.py with load_data(), or random:N "
    "(default random:4, seed 0, as fold's verification).",
)
source_option = _shared(
    "--source",
    help="Clean DATA of your own: calibrates inserted BNs (MODEL without BN), or adapts "
    "MODEL's BNs by the change from SOURCE to TARGET.",
)
shape_option = _shared(
    "--shape", "shapes", multiple=True, help="Input shape for random data, NAME:1x3x8x8."
)
seed_option = _shared(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for random data."
)
samples_option = _shared(
    "--samples",
    type=click.IntRange(min=MIN_SAMPLES),
    help="Use at most N samples of DATA (a variance needs at least 2).",
)
batch_size_option = _shared(
    "--batch-size", type=click.IntRange(min=1), help="Samples per batch (default 64)."
)

# -- where it runs ---------------------------------------------------------------------------
provider_option = _shared(
    "--provider", default="cpu", show_default=True, help="Execution provider alias."
)
providers_option = _shared(
    "--providers",
    default="cpu",
    show_default=True,
    help="Comma-separated execution providers: cpu, cuda, tensorrt, openvino, dml, coreml, any "
    "name `bnsurgery providers` lists, or a plugin EP's. The reference runs on the first.",
)
provider_options_option = _shared(
    "--provider-option",
    "provider_options",
    multiple=True,
    metavar="EP:KEY=VALUE",
    help="An option of one provider (repeatable), e.g. openvino:precision=FP32.",
)
ep_library_option = _shared(
    "--ep-library",
    "ep_libraries",
    multiple=True,
    metavar="NAME=PATH",
    help="Register a plugin execution provider library (repeatable).",
)
allow_fallback_option = _shared(
    "--allow-fallback",
    is_flag=True,
    help="Run anyway when a requested provider is unavailable or leaves nodes to another "
    "provider (stated loudly, the op types named) instead of exit 3.",
)
# The level of the measuring sessions (reestimate, insert --calibrate, adapt).
measure_opt_level_option = _shared(
    "--opt-level",
    type=click.Choice(list(OPT_LEVELS)),
    default=MEASURE_OPT_LEVEL,
    show_default=True,
    help="ORT graph optimisation level of the measuring runs (what is measured is never fused).",
)

# -- how statistics are measured (reestimate, adapt) ------------------------------------------
mode_option = _shared(
    "--mode",
    type=click.Choice(MODES),
    default="exact",
    show_default=True,
    help="exact: population statistics in inference mode, BN by BN in waves (AdaBN); "
    "batch: one pass, every BN normalising with its batch statistics (like torch's update_bn).",
)
prior_option = _shared(
    "--prior",
    type=click.FloatRange(min=0),
    help="Blend with the model's statistics: lambda = N / (N + samples) (Schneider et al.).",
)
nodes_option = _shared("--nodes", help="Only BNs whose name matches this regular expression.")
memory_budget_option = _shared(
    "--memory-budget",
    default="2GB",
    show_default=True,
    help="Bytes of cached activations between waves (exact mode); past it, recompute.",
)


def guard_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--max-drop, --force, --auto: the guard around an adaptation (reestimate, adapt)."""
    func = click.option(
        "--auto",
        is_flag=True,
        help="Try plain, source-relative, prior strengths and the first BNs only on a held-out "
        "part of TARGET (accuracy with labels, else prediction entropy); keep the best of those "
        "that beat the original measurably (one-sided p < 0.05), else write nothing.",
    )(func)
    func = click.option(
        "--force", is_flag=True, help="Write the adapted model even when the guard refuses it."
    )(func)
    func = click.option(
        "--max-drop",
        type=click.FloatRange(min=0),
        default=DEFAULT_MAX_DROP,
        show_default=True,
        help="With labels in DATA: refuse (exit 1) an adaptation that lowers held-out accuracy "
        "by more than this many points.",
    )(func)
    return func


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """--memory-budget: `2GB`, `512M`, `1.5GiB`, `1000000` to bytes (K/M/G/T are powers of
    1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"--memory-budget '{text}': expected a size such as 2GB, 512MB or 0")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))
