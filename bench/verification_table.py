"""The judge's numbers on the deep corpus: rounding noise, correct folds and wrong folds.

For every model of tests/deep_models.py's CORPUS (deep layouts built here with He-normal
weights: ResNet-18/50, MobileNetV2, EfficientNet-B0, RegNetX, DenseNet-121, GoogLeNet,
ShuffleNetV2, a mixed-scale detection head, fp16 and BN-15 stacks, an MLP) it measures, with the
judge's defaults (random:4, seed 0, ORT CPU DISABLE_ALL):

  noise        max abs deviation of the noise run (the original, weights rounded once more)
  correct      the ratio of bnsurgery's correct fold (deviation / rounding noise)
  ort_basic    the ratio of ONNX Runtime's own fusion (the original at ORT_ENABLE_BASIC),
               an independent yardstick of what a correct fold deviates
  eps_x100     the ratio of a fold that used every BN's epsilon x 100
  gamma_1pct   ... one channel's gamma x 1.01 in one middle BN
  mean_half_sd ... one channel's mean moved by half a standard deviation in one middle BN
  fp16_weights ... a correct fold whose Conv/Gemm/MatMul weights went through float16

A wrong fold must give a ratio above the limit (8) and a correct one below it; a model whose
fold leaves no weight to round (nothing folded) shows "-". `--seeds N` also judges each correct
fold with seeds 0..N-1 (data and noise run) and reports the spread of those ratios.

    python bench/verification_table.py --out /tmp/verification.json
    python bench/verification_table.py --seeds 6        # + the correct folds' spread over seeds
    python bench/verification_table.py --write-docs     # also rewrite docs/verification.md's table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import _outputs as outputs  # noqa: E402
import onnx  # noqa: E402

from bnsurgery.data import random_spec  # noqa: E402
from bnsurgery.harness.compare import compare_models  # noqa: E402
from bnsurgery.passes.fold import FoldPass  # noqa: E402

DOC = REPO / "docs" / "verification.md"
WRONG = ("eps_x100", "gamma_1pct", "mean_half_sd", "fp16_weights")


def _ratio(original: onnx.ModelProto, candidate: onnx.ModelProto, **options: Any) -> Any:
    options.setdefault("data", random_spec(original))
    report = compare_models(original, candidate, show_progress=False, **options)
    outputs = report.pairs[0].outputs
    return max(m.ratio for m in outputs), outputs


def _ort_basic(original: onnx.ModelProto) -> float:
    """The original on ORT_ENABLE_BASIC (ORT fuses Conv+BN itself) against DISABLE_ALL."""
    return _ratio(original, original, opt_level="basic")[0]


def measure(name: str, build: Any, seeds: int = 0) -> dict[str, Any]:
    import wrong_folds as wf

    original = build()
    start = time.perf_counter()
    fold = FoldPass()(original)
    folded = len(fold.report.folded)  # type: ignore[attr-defined]
    correct, outputs = _ratio(original, fold.model)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "model": name,
        "bns": fold.report.bns_before,  # type: ignore[attr-defined]
        "folded": folded,
        "dtype": outputs[0].dtype,
        "output_scale": max(m.scale for m in outputs),
        "noise": max(m.noise_max_abs or 0.0 for m in outputs),
        "correct": correct,
        "verify_seconds": seconds,
    }
    if seeds:
        row["correct_by_seed"] = [_ratio(original, fold.model, seed=s)[0] for s in range(seeds)]
    try:
        row["ort_basic"] = _ort_basic(original)
    except Exception as exc:  # an ORT kernel it lacks (fp16 on CPU, say)
        row["ort_basic"] = None
        row["ort_basic_error"] = str(exc).splitlines()[0][:120]
    if folded:
        wrong = {
            "eps_x100": FoldPass()(wf.scale_epsilons(original)).model,
            "gamma_1pct": FoldPass()(wf.nudge_gamma(original)).model,
            "mean_half_sd": FoldPass()(wf.shift_mean(original)).model,
            "fp16_weights": wf.round_weights_through_fp16(fold.model),
        }
        for kind, candidate in wrong.items():
            row[kind] = _ratio(original, candidate)[0]
    return row


def render(rows: list[dict[str, Any]], limit: float) -> str:
    head = (
        "| model | BN folded | output scale | noise (max abs) | correct fold | ORT BASIC fusion "
        "| eps x100 | gamma x1.01 (1 ch) | mean +0.5 sd (1 ch) | fp16 weights |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        fp16 = r["dtype"] == "float16"
        cells = [
            r["model"],
            f"{r['folded']} of {r['bns']}",
            f"{r['output_scale']:.3g}",
            f"{r['noise']:.2g}",
            _x(r["correct"], limit, want_pass=True),
            _ort(r.get("ort_basic"), limit),
            *[
                "n/a (fp16 already)" if fp16 and k == "fp16_weights"
                else _x(r.get(k), limit, want_pass=False)
                for k in WRONG
            ],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _ort(value: float | None, limit: float) -> str:
    """ORT BASIC's own fusion: identical outputs mean it fused nothing there."""
    return "not fused" if value == 0 else _x(value, limit, want_pass=True)


def _x(value: float | None, limit: float, *, want_pass: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.2g}x" if value < 10 else f"{value:,.0f}x"
    ok = (value <= limit) == want_pass
    return text if ok else f"**{text} {'refused' if want_pass else 'missed'}**"


def main() -> None:
    from bnsurgery.harness.metrics import NOISE_LIMIT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / ".cache" / "verification.json")
    parser.add_argument("--write-docs", action="store_true", help="rewrite docs/verification.md")
    parser.add_argument("--only", nargs="*", help="model names of the corpus to run")
    parser.add_argument("--seeds", type=int, default=0, help="judge correct folds with N seeds")
    args = parser.parse_args()
    from deep_models import CORPUS

    rows = []
    for name, build in CORPUS.items():
        if args.only and name not in args.only:
            continue
        row = measure(name, build, args.seeds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spread = sorted(r for row in rows for r in row.get("correct_by_seed", []))
    summary = (
        {"runs": len(spread), "max": spread[-1], "median": spread[len(spread) // 2]}
        if spread
        else {}
    )
    payload = {"limit": NOISE_LIMIT, "rows": rows, "correct_by_seed": summary}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    if spread:
        print(f"correct folds over seeds: {summary}")
    table = render(rows, NOISE_LIMIT)
    print(table)
    if args.write_docs:
        outputs.replace_marked(DOC, "verification_table", table)


if __name__ == "__main__":
    main()
