"""Peak memory and time of re-estimation against a plain forward pass, side by side.

On the ResNet-50-sized model of bench/_common.py, batch size 32, the same seeded samples (an
.npz), each tool in a fresh process, round-robin, `--runs` times (median; peak RSS is the
child's own ru_maxrss):

  forward            one ORT CPU pass over the samples at ORT's default settings (the anchor)
  batch / exact      bnsurgery reestimate MODEL --data D --mode batch|exact --batch-size 32
  exact_budget       exact with --memory-budget BUDGET (the wave cache sized to fit 1.5x)
  before_batch, before_exact
                     the same commands run from another checkout (--before PATH, e.g. the
                     main branch before the memory work), for a speed and memory A/B

    python bench/reestimate_memory.py --samples 256 --runs 3 --before /work/main
    python bench/reestimate_memory.py --smoke --out /tmp/m.json     # seconds, small model
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _outputs as outputs
import numpy as np
from reestimate_anchor import dataset, model_path

BATCH = 32
TARGET = 1.5  # peak RSS of re-estimation / peak RSS of the forward pass


def argv(tool: str, model: Path, data: Path, out: Path, budget: str) -> list[str]:
    if tool == "forward":
        return c.worker_argv("forward_enable_all", str(model), str(data), str(BATCH))
    mode = "batch" if tool.endswith("batch") else "exact"
    cmd = [c.python(), "-m", "bnsurgery", "reestimate", str(model), "--data", str(data),
           "--mode", mode, "--batch-size", str(BATCH), "-o", str(out), "--json"]  # fmt: skip
    if tool == "exact_budget":
        cmd += ["--memory-budget", budget]
    if tool.startswith("before_"):  # -P: no working directory on sys.path, PYTHONPATH decides
        cmd.insert(1, "-P")
    return cmd


def env_for(tool: str, before: Path | None) -> dict[str, str] | None:
    if not tool.startswith("before_") or before is None:
        return None
    return {**os.environ, "PYTHONPATH": str(before)}


def main(args_in: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--budget", default=None, help="also run exact with this --memory-budget (exact_budget)"
    )
    parser.add_argument("--before", type=Path, default=None, help="another checkout to A/B")
    parser.add_argument("--smoke", action="store_true", help="small model, 16 samples, 1 run")
    outputs.add_arguments(parser, "reestimate_memory", "docs/bench/reestimate_memory.json")
    args = outputs.parse_args(parser, args_in)
    if args.smoke:
        args.model, args.samples, args.runs = "small_stack", 16, 1
    tools = ["forward", "batch", "exact"] + (["exact_budget"] if args.budget else [])
    if args.before is not None:
        tools += ["before_batch", "before_exact"]
    model, data = model_path(args.model), dataset(args.model, args.samples)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bnsurgery-mem-") as tmp:
        for _ in range(args.runs):
            for tool in tools:
                out = Path(tmp) / f"{tool}.onnx"
                command = argv(tool, model, data, out, args.budget)
                run = c.measure(command, env=env_for(tool, args.before))
                results[tool].append(run)
                print(f"{tool}: {run['wall_s']:.2f} s, {run['peak_rss_bytes'] / 2**20:.0f} MiB",
                      flush=True)  # fmt: skip
    summary = {}
    for tool, runs in results.items():
        summary[tool] = c.summarize(runs)
        inner = runs[-1]["inner"] or {}
        for key in ("passes", "forward_equivalents", "recomputed_nodes", "peak_cache_bytes"):
            if key in inner:
                summary[tool][key] = inner[key]
    forward = summary["forward"]
    ratios = {
        tool: {
            "rss_over_forward": round(s["peak_rss_mib"] / forward["peak_rss_mib"], 3),
            "wall_over_forward": round(s["wall_s"] / forward["wall_s"], 3),
        }
        for tool, s in summary.items()
    }
    payload = {
        "benchmark": "reestimate_memory",
        "smoke": args.smoke,
        "machine": c.machine(),
        "model": args.model,
        "samples": args.samples,
        "batch_size": BATCH,
        "runs_per_tool": args.runs,
        "budget": args.budget,
        "before": str(args.before) if args.before else None,
        "seconds": round(time.time() - started, 1),
        "tools": summary,
        "ratios": ratios,
        "targets": {
            f"{tool}_rss_<=1.5x_forward": ratios[tool]["rss_over_forward"] <= TARGET
            for tool in ("batch", "exact", "exact_budget")
            if tool in ratios
        },
    }
    c.write_json(args.out, payload)
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("reestimate_memory"))
    for tool, s in summary.items():
        print(f"  {tool:14s} wall {s['wall_s']:7.2f} s  rss {s['peak_rss_mib']:6.0f} MiB  "
              f"{ratios[tool]['rss_over_forward']:.2f}x rss  "
              f"{ratios[tool]['wall_over_forward']:.2f}x wall")  # fmt: skip
    print("targets:", payload["targets"])
    return 0 if np.isfinite(forward["wall_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
