"""Re-estimation on Ray with 1 and 2 workers over the same shards, against the local engine.

One process starts a local Ray cluster (all the machine's CPUs), writes DATA as `--shards`
.npz files, then, round-robin `--runs` times, times `bnsurgery.reestimate(...)`:

  local      the local engine on the shard folder (ORT's default threads: every core)
  ray_1      engine="ray", 1 worker holding every CPU (its ORT threads = the CPUs)
  ray_2      engine="ray", 2 workers sharing the CPUs

Each Ray time is the whole call: reading the shards with Ray Data, starting the workers (a
process each, importing bnsurgery and ONNX Runtime), the waves, the merges. `waves_s` is the
part spent in waves (compute, merges, broadcasts). Statistics are checked against the local
engine's (max relative error).

    python bench/reestimate_ray_scaling.py                       # JSON to bench/.cache/results/
    python bench/reestimate_ray_scaling.py --smoke --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _outputs as outputs
import numpy as np
from reestimate_anchor import dataset, model_path


def write_shards(data: Path, folder: Path, shards: int) -> None:
    with np.load(data) as npz:
        key = npz.files[0]
        array = npz[key]
    for i, part in enumerate(np.array_split(array, shards)):
        np.savez(folder / f"part{i:03d}.npz", **{key: part})


def run_once(bnsurgery, model, folder: Path, mode: str, batch: int, tool: str) -> dict:
    from bnsurgery.measure.ray import RayOptions

    options = {}
    if tool != "local":
        options = {"engine": "ray", "ray_options": RayOptions(workers=int(tool[-1]))}
    start = time.perf_counter()
    result = bnsurgery.reestimate(model, str(folder), mode=mode, batch_size=batch, **options)
    seconds = time.perf_counter() - start
    engine = result.report.extras.get("engine", {})
    return {
        "seconds": seconds,
        "waves_s": sum(engine.get("seconds_per_wave", [])) if engine else seconds,
        "stats": result.report.stats,
    }


def max_error(a, b) -> float:
    from bnsurgery.stats import relative_error

    return max(
        max(relative_error(a.entries[k].mean, m.mean), relative_error(a.entries[k].var, m.var))
        for k, m in b.entries.items()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet_small,resnet50")
    parser.add_argument("--samples", default="1024,128", help="per model")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    outputs.add_arguments(
        parser, "reestimate_ray_scaling", "docs/bench/reestimate_ray_scaling.json"
    )
    args = outputs.parse_args(parser, argv)
    if args.smoke:
        args.models, args.samples, args.runs, args.shards = "small_stack", "16", 1, 2
    import ray

    import bnsurgery

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    tools = ["local", "ray_1", "ray_2"]
    started = time.time()
    results = []
    try:
        for name, samples in zip(
            args.models.split(","), [int(s) for s in args.samples.split(",")], strict=True
        ):
            model = bnsurgery.load_model(model_path(name))
            with tempfile.TemporaryDirectory(prefix="bnsurgery-ray-") as tmp:
                folder = Path(tmp)
                write_shards(dataset(name, samples), folder, args.shards)
                for mode in ("batch",) if args.smoke else ("batch", "exact"):
                    runs: dict[str, list[dict]] = {t: [] for t in tools}
                    for _ in range(args.runs):
                        for tool in tools:
                            runs[tool].append(
                                run_once(bnsurgery, model, folder, mode, args.batch_size, tool)
                            )
                            print(f"{name} {mode} {tool}: {runs[tool][-1]['seconds']:.2f} s",
                                  flush=True)  # fmt: skip
                    local = runs["local"][-1]["stats"]
                    entry = {"model": name, "samples": samples, "mode": mode, "tools": {}}
                    for tool, items in runs.items():
                        entry["tools"][tool] = {
                            "seconds": statistics.median(r["seconds"] for r in items),
                            "waves_s": statistics.median(r["waves_s"] for r in items),
                            "max_rel_error_vs_local": max_error(items[-1]["stats"], local),
                        }
                    t = entry["tools"]
                    entry["speedup_2_over_1"] = round(
                        t["ray_1"]["seconds"] / t["ray_2"]["seconds"], 3
                    )
                    entry["waves_speedup_2_over_1"] = round(
                        t["ray_1"]["waves_s"] / t["ray_2"]["waves_s"], 3
                    )
                    results.append(entry)
    finally:
        ray.shutdown()
    payload = {
        "benchmark": "reestimate_ray_scaling",
        "smoke": args.smoke,
        "machine": c.machine(),
        "cpus": cpus,
        "shards": args.shards,
        "batch_size": args.batch_size,
        "runs": args.runs,
        "seconds": round(time.time() - started, 1),
        "results": results,
    }
    c.write_json(args.out, payload)
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("reestimate_ray_scaling"))
    for e in results:
        cells = "  ".join(
            f"{tool} {s['seconds']:.2f} s (waves {s['waves_s']:.2f})"
            for tool, s in e["tools"].items()
        )
        print(f"{e['model']} {e['mode']}: {cells}  2/1 speed-up {e['speedup_2_over_1']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
