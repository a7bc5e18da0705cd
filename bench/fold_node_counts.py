"""Node counts of the sample models after `bnsurgery fold` and after ONNX Runtime's own
BASIC-level optimisation (which fuses Conv+BN), side by side. Writes JSON (to --out, by default
under the git-ignored bench/.cache/results/) and prints a markdown table.

    python bench/fold_node_counts.py                 # JSON to bench/.cache/results/
    python bench/fold_node_counts.py --write-docs    # ... and to docs/fold_node_counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

import bnsurgery

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _outputs as outputs

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet_small", "digits_cnn", "digits_mlp")


def ort_basic(path: Path) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "BatchNormalization": ops["BatchNormalization"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    outputs.add_arguments(parser, "fold_node_counts", "docs/fold_node_counts.json")
    args = outputs.parse_args(parser, None)
    rows = {}
    for name in MODELS:
        path = ROOT / "sample_models" / f"{name}.onnx"
        rows[name] = {
            "original": counts(onnx.load(path)),
            "bnsurgery_fold": counts(bnsurgery.fold(path).model),
            "onnxruntime_basic": counts(ort_basic(path)),
        }
    rows["onnxruntime_version"] = ort.__version__  # type: ignore[assignment]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    if args.write_docs:
        outputs.copy_to_docs(args.out, ROOT / "docs" / "fold_node_counts.json")
    print("| model | original nodes (BN) | bnsurgery fold | ORT BASIC |")
    print("|---|---|---|---|")
    for name in MODELS:
        r = rows[name]
        cells = [f"{r[k]['nodes']} ({r[k]['BatchNormalization']})" for k in r]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
