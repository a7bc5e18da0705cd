"""The harness's own cost: `bnsurgery compare` against Polygraphy 0.53.6, on ONNX Runtime CPU.

Side by side in one run, every tool in a fresh process, round-robin, medians over --repeat runs:

  single      one ONNX Runtime session (the reference, graph optimisations off, as compare runs
              it) over the same batches, in a plain script: the floor, "the largest single
              session's memory"
  bnsurgery   `bnsurgery compare REF FOLDED --data loader.py --batch-size B` (this checkout)
  today       the same with another checkout's bnsurgery (--other-checkout, e.g. main)
  polygraphy  what a Polygraphy user runs to compare two models: `polygraphy run REF --onnxrt
              --data-loader-script loader.py --save-outputs ref.json`, then `polygraphy run
              FOLDED --onnxrt ... --load-outputs ref.json --atol 1e-4 --rtol 1e-3`; time is the
              sum of the two processes, memory the larger peak

Layer-wise: bnsurgery `--layerwise`; Polygraphy `--onnx-outputs mark all` in both runs (it then
matches tensors by name), and the size of the JSON it writes. The model is bench/_common's
ResNet-50 and its bnsurgery fold; the data a `load_data()` script of seeded random batches that
both tools read. Peak memory is the process's ru_maxrss from wait4, which covers the isolated
child bnsurgery forks (its resident pages include those it shares with its parent).

Polygraphy is installed with pip into bench/.cache/polygraphy-0.53.6 (`--target`, no deps: it
uses this environment's onnxruntime and numpy), never into the project.

    python bench/harness_cost.py --out bench/.cache/results/harness_cost.json \
        [--other-checkout /work/main] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import CACHE, ROOT, cached_model, machine, measure, python, write_json

POLYGRAPHY = CACHE / "polygraphy-0.53.6"
WORK = CACHE / "harness_cost"
LOADER = """\
import numpy as np

def load_data():
    rng = np.random.default_rng(0)
    for _ in range({batches}):
        yield {{"input": rng.standard_normal(({batch}, 3, 224, 224), dtype=np.float32)}}
"""
SINGLE = """\
import importlib.util, sys
import onnxruntime as ort
spec = importlib.util.spec_from_file_location("loader", sys.argv[2])
loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
session = ort.InferenceSession(open(sys.argv[1], "rb").read(), options, ["CPUExecutionProvider"])
for feeds in loader.load_data():
    session.run(None, feeds)
"""
SCENARIOS = [  # name, samples, batch, layer-wise
    ("outputs, 8 samples", 8, 8, False),
    ("outputs, 256 samples in batches of 32", 256, 32, False),
    ("layer-wise, 8 samples", 8, 8, True),
]


def ensure_polygraphy() -> None:
    if (POLYGRAPHY / "polygraphy").exists():
        return
    subprocess.run(
        [python(), "-m", "pip", "install", "-q", "--no-deps", "--target", str(POLYGRAPHY),
         "polygraphy==0.53.6"],
        check=True,
    )  # fmt: skip


def folded_model() -> tuple[Path, Path]:
    import onnx

    import bnsurgery

    reference = cached_model("resnet50")
    folded = CACHE / "resnet50.folded.onnx"
    if not folded.exists():
        onnx.save(bnsurgery.fold(str(reference)).model, folded)
    return reference, folded


def tools(reference: Path, folded: Path, loader: Path, batch: int, layerwise: bool,
          other: Path | None) -> dict[str, list[tuple[list[str], dict[str, str]]]]:  # fmt: skip
    """tool -> the commands it runs, one after another (argv, extra environment)."""
    # -P: the working directory does not go ahead of PYTHONPATH, which picks the checkout
    compare = [python(), "-P", "-m", "bnsurgery", "compare", str(reference), str(folded), "--data",
               str(loader), "--batch-size", str(batch), "--json", "-q"]  # fmt: skip
    if layerwise:
        compare.append("--layerwise")
    poly = [python(), "-P", "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
            "run"]  # fmt: skip
    mark = ["--onnx-outputs", "mark", "all"] if layerwise else []
    saved = WORK / f"polygraphy-{loader.stem}{'-layers' if layerwise else ''}.json"
    table: dict[str, list[tuple[list[str], dict[str, str]]]] = {
        "single": [([python(), "-P", "-c", SINGLE, str(reference), str(loader)], {})],
        "bnsurgery": [(compare, {"PYTHONPATH": str(ROOT)})],
        "polygraphy": [
            ([*poly, str(reference), "--onnxrt", "--data-loader-script", str(loader), *mark,
              "--save-outputs", str(saved)], {"PYTHONPATH": str(POLYGRAPHY)}),
            ([*poly, str(folded), "--onnxrt", "--data-loader-script", str(loader), *mark,
              "--load-outputs", str(saved), "--atol", "1e-4", "--rtol", "1e-3"],
             {"PYTHONPATH": str(POLYGRAPHY)}),
        ],
    }  # fmt: skip
    if layerwise:
        del table["single"]  # the floor of an output comparison; layer-wise is against today
    if other is not None:
        table["today"] = [(compare, {"PYTHONPATH": str(other)})]
    return table


def run_tool(commands: list[tuple[list[str], dict[str, str]]]) -> dict[str, Any]:
    wall, peak = 0.0, 0
    for argv, extra in commands:
        result = measure(argv, env={**os.environ, **extra})
        wall += result["wall_s"]
        peak = max(peak, result["peak_rss_bytes"])
    return {"wall_s": wall, "peak_rss_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / ".cache" / "results" / "harness_cost.json"
    )
    parser.add_argument("--other-checkout", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    ensure_polygraphy()
    WORK.mkdir(parents=True, exist_ok=True)
    reference, folded = folded_model()
    results = []
    for name, samples, batch, layerwise in SCENARIOS:
        loader = WORK / f"loader_{samples}_{batch}.py"
        loader.write_text(LOADER.format(batches=samples // batch, batch=batch))
        table = tools(reference, folded, loader, batch, layerwise, args.other_checkout)
        runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in table}
        for _ in range(args.repeat):  # round-robin: run i of every tool, then run i+1
            for tool, commands in table.items():
                runs[tool].append(run_tool(commands))
                print(name, tool, runs[tool][-1], file=sys.stderr)
        row: dict[str, Any] = {"scenario": name, "samples": samples, "batch": batch,
                               "layerwise": layerwise, "tools": {}}  # fmt: skip
        for tool, measured in runs.items():
            row["tools"][tool] = {
                "wall_s": statistics.median(r["wall_s"] for r in measured),
                "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in measured) / 2**20,
                "runs": measured,
            }
        saved = WORK / f"polygraphy-{loader.stem}{'-layers' if layerwise else ''}.json"
        row["polygraphy_json_mib"] = saved.stat().st_size / 2**20 if saved.exists() else None
        results.append(row)
    payload = {"machine": machine(), "model": "ResNet-50 (bench/_common) and its fold",
               "polygraphy": "0.53.6", "scenarios": results}  # fmt: skip
    write_json(args.out, payload)
    if args.write_docs:
        write_json(ROOT / "docs" / "bench" / "harness_cost.json", payload)
    for row in results:
        for tool, t in row["tools"].items():
            wall, peak = t["wall_s"], t["peak_rss_mib"]
            print(f"{row['scenario']:<40} {tool:<11} {wall:7.2f} s {peak:8.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
