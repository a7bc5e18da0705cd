"""Accuracy of the BN statistics that `reestimate --mode batch` measures in float32, against
float64, for channels whose mean sits r standard deviations from zero.

Two forms measure a BN's batch moments inside ONNX Runtime (docs/reestimate.md):

- **one node**: the BN in training mode (momentum 0), what batch mode runs on the CPU EP;
- **centred**: per-sample ReduceMean, Sub, Mul, ReduceMean, pooled in float64 (exact mode's
  probe, and batch mode's form on other EPs, for fp16 and for opsets < 9).

The model is x -> BatchNormalization (4 channels), so the BN's input is the data itself and
the float64 reference (`Moments.of`) is exact. Data: N(r * s, s^2) per channel, s in [0.5, 2].
The error is the tests' relative error (max |a - b| / max |b| over the channels).

    python bench/moments_accuracy.py               # JSON to bench/.cache/results/
    python bench/moments_accuracy.py --write-docs  # ... + docs/bench/ and docs/reestimate.md
    python bench/moments_accuracy.py --smoke --out x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _outputs as outputs  # noqa: E402  (bench/ is the script's folder)
from render_benchmarks import replace_marked  # noqa: E402

from bnsurgery.passes.reestimate import reestimate  # noqa: E402
from bnsurgery.stats import Moments, relative_error  # noqa: E402

CHANNELS = 4
RATIOS = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4)


def bn_model() -> onnx.ModelProto:
    shape = ["N", CHANNELS, "H", "W"]
    params = [np.ones(CHANNELS), np.zeros(CHANNELS), np.zeros(CHANNELS), np.ones(CHANNELS)]
    names = ["scale", "B", "mean", "var"]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", *names], ["y"], name="bn")],
        "bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        [
            numpy_helper.from_array(p.astype(np.float32), n)
            for p, n in zip(params, names, strict=True)
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def measured(model: onnx.ModelProto, x: np.ndarray, batch: int, one_node: bool) -> Moments:
    # "auto" on the CPU EP is the one-node form; "centred" is the form used off the CPU EP
    form = "auto" if one_node else "centred"
    result = reestimate(model, {"x": x}, mode="batch", batch_size=batch, batch_form=form)
    return result.report.stats.entries["bn"]


def errors(shape: tuple[int, ...], batch: int, ratio: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.5, 2.0, (1, CHANNELS, 1, 1))
    sign = rng.choice([-1.0, 1.0], (1, CHANNELS, 1, 1))
    x = (rng.standard_normal(shape) * spread + sign * ratio * spread).astype(np.float32)
    want = Moments.of(x.astype(np.float64), axis=1)
    row: dict = {"shape": list(shape), "batch_size": batch, "mean_to_std": ratio}
    for form, one_node in (("one_node", True), ("centred", False)):
        got = measured(bn_model(), x, batch, one_node)
        row[form] = {
            "mean": relative_error(got.mean, want.mean),
            "var": relative_error(got.var, want.var),
        }
    return row


def markdown(results: dict) -> str:
    lines = [
        f"Measured by `{results['command']}` (onnxruntime {results['onnxruntime']}); "
        "relative error against float64, mean / var.",
        "",
        "| samples x positions | mean / std | one node (CPU batch mode) | centred |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        n, _, h, w = row["shape"]
        cells = [
            f"{row[form]['mean']:.1e} / {row[form]['var']:.1e}" for form in ("one_node", "centred")
        ]
        lines.append(
            f"| {n} x {h * w} (batches of {row['batch_size']}) | "
            f"{row['mean_to_std']:g} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    outputs.add_arguments(
        parser, "moments_accuracy", "docs/bench/moments_accuracy.json and docs/reestimate.md"
    )
    parser.add_argument("--smoke", action="store_true")
    args = outputs.parse_args(parser, argv)
    cases = (
        [((16, CHANNELS, 8, 8), 8)]
        if args.smoke
        else [
            ((256, CHANNELS, 8, 8), 64),
            ((256, CHANNELS, 56, 56), 64),
        ]
    )
    ratios = RATIOS[:2] if args.smoke else RATIOS
    rows = [
        errors(shape, batch, r, seed) for seed, (shape, batch) in enumerate(cases) for r in ratios
    ]
    results = {
        "smoke": args.smoke,
        "command": "python bench/moments_accuracy.py" + (" --smoke" if args.smoke else ""),
        "onnxruntime": onnxruntime.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("moments_accuracy"))
        doc = ROOT / "docs/reestimate.md"
        doc.write_text(
            replace_marked(doc.read_text(), "moments_accuracy", markdown(results) + "\n")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
