"""Fold speed and memory against the load+save floor and the anchors, side by side in one run.

For each model (ResNet-50-sized and MobileNetV2-sized, built in bench/_common.py), every tool
runs in a fresh process, round-robin, `--runs` times (median reported):

  floor           python -c: onnx.load + onnx.save of the same model
  cli             bnsurgery fold MODEL -o OUT --no-verify       (the speed number)
  cli_verify      bnsurgery fold MODEL -o OUT                   (with ORT verification)
  api             bnsurgery.fold(path) + bnsurgery.save_model   (timed in-process too)
  api_file        bnsurgery.fold_file(path, out)   (the CLI's streamed path, timed in-process)
  onnxoptimizer   optimize(model, ["fuse_bn_into_conv"]) + save
  onnxsim         onnxsim.simplify(model) + save
  onnxscript      onnxscript.optimizer.optimize(model) + save
  ort_basic       InferenceSession at ORT_ENABLE_BASIC with optimized_model_filepath

Wall time is from spawn to exit (process start-up and imports included, for every tool alike);
`inner_s` is the worker's own load-to-save time, imports excluded (cli has none). Peak RSS is
each child's own ru_maxrss (os.wait4). Ratios are of medians from the same run.

    python bench/fold_speed.py                      # full run, JSON to bench/.cache/results/
    python bench/fold_speed.py --write-docs         # ... and to docs/bench/fold_speed.json
    python bench/fold_speed.py --smoke --out /tmp/s.json   # seconds, no anchors
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _outputs as outputs

ANCHORS = ("onnxoptimizer", "onnxsim", "onnxscript", "ort_basic")
ANCHOR_MODULES = {
    "onnxoptimizer": "onnxoptimizer",
    "onnxsim": "onnxsim",
    "onnxscript": "onnxscript",
    "ort_basic": "onnxruntime",
}
TARGET_FLOOR_RATIO = 1.3


def commands(tool: str, src: Path, dst: Path) -> list[str]:
    if tool == "floor":
        return c.worker_argv("floor", str(src), str(dst))
    if tool in ("cli", "cli_verify"):
        argv = [c.python(), "-m", "bnsurgery", "fold", str(src), "-o", str(dst), "--json"]
        return argv + (["--no-verify"] if tool == "cli" else [])
    return c.worker_argv(tool, str(src), str(dst))


def available_anchors(requested: list[str]) -> tuple[list[str], list[str]]:
    present = [a for a in requested if importlib.util.find_spec(ANCHOR_MODULES[a]) is not None]
    return present, [a for a in requested if a not in present]


def bench_model(name: str, tools: list[str], runs: int, workdir: Path) -> dict:
    src = c.cached_model(name)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    for _ in range(runs):  # round-robin: background noise spreads over every tool alike
        for tool in tools:
            dst = workdir / f"{name}.{tool}.onnx"
            results[tool].append(c.measure(commands(tool, src, dst)))
    summary = {tool: c.summarize(r) for tool, r in results.items()}
    for tool in tools:
        summary[tool]["output_ops"] = c.op_counts(workdir / f"{name}.{tool}.onnx")
    return {
        "model": name,
        "model_bytes": c.model_bytes(src),
        "input_ops": c.op_counts(src),
        "tools": summary,
        "ratios": ratios(summary),
    }


def ratios(summary: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    floor = summary["floor"]
    for tool in ("cli", "cli_verify", "api", "api_file"):
        if tool in summary:
            out[f"{tool}_wall_over_floor_wall"] = summary[tool]["wall_s"] / floor["wall_s"]
            out[f"{tool}_rss_over_floor_rss"] = (
                summary[tool]["peak_rss_mib"] / floor["peak_rss_mib"]
            )
    for tool in ("api", "api_file"):
        if tool in summary:
            out[f"{tool}_inner_over_floor_inner"] = summary[tool]["inner_s"] / floor["inner_s"]
    for anchor in ANCHORS:
        if anchor not in summary:
            continue
        out[f"cli_wall_over_{anchor}_wall"] = summary["cli"]["wall_s"] / summary[anchor]["wall_s"]
        if "api" in summary and "inner_s" in summary[anchor]:
            out[f"api_inner_over_{anchor}_inner"] = (
                summary["api"]["inner_s"] / summary[anchor]["inner_s"]
            )
        out[f"{anchor}_wall_over_floor_wall"] = summary[anchor]["wall_s"] / floor["wall_s"]
    return {k: round(v, 4) for k, v in out.items()}


def targets(model_result: dict) -> dict[str, bool]:
    r = model_result["ratios"]
    out = {"cli_within_1.3x_floor": r["cli_wall_over_floor_wall"] <= TARGET_FLOOR_RATIO}
    anchors = [a for a in ANCHORS if f"cli_wall_over_{a}_wall" in r]
    if anchors:
        out["cli_faster_than_every_anchor"] = all(r[f"cli_wall_over_{a}_wall"] < 1 for a in anchors)
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.6), squeeze=False)
    for ax, res in zip(axes[0], models, strict=True):
        tools = list(res["tools"])
        walls = [res["tools"][t]["wall_s"] for t in tools]
        colors = [
            "#2b7bba" if t.startswith(("cli", "api")) else "#999999" if t == "floor" else "#e08a2c"
            for t in tools
        ]
        bars = ax.bar(range(len(tools)), walls, color=colors)
        ax.axhline(res["tools"]["floor"]["wall_s"], color="black", lw=0.8, ls="--", label="floor")
        ax.axhline(
            res["tools"]["floor"]["wall_s"] * TARGET_FLOOR_RATIO,
            color="red", lw=0.8, ls=":", label="1.3x floor (target)",
        )  # fmt: skip
        for bar, tool in zip(bars, tools, strict=True):
            rss = res["tools"][tool]["peak_rss_mib"]
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{rss:.0f} MiB",
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(tools)), tools, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("wall time, fresh process (s, median)")
        mb = res["model_bytes"] / 1e6
        ax.set_title(f"{res['model']} ({mb:.0f} MB, {res['input_ops']['BatchNormalization']} BN)")
        ax.legend(fontsize=7)
    fig.suptitle("fold end to end (labels: peak RSS)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenetv2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--anchors", default=",".join(ANCHORS), help="comma list, or 'none'")
    parser.add_argument("--no-verify-run", action="store_true", help="skip the cli_verify tool")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 runs, no anchors")
    outputs.add_arguments(parser, "fold_speed", "docs/bench/fold_speed.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = outputs.parse_args(parser, argv)
    if args.smoke:
        args.models, args.runs, args.anchors = "small_stack", 2, "none"
    requested = [] if args.anchors == "none" else [a for a in args.anchors.split(",") if a]
    anchors, missing = available_anchors(requested)
    tools = [
        "floor",
        "cli",
        *([] if args.no_verify_run else ["cli_verify"]),
        "api",
        "api_file",
        *anchors,
    ]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bnsurgery-bench-") as tmp:
        models = [bench_model(m, tools, args.runs, Path(tmp)) for m in args.models.split(",")]
    payload = {
        "benchmark": "fold_speed",
        "smoke": args.smoke,
        "machine": c.machine(),
        "runs_per_tool": args.runs,
        "anchors_missing": missing,
        "seconds": round(time.time() - started, 1),
        "models": models,
        "targets": {m["model"]: targets(m) for m in models},
    }
    c.write_json(args.out, payload)
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("fold_speed"))
    if args.plot is not None:
        plot(payload, args.plot)
    for m in models:
        print(f"{m['model']}:")
        for tool, s in m["tools"].items():
            inner = f"  inner {s['inner_s']:.3f}s" if "inner_s" in s else ""
            print(f"  {tool:14s} wall {s['wall_s']:.3f}s{inner}  rss {s['peak_rss_mib']:.0f} MiB"
                  f"  BN left {s['output_ops']['BatchNormalization']}")  # fmt: skip
        print("  ratios:", m["ratios"])
    print("targets:", payload["targets"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
