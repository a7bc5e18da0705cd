"""Folding a ~3 GB model with external data: time against the floor, peak RSS against its size.

The model is a deep Conv(3x3, 1024 -> 1024) -> BN -> Relu stack whose weights go to one
external `.data` file, generated chunk by chunk (bench/_common.build_conv_bn_stack). Each tool
runs in a fresh process, alternately, `--runs` times:

  floor   onnx.load (external data read in) + onnx.save(save_as_external_data=True)
  cli     bnsurgery fold MODEL -o OUT --no-verify

Peak RSS is each child's own ru_maxrss. The generated files are deleted at the end (unless
--keep), since they take ~3 GB (plus ~3 GB per output while it exists).

    python bench/large_model.py                          # ~3 GB, JSON to bench/.cache/results/
    python bench/large_model.py --write-docs             # ... and to docs/bench/
    python bench/large_model.py --smoke --out /tmp/l.json   # a few MB
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _outputs as outputs

TARGET_RSS_RATIO = 1.3
TARGET_FLOOR_RATIO = 1.3


def commands(tool: str, src: Path, dst: Path) -> list[str]:
    if tool == "floor":
        return c.worker_argv("floor_external", str(src), str(dst))
    return [c.python(), "-m", "bnsurgery", "fold", str(src), "-o", str(dst), "--no-verify",
            "--json"]  # fmt: skip


def remove_outputs(folder: Path) -> None:
    for path in folder.glob("out.*"):
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated model")
    parser.add_argument("--smoke", action="store_true", help="4 layers of 64 channels, 1 run")
    outputs.add_arguments(parser, "large_model", "docs/bench/large_model.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = outputs.parse_args(parser, argv)
    if args.smoke:
        args.layers, args.channels, args.runs = 4, 64, 1
    folder = c.CACHE / f"stack_{args.layers}x{args.channels}"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "model.onnx"
    started = time.time()
    try:
        if not src.exists():
            t0 = time.perf_counter()
            c.build_conv_bn_stack(src, layers=args.layers, channels=args.channels)
            print(f"built {src} in {time.perf_counter() - t0:.1f} s", flush=True)
        size = c.model_bytes(src)
        tools = ["floor", "cli"]
        results: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(args.runs):
            for tool in tools:
                dst = folder / f"out.{tool}.onnx"
                results[tool].append(c.measure(commands(tool, src, dst)))
                if tool == "cli":
                    folded_ops = c.op_counts(dst)
                remove_outputs(folder)
                last = results[tool][-1]
                gib = last["peak_rss_bytes"] / 2**30
                print(f"{tool}: {last['wall_s']:.1f} s, {gib:.2f} GiB", flush=True)
        summary = {t: c.summarize(r) for t, r in results.items()}
        input_ops = c.op_counts(src)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    size_mib = size / c.MiB
    ratios = {
        "cli_wall_over_floor_wall": summary["cli"]["wall_s"] / summary["floor"]["wall_s"],
        "cli_peak_rss_over_model_size": summary["cli"]["peak_rss_mib"] / size_mib,
        "floor_peak_rss_over_model_size": summary["floor"]["peak_rss_mib"] / size_mib,
    }
    payload = {
        "benchmark": "large_model",
        "smoke": args.smoke,
        "machine": c.machine(),
        "model": {
            "layers": args.layers,
            "channels": args.channels,
            "bytes": size,
            "input_ops": input_ops,
            "folded_ops": folded_ops,
        },
        "runs_per_tool": args.runs,
        "seconds": round(time.time() - started, 1),
        "tools": summary,
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "targets": {
            "cli_peak_rss_<=1.3x_model": ratios["cli_peak_rss_over_model_size"] <= TARGET_RSS_RATIO,
            "cli_within_1.3x_floor": ratios["cli_wall_over_floor_wall"] <= TARGET_FLOOR_RATIO,
        },
    }
    c.write_json(args.out, payload)
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("large_model"))
    if args.plot is not None:
        plot(payload, args.plot)
    for tool, s in summary.items():
        print(f"{tool:6s} wall {s['wall_s']:.1f}s  peak RSS {s['peak_rss_mib']:.0f} MiB "
              f"({s['peak_rss_mib'] / size_mib:.2f}x the {size_mib:.0f} MiB model)")  # fmt: skip
    print("ratios:", payload["ratios"])
    print("targets:", payload["targets"])
    print(f"wrote {args.out}")
    return 0


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size_gib = payload["model"]["bytes"] / 2**30
    tools = list(payload["tools"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax1.bar(tools, [payload["tools"][t]["wall_s"] for t in tools], color=["#999999", "#2b7bba"])
    ax1.set_ylabel("wall time, fresh process (s, median)")
    ax1.set_title("time")
    rss = [payload["tools"][t]["peak_rss_mib"] / 1024 for t in tools]
    ax2.bar(tools, rss, color=["#999999", "#2b7bba"])
    ax2.axhline(size_gib, color="black", ls="--", lw=0.8, label="model size")
    ax2.axhline(size_gib * TARGET_RSS_RATIO, color="red", ls=":", lw=0.8, label="1.3x (target)")
    ax2.set_ylabel("peak RSS (GiB)")
    ax2.set_title("memory")
    ax2.legend(fontsize=7)
    m = payload["model"]
    fig.suptitle(f"fold of a {size_gib:.2f} GiB Conv-BN stack ({m['layers']} x {m['channels']} "
                 f"channels, external data)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
