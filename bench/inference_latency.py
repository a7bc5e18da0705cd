"""Inference latency of the original vs the folded model on ONNX Runtime CPU.

For each model, both versions run at ORT_DISABLE_ALL (what the runtime does with BNs it is not
allowed to fuse) and ORT_ENABLE_ALL (ORT fuses Conv+BN itself), at batch 1 and batch 32. The
original and the folded session are timed alternately, iteration by iteration, so background
noise hits both alike; the median per-iteration latency is reported, after warm-up runs.

    python bench/inference_latency.py                         # JSON to bench/.cache/results/
    python bench/inference_latency.py --write-docs            # ... and to docs/bench/
    python bench/inference_latency.py --smoke --out /tmp/l.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _outputs as outputs
import numpy as np
import onnxruntime as ort

LEVELS = {
    "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
TARGET_DISABLE_SPEEDUP = 1.2
TARGET_ENABLE_RATIO = 1.02


def session(path: Path, level: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_pair(
    original: ort.InferenceSession,
    folded: ort.InferenceSession,
    feed: dict,
    iters: int,
    warmup: int,
) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        original.run(None, feed)
        folded.run(None, feed)
    times_o, times_f = [], []
    for i in range(iters):  # alternate which one goes first
        order = ((original, times_o), (folded, times_f))
        for sess, bucket in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            sess.run(None, feed)
            bucket.append(time.perf_counter() - start)
    return times_o, times_f


def bench_model(name: str, batches: list[int], iters: dict[int, int], threads: int, tmp: Path):
    import bnsurgery

    src = c.cached_model(name)
    folded_path = tmp / f"{name}.folded.onnx"
    result = bnsurgery.fold(src)
    bnsurgery.save_model(result.model, folded_path)
    shape = [int(d.dim_value) for d in result.model.graph.input[0].type.tensor_type.shape.dim[1:]]
    rows = []
    for level in LEVELS:
        original, folded = session(src, level, threads), session(folded_path, level, threads)
        for batch in batches:
            rng = np.random.default_rng(0)
            feed = {"input": rng.standard_normal((batch, *shape), dtype=np.float32)}
            out_o = original.run(None, feed)[0]
            out_f = folded.run(None, feed)[0]
            t_o, t_f = time_pair(original, folded, feed, iters[batch], warmup=2)
            med_o, med_f = statistics.median(t_o), statistics.median(t_f)
            rows.append(
                {
                    "level": level,
                    "batch": batch,
                    "iterations": iters[batch],
                    "original_ms": med_o * 1e3,
                    "folded_ms": med_f * 1e3,
                    "original_ms_p10_p90": _spread(t_o),
                    "folded_ms_p10_p90": _spread(t_f),
                    "speedup_original_over_folded": med_o / med_f,
                    "folded_over_original": med_f / med_o,
                    "max_abs_output_diff": float(np.max(np.abs(out_o - out_f))),
                }
            )
    return {
        "model": name,
        "bns_before": result.report.bns_before,
        "bns_after": result.report.bns_after,
        "nodes_before": result.report.nodes_before,
        "nodes_after": result.report.nodes_after,
        "rows": rows,
    }


def _spread(times: list[float]) -> list[float]:
    q = np.percentile(np.array(times) * 1e3, [10, 90])
    return [round(float(q[0]), 3), round(float(q[1]), 3)]


def targets(model: dict) -> dict[str, bool]:
    out = {}
    for row in model["rows"]:
        key = f"{row['level']}_batch{row['batch']}"
        if row["level"] == "DISABLE_ALL":
            out[f"{key}_folded_>=1.2x_faster"] = (
                row["speedup_original_over_folded"] >= TARGET_DISABLE_SPEEDUP
            )
        else:
            out[f"{key}_folded_<=1.02x_original"] = (
                row["folded_over_original"] <= TARGET_ENABLE_RATIO
            )
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        labels = [f"{r['level']}\nbatch {r['batch']}" for r in model["rows"]]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [r["original_ms"] for r in model["rows"]], 0.4, label="original")
        ax.bar(x + 0.2, [r["folded_ms"] for r in model["rows"]], 0.4, label="folded")
        for xi, r in zip(x, model["rows"], strict=True):
            top = max(r["original_ms"], r["folded_ms"])
            ax.text(xi, top, f"x{r['speedup_original_over_folded']:.2f}", ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("latency per run, ms (median, log scale)")
        ax.set_title(f"{model['model']}: {model['bns_before']} BN -> {model['bns_after']}")
        ax.legend(fontsize=8)
    fig.suptitle("ORT CPU latency, original vs folded (label: original / folded)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mobilenetv2,resnet50")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--iters", type=int, default=50, help="iterations at batch 1")
    parser.add_argument("--iters-large", type=int, default=10, help="iterations at batch > 1")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    parser.add_argument("--smoke", action="store_true")
    outputs.add_arguments(parser, "inference_latency", "docs/bench/inference_latency.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = outputs.parse_args(parser, argv)
    if args.smoke:
        args.models, args.batches, args.iters, args.iters_large = "small_stack", "1,4", 5, 3
    batches = [int(b) for b in args.batches.split(",")]
    iters = {b: args.iters if b == 1 else args.iters_large for b in batches}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bnsurgery-latency-") as tmp:
        models = [
            bench_model(m, batches, iters, args.threads, Path(tmp)) for m in args.models.split(",")
        ]
    payload = {
        "benchmark": "inference_latency",
        "smoke": args.smoke,
        "machine": c.machine(),
        "onnxruntime": ort.__version__,
        "threads": args.threads or "ORT default",
        "seconds": round(time.time() - started, 1),
        "models": models,
        "targets": {m["model"]: targets(m) for m in models},
    }
    c.write_json(args.out, payload)
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("inference_latency"))
    if args.plot is not None:
        plot(payload, args.plot)
    for m in models:
        for r in m["rows"]:
            print(f"{m['model']:12s} {r['level']:11s} batch {r['batch']:3d}  original "
                  f"{r['original_ms']:9.2f} ms  folded {r['folded_ms']:9.2f} ms  "
                  f"speedup x{r['speedup_original_over_folded']:.3f}")  # fmt: skip
    print("targets:", payload["targets"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
