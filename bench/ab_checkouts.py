"""Two checkouts of bnsurgery side by side: the same commands, run alternately, in fresh
processes, on the same machine in the same minutes. For a change that must not cost time (a
refactoring), this is the comparison that holds on a shared, noisy machine: ratios of medians
of interleaved runs, not two runs an hour apart.

    git worktree add ../before <commit>
    python bench/ab_checkouts.py --before ../before --out bench/.cache/results/ab.json

Each process imports bnsurgery from one checkout (PYTHONPATH, with `python -P` and a neutral
working directory, so neither the current folder nor an installed copy wins). The tasks:
fold through the CLI (streamed, with and without verification), fold through the Python API,
and re-estimation through the CLI (exact and batch mode) on sample_models/resnet_small.onnx.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import _outputs as outputs
from _common import cached_model, machine, measure, write_json

ROOT = Path(__file__).resolve().parents[1]
RESNET_SMALL = ROOT / "sample_models" / "resnet_small.onnx"


def tasks(model: Path, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-P", "-m", "bnsurgery"]
    api = (
        "import sys, bnsurgery; r = bnsurgery.fold(sys.argv[1]); "
        "bnsurgery.save_model(r.model, sys.argv[2])"
    )
    data = ["--data", "random:256", "--batch-size", "32"]
    return {
        "fold_cli": [*cli, "fold", str(model), "-o", str(out), "--no-verify"],
        "fold_cli_verify": [*cli, "fold", str(model), "-o", str(out)],
        "fold_api": [sys.executable, "-P", "-c", api, str(model), str(out)],
        "reestimate_exact": [*cli, "reestimate", str(RESNET_SMALL), *data, "-o", str(out)],
        "reestimate_batch": [
            *cli,
            "reestimate",
            str(RESNET_SMALL),
            *data,
            "--mode",
            "batch",
            "-o",
            str(out),
        ],
    }


def run(before: Path, after: Path, model: Path, rounds: int) -> dict[str, Any]:
    walls: dict[str, dict[str, list[float]]] = {}
    envs = {
        side: dict(os.environ, PYTHONPATH=str(c))
        for side, c in (("before", before), ("after", after))
    }
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the children start here: nothing importable
        try:
            for name, argv in tasks(model, Path(tmp) / "out.onnx").items():
                walls[name] = {"before": [], "after": []}
                for _ in range(rounds):
                    for side, env in envs.items():
                        walls[name][side].append(measure(argv, env=env)["wall_s"])
        finally:
            os.chdir(cwd)
    results = {}
    for name, sides in walls.items():
        b, a = statistics.median(sides["before"]), statistics.median(sides["after"])
        results[name] = {
            "before_median_s": round(b, 3),
            "after_median_s": round(a, 3),
            "after_over_before": round(a / b, 3),
            "runs": {k: [round(v, 3) for v in vs] for k, vs in sides.items()},
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the other checkout (required)")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--model", default="resnet50", help="bench model to fold")
    parser.add_argument("--rounds", type=int, default=5)
    outputs.add_arguments(parser, "ab_checkouts", "docs/bench/ab_checkouts.json")
    args = outputs.parse_args(parser, None)
    if args.before is None:
        parser.error("--before CHECKOUT is required")
    model = cached_model(args.model)
    results = run(args.before.resolve(), args.after.resolve(), model, args.rounds)
    payload = {
        "machine": machine(),
        "model": args.model,
        "rounds": args.rounds,
        "before": str(args.before),
        "results": results,
    }
    for name, r in results.items():
        print(
            f"{name:18s} before {r['before_median_s']:6.2f} s  after {r['after_median_s']:6.2f} s"
            f"  after/before {r['after_over_before']:.2f}x"
        )
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("ab_checkouts"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
