"""What running ONNX Runtime in an isolated child (bnsurgery.runtime.isolation) costs.

For each model, in one process, round-robin, `--runs` times (median reported):

  in_process   create an InferenceSession (CPU, graph optimizations off) from the model's bytes
               and run it on `--samples` random samples, one at a time (what verification does)
  isolated     the same call through run_isolated: fork, run in the child, outputs back, reap
  empty        run_isolated of a function that does nothing, with the model in memory: the
               fixed price of one isolated call at this process size (fork + reap)

and the way back of large results: one float32 array of 1, 10, 50 and 200 MiB returned.

One warm-up of each precedes the timed runs. The ratio isolated / in_process is the factor by
which isolation multiplies the engine's share of verification. CPU time (user + system, the
isolated child's included) is reported beside wall time: it is the steadier of the two on a
machine that other work shares.

    python bench/isolation_overhead.py                  # resnet_small and ResNet-50, 5 runs
    python bench/isolation_overhead.py --write-docs     # ... and docs/bench/isolation.json
    python bench/isolation_overhead.py --smoke --out /tmp/iso.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _outputs as outputs
from _common import ROOT, cached_model, machine, write_json

from bnsurgery.runtime.isolation import isolation_enabled, run_isolated

MODELS = {
    "resnet_small": lambda: ROOT / "sample_models" / "resnet_small.onnx",
    "resnet50": lambda: cached_model("resnet50"),
}


def session_outputs(model: bytes, samples: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return [session.run(None, feeds) for feeds in samples]


def random_samples(model: bytes, count: int) -> list[dict[str, np.ndarray]]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    r = np.random.default_rng(0)
    return [
        {
            i.name: r.standard_normal(
                [1, *(d if isinstance(d, int) else 1 for d in i.shape[1:])]
            ).astype(np.float32)
            for i in session.get_inputs()
        }
        for _ in range(count)
    ]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (the isolated ones)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def seconds(call: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    call()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def measure_model(name: str, path: Path, runs: int, samples: int) -> dict[str, Any]:
    model = path.read_bytes()
    feeds = random_samples(model, samples)
    tasks: dict[str, Callable[[], Any]] = {
        "in_process": lambda: session_outputs(model, feeds),
        "isolated": lambda: run_isolated(session_outputs, model, feeds, what=name),
        "empty": lambda: run_isolated(lambda: None, what=name),
    }
    for task in tasks.values():
        task()  # warm-up
    times: dict[str, list[float]] = {key: [] for key in tasks}
    cpu: dict[str, list[float]] = {key: [] for key in tasks}
    for _ in range(runs):
        for key, task in tasks.items():
            wall_s, cpu_s = seconds(task)
            times[key].append(wall_s)
            cpu[key].append(cpu_s)
    medians = {key: statistics.median(values) for key, values in times.items()}
    cpu_medians = {key: statistics.median(values) for key, values in cpu.items()}
    return {
        "model": name,
        "model_mib": round(len(model) / (1 << 20), 1),
        "samples": samples,
        "runs": runs,
        "median_s": {key: round(value, 4) for key, value in medians.items()},
        "all_s": {key: [round(v, 4) for v in values] for key, values in times.items()},
        "cpu_median_s": {key: round(value, 4) for key, value in cpu_medians.items()},
        "isolated_over_in_process": round(medians["isolated"] / medians["in_process"], 3),
        "overhead_ms": round((medians["isolated"] - medians["in_process"]) * 1000, 1),
        "cpu_isolated_over_in_process": round(
            cpu_medians["isolated"] / cpu_medians["in_process"], 3
        ),
    }


def measure_transfer(mib: int, runs: int) -> dict[str, Any]:
    """Wall seconds of run_isolated returning one float32 array of `mib` MiB made in the child
    (np.ones: the making is timed in-process too, so the difference is the way back)."""
    count = mib * (1 << 20) // 4

    def make() -> np.ndarray:
        return np.ones(count, np.float32)

    run_isolated(make, what="transfer")  # warm-up
    in_process = statistics.median(seconds(make)[0] for _ in range(runs))
    isolated = statistics.median(
        seconds(lambda: run_isolated(make, what="transfer"))[0] for _ in range(runs)
    )
    return {
        "mib": mib,
        "in_process_ms": round(in_process * 1000, 1),
        "isolated_ms": round(isolated * 1000, 1),
        "mib_per_s": round(mib / max(isolated - in_process, 1e-9)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="resnet_small only, 1 run")
    outputs.add_arguments(parser, "isolation", "docs/bench/isolation.json")
    args = outputs.parse_args(parser, None)
    if not isolation_enabled():
        sys.exit("isolation is off here (not Linux, or BNSURGERY_ISOLATION=0): nothing to measure")
    names = ["resnet_small"] if args.smoke else list(MODELS)
    runs = 1 if args.smoke else args.runs
    rows = [measure_model(n, MODELS[n](), runs, args.samples) for n in names]
    for row in rows:
        m = row["median_s"]
        print(
            f"{row['model']:>12}: in-process {m['in_process'] * 1000:8.1f} ms, isolated "
            f"{m['isolated'] * 1000:8.1f} ms ({row['isolated_over_in_process']:.2f}x, "
            f"+{row['overhead_ms']:.1f} ms), empty isolated call {m['empty'] * 1000:.1f} ms; "
            f"CPU time {row['cpu_isolated_over_in_process']:.2f}x"
        )
    transfers = [measure_transfer(mib, runs) for mib in ([8] if args.smoke else [1, 10, 50, 200])]
    for row in transfers:
        print(
            f"{row['mib']:>5} MiB result: made in-process {row['in_process_ms']:.1f} ms, made "
            f"isolated and sent back {row['isolated_ms']:.1f} ms"
        )
    write_json(args.out, {"rows": rows, "transfers": transfers, "machine": machine()})
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("isolation"))


if __name__ == "__main__":
    main()
