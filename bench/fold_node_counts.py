"""Node and BN counts after `bnsurgery fold` and after ONNX Runtime's own BASIC-level
optimisation (which fuses Conv+BN, MatMul+BN, Conv+Mul/Add), side by side, on the sample
models and on every ONNX Runtime fusion test graph rebuilt in tests/ort_fusion_models.py.

Writes JSON to --out and prints the markdown table of docs/fold.md; the docs are regenerated
on purpose, by pasting that table (nothing under docs/ is written unless --out points there):

    python bench/fold_node_counts.py --out /tmp/fold_node_counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort

import bnsurgery

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ("resnet_small", "digits_cnn", "digits_mlp")


def ort_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        options.log_severity_level = 3
        source = model.SerializeToString()
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "BatchNormalization": ops["BatchNormalization"]}


def models() -> dict[str, Callable[[], onnx.ModelProto]]:
    """Every measured model by name: the samples, then ORT's fusion test graphs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ort_fusion_models import ORT_FUSION_GRAPHS

    found: dict[str, Callable[[], onnx.ModelProto]] = {
        name: (lambda name=name: onnx.load(ROOT / "sample_models" / f"{name}.onnx"))
        for name in SAMPLES
    }
    found.update({f"ORT {name}": build for name, build in ORT_FUSION_GRAPHS.items()})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="Where to write the JSON.")
    args = parser.parse_args()
    rows: dict[str, object] = {}
    for name, build in models().items():
        original = build()
        rows[name] = {
            "original": counts(original),
            "bnsurgery_fold": counts(bnsurgery.fold(original).model),
            "onnxruntime_basic": counts(ort_basic(original)),
        }
    rows["onnxruntime_version"] = ort.__version__
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | original nodes (BN) | bnsurgery fold | ORT BASIC |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        if isinstance(row, dict):
            cells = [f"{row[k]['nodes']} ({row[k]['BatchNormalization']})" for k in row]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
