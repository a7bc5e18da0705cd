"""What `fold`'s verification costs, against the verification of another checkout, side by side.

The judge (rounding-noise rule, docs/verification.md) adds a third session (the noise run) and a
forked child for the sessions; its budget is at most twice the verification time the
fixed-tolerance judge took. This measures, round-robin in fresh processes on one model:

  no_verify      bnsurgery fold MODEL -o OUT --no-verify          (this checkout)
  verify         bnsurgery fold MODEL -o OUT                      (this checkout)
  base_no_verify / base_verify   the same with the checkout given as --baseline (a git worktree
                 of an earlier commit, e.g. `git worktree add /tmp/base ee96c78`)

and reports verification time = verify - no_verify for each, and their ratio.

    python bench/verify_cost.py --baseline /tmp/base --out /tmp/verify_cost.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _outputs as outputs


def _argv(checkout: Path, src: Path, dst: Path, verify: bool) -> tuple[list[str], dict[str, str]]:
    argv = [c.python(), "-m", "bnsurgery", "fold", str(src), "-o", str(dst), "--json", "-q"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return argv + ([] if verify else ["--no-verify"]), env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout of bnsurgery")
    outputs.add_arguments(parser, "verify_cost", "nothing (its figures go in by hand)")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the runs below change the working directory
    src = c.cached_model(args.model)
    here = Path(__file__).resolve().parent.parent
    checkouts = {"": here, **({"base_": args.baseline.resolve()} if args.baseline else {})}
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: run
        # from an empty folder, or every run would import the checkout it was started from.
        os.chdir(tmp)
        for _ in range(args.runs):
            for prefix, checkout in checkouts.items():
                for verify in (False, True):
                    name = f"{prefix}{'verify' if verify else 'no_verify'}"
                    argv, env = _argv(checkout, src, Path(tmp) / f"{name}.onnx", verify)
                    run = c.measure(argv, env=env)  # raises when the command fails
                    walls.setdefault(name, []).append(run["wall_s"])
    med = {k: statistics.median(v) for k, v in walls.items()}
    result: dict = {"model": args.model, "runs": args.runs, "median_wall_s": med, "walls": walls}
    result["verification_s"] = med["verify"] - med["no_verify"]
    if args.baseline:
        result["base_verification_s"] = med["base_verify"] - med["base_no_verify"]
        result["ratio_to_base"] = result["verification_s"] / result["base_verification_s"]
    result["machine"] = c.machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    c.write_json(args.out, result)
    for key, value in med.items():
        print(f"{key:16s} {value:.2f} s")
    print(f"verification     {result['verification_s']:.2f} s")
    if args.baseline:
        base = result["base_verification_s"]
        print(f"base verification {base:.2f} s  ->  ratio {result['ratio_to_base']:.2f}x")


if __name__ == "__main__":
    main()
