"""Speed of BN re-estimation against one plain ONNX Runtime forward pass over the same data.

The anchor is what a user would otherwise run: create an InferenceSession for the model and run
it once over every batch (CPU, ORT's default graph optimisation level ENABLE_ALL, which is
also the level re-estimation runs at; the same intra-op thread count: ORT's default, then 1).
The same pass at ORT_DISABLE_ALL is timed too, as a second reference.
Against it, in the same process and interleaved round by round:

- `reestimate(model, data, mode="exact")`: waves over cached stage sub-models;
- `reestimate(model, data, mode="batch")`: one pass with batch-statistics BNs;
- `reestimate(model, data, mode="exact", memory_budget=0)`: no cache, every wave recomputes
  from the input (what exact mode costs without the cache: the naive one-pass-per-wave).

Each timing is end to end (model copy, planning, session creation, all batches, writing the
new statistics). The data sit in memory for everyone, so file reading is not timed. The ratio
of medians over the rounds is reported; the targets are batch <= 1.25 and
exact <= 2.5 on the larger sample model (resnet_small, 20 BNs in 17 waves).

    python bench/reestimate_speed.py                # JSON to bench/.cache/results/
    python bench/reestimate_speed.py --write-docs   # ... + docs/bench/reestimate_speed.json and
                                                    # the table in docs/reestimate.md (markers)
    python bench/reestimate_speed.py --render       # redraw that table from docs/bench/'s JSON
    python bench/reestimate_speed.py --smoke --out x.json   # digits CNN, 2 rounds, JSON only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _outputs as outputs  # noqa: E402  (bench/ is the script's folder)

from bnsurgery.passes.reestimate import reestimate  # noqa: E402

TARGETS = {"batch": 1.25, "exact": 2.5}


def forward(
    model_bytes: bytes, x: np.ndarray, batch: int, threads: int, level: str = "ENABLE_ALL"
) -> float:
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_bytes, options, ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(0, len(x), batch):
        session.run(None, {name: x[i : i + batch]})
    return time.perf_counter() - start


def timed(model: onnx.ModelProto, x: np.ndarray, batch: int, **options) -> tuple[float, dict]:
    start = time.perf_counter()
    result = reestimate(model, {model.graph.input[0].name: x}, batch_size=batch, **options)
    return time.perf_counter() - start, result.report.to_dict()


def measure(model_path: Path, samples: int, batch: int, rounds: int, threads: int = 0) -> dict:
    model = onnx.load(model_path)
    payload = model.SerializeToString()
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([samples, *dims[1:]]).astype(np.float32)
    runs = {
        "forward": lambda: (forward(payload, x, batch, threads), None),
        "forward, unoptimised": lambda: (forward(payload, x, batch, threads, "DISABLE_ALL"), None),
        "exact": lambda: timed(model, x, batch, mode="exact", threads=threads),
        "batch": lambda: timed(model, x, batch, mode="batch", threads=threads),
        "exact, no cache": lambda: timed(
            model, x, batch, mode="exact", memory_budget=0, threads=threads
        ),
    }
    for run in runs.values():  # warm-up: imports, allocator, first session
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    reports: dict[str, dict] = {}
    for _ in range(rounds):
        for key, run in runs.items():
            seconds, report = run()
            times[key].append(seconds)
            if report is not None:
                reports[key] = report
    anchor = statistics.median(times["forward"])
    result = {
        "model": model_path.name,
        "intra_op_threads": threads or "ORT default (one per core)",
        "samples": samples,
        "batch_size": batch,
        "rounds": rounds,
        "seconds": {k: v for k, v in times.items()},
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_forward": {k: statistics.median(v) / anchor for k, v in times.items()},
        "min_ratio_to_forward": {k: min(v) / min(times["forward"]) for k, v in times.items()},
        "passes": {k: r["passes"] for k, r in reports.items()},
        "forward_equivalents": {k: r["forward_equivalents"] for k, r in reports.items()},
        "peak_cache_bytes": {k: r["peak_cache_bytes"] for k, r in reports.items()},
        "waves": reports["exact"]["waves"],
        "targets": TARGETS,
    }
    result["meets_targets"] = {
        k: result["ratio_to_forward"][k] <= limit for k, limit in TARGETS.items()
    }
    return result


BEGIN, END = "<!-- reestimate_speed:begin -->", "<!-- reestimate_speed:end -->"


def markdown(results: dict) -> str:
    """The table that goes between the markers in docs/reestimate.md."""
    env = results["environment"]
    lines = [
        BEGIN,
        f"Measured by `{results['command']}` ({env['when']}, {env['machine']}, onnxruntime "
        f"{env['onnxruntime']}; load average {_load(results)}). Model "
        f"`{results['runs'][0]['model']}` ({results['runs'][0]['waves']} waves), "
        f"{results['runs'][0]['samples']} random samples in batches of "
        f"{results['runs'][0]['batch_size']}, median of {results['runs'][0]['rounds']} interleaved "
        "rounds, each end to end; the anchor creates a session (ORT_ENABLE_ALL, ORT's default "
        "and the level re-estimation runs at) and runs the plain model once over the same "
        "batches.",
        "",
        "| intra-op threads | forward (s) | forward, unoptimised | exact | batch "
        "| exact, no cache | passes (exact) | forward equivalents (exact) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        r = run["ratio_to_forward"]
        lines.append(
            f"| {run['intra_op_threads']} | {run['median_seconds']['forward']:.3f} "
            f"| {r['forward, unoptimised']:.2f}x | {r['exact']:.2f}x | {r['batch']:.2f}x "
            f"| {r['exact, no cache']:.2f}x "
            f"| {run['passes']['exact']} | {run['forward_equivalents']['exact']} |"
        )
    verdicts = []
    for run in results["runs"]:
        threads = "ORT default threads" if run["intra_op_threads"] != 1 else "1 thread"
        for mode, limit in TARGETS.items():
            ok = "meets" if run["ratio_to_forward"][mode] <= limit else "MISSES"
            verdicts.append(
                f"{mode} {run['ratio_to_forward'][mode]:.2f}x {ok} <= {limit}x ({threads})"
            )
    lines += ["", "Targets: " + "; ".join(verdicts) + ".", END]
    return "\n".join(lines)


def _load(results: dict) -> str:
    before = results["environment"].get("load_average")
    after = results.get("environment_after", {}).get("load_average")
    if not before or not after:
        return "unknown"
    return f"{before[0]:.1f} at the start, {after[0]:.1f} at the end"


def splice(path: Path, block: str, heading: str) -> None:
    """Replace the marked block in `path` (or append it under `heading`)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + heading + "\n\n" + block + "\n"
    path.write_text(text)


def environment() -> dict:
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "sample_models/resnet_small.onnx")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    outputs.add_arguments(
        parser, "reestimate_speed", "docs/bench/reestimate_speed.json and docs/reestimate.md"
    )
    parser.add_argument(
        "--threads", default="0,1", help="intra-op thread counts to measure (0: ORT default)"
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--render",
        action="store_true",
        help="Only redraw the table in docs/reestimate.md from docs/bench/reestimate_speed.json.",
    )
    args = outputs.parse_args(parser, argv)
    if args.render:
        results = json.loads(outputs.docs_json("reestimate_speed").read_text())
        splice(ROOT / "docs/reestimate.md", markdown(results), "## Speed")
        return 0
    model = ROOT / "sample_models/digits_cnn.onnx" if args.smoke else args.model
    samples, rounds = (256, 2) if args.smoke else (args.samples, args.rounds)
    threads = [0] if args.smoke else [int(t) for t in args.threads.split(",")]
    results = {
        "smoke": args.smoke,
        "command": "python bench/reestimate_speed.py" + (" --smoke" if args.smoke else ""),
        "environment": environment(),
        "models": [model.name],
        "targets": TARGETS,
    }
    results["runs"] = [measure(model, samples, args.batch_size, rounds, t) for t in threads]
    results["environment_after"] = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("reestimate_speed"))
        splice(ROOT / "docs/reestimate.md", markdown(results), "## Speed")
    for run in results["runs"]:
        print(run["intra_op_threads"], json.dumps(run["ratio_to_forward"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
