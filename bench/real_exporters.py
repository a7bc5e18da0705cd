"""fold and compare on models from a real exporter: torchvision networks exported by torch.

Each network is built untrained (torchvision's own He-normal initialisation, BN statistics at
the exporter's defaults: mean 0, var 1), exported with the TorchScript exporter keeping its BNs
(`training=TrainingMode.PRESERVE` on an eval-mode model), then

  fold      `bnsurgery fold M -o OUT --json` with this checkout: exit code, BNs folded, and the
            judge's ratio (deviation / rounding noise, limit 8)
  compare   `bnsurgery compare M OUT --json`: exit code and ratio (same defaults, same rule)
  base      the same fold with another checkout (--baseline, e.g. the fixed-tolerance judge at
            commit ee96c78): its exit code, to show what the old verdict refused
  raw       max |folded - original| / max |original| from fold's JSON (max_abs / scale)

torch and torchvision are the benchmark's own dependencies (never the project's): run it with a
Python that has them, and point --python at the project's environment:

    python -m venv /tmp/exp && /tmp/exp/bin/pip install torch==2.13.0 "torchvision==0.28.*" onnx
    /tmp/exp/bin/python bench/real_exporters.py --python .venv/bin/python \\
        --baseline /tmp/bnsurgery_base --out /tmp/real_exporters.json [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import _outputs as outputs  # noqa: E402

DOC = REPO / "docs" / "verification.md"
CACHE = REPO / "bench" / ".cache" / "exported"
# (torchvision builder, input size); segmentation models return a dict: their "out" is exported
MODELS = [
    ("resnet18", 224), ("resnet34", 224), ("resnet50", 224), ("resnext50_32x4d", 224),
    ("wide_resnet50_2", 224), ("mobilenet_v2", 224), ("mobilenet_v3_small", 224),
    ("mobilenet_v3_large", 224), ("efficientnet_b0", 224), ("efficientnet_b1", 240),
    ("regnet_x_400mf", 224), ("regnet_y_400mf", 224), ("googlenet", 224),
    ("inception_v3", 299), ("shufflenet_v2_x1_0", 224), ("mnasnet1_0", 224),
    ("densenet121", 224), ("vgg11_bn", 224), ("deeplabv3_mobilenet_v3_large", 224),
    ("lraspp_mobilenet_v3_large", 224), ("fcn_resnet50", 224),
]  # fmt: skip


_KEEP: list = []


def _import_torchvision():  # -> module
    """torchvision, also where its compiled ops cannot load: PyPI's torchvision wheel is built
    against the CUDA torch, so next to the CPU torch its _C library fails, and the import dies
    registering fakes for two of its ops. The networks used here need none of its ops: declare
    those two schemas, unimplemented, so the import goes through."""
    import torch

    try:
        import torchvision
    except RuntimeError:
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        for module in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[module]
        import torchvision
    return torchvision


def export(name: str, size: int) -> Path:
    import torch

    torchvision = _import_torchvision()

    path = CACHE / f"{name}.onnx"
    if path.exists():
        return path
    builder = getattr(torchvision.models, name, None) or getattr(
        torchvision.models.segmentation, name
    )
    inception = name in ("googlenet", "inception_v3")
    kwargs = {"aux_logits": False, "init_weights": True} if inception else {}
    if "segmentation" in builder.__module__:  # its backbone untrained too (no download)
        kwargs = {"weights_backbone": None}
    net = builder(weights=None, **kwargs).eval()

    class Out(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y["out"] if isinstance(y, dict) else y

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Out(net), torch.randn(1, 3, size, size), str(path), dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE, opset_version=17,
        input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "N"}},
    )  # fmt: skip
    return path


def bnsurgery(python: str, checkout: Path | None, *args: str) -> tuple[int, dict | None, str]:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    proc = subprocess.run(
        [python, "-m", "bnsurgery", *args], capture_output=True, text=True, env=env, check=False
    )
    try:
        payload = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        payload = None
    return proc.returncode, payload, (proc.stderr.strip().splitlines() or [""])[-1]


def measure(name: str, size: int, python: str, baseline: Path | None) -> dict:
    src = export(name, size)
    out = CACHE / f"{name}.folded.onnx"
    start = time.perf_counter()
    code, payload, err = bnsurgery(python, REPO, "fold", str(src), "-o", str(out), "--json")
    row: dict = {"model": name, "fold_exit": code, "fold_seconds": time.perf_counter() - start}
    if payload:
        summary, v = payload["summary"], payload["verification"] or {}
        outputs = list((v.get("outputs") or {}).values())
        row.update(
            bns=summary["bns_before"], folded=summary["folded"], ratio=v.get("ratio"),
            raw=max((o["max_abs"] / o["scale"] for o in outputs if o.get("scale")), default=None),
            scale=max((o["scale"] for o in outputs), default=None),
        )  # fmt: skip
    else:
        row["error"] = err
    if code == 0:
        code, payload, err = bnsurgery(python, REPO, "compare", str(src), str(out), "--json")
        row["compare_exit"] = code
        if payload:
            row["compare_ratio"] = max(
                o["ratio"] for p in payload["comparisons"] for o in p["outputs"]
            )
    if baseline is not None:
        code, _, err = bnsurgery(
            python, baseline, "fold", str(src), "-o", str(CACHE / f"{name}.base.onnx"), "--json"
        )
        row["base_fold_exit"] = code
    return row


def render(rows: list[dict]) -> str:
    lines = [
        "| model | BN folded | output scale | max rel error | fold (this judge) | compare | "
        "fold (fixed atol) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "exit 0" if r["fold_exit"] == 0 else f"**exit {r['fold_exit']}**"
        ratio = f", {r['ratio']:.2g}x" if r.get("ratio") is not None else ""
        compare = f"exit {r.get('compare_exit', '-')}"
        if r.get("compare_ratio") is not None:
            compare += f", {r['compare_ratio']:.2g}x"
        base = r.get("base_fold_exit")
        base_text = "-" if base is None else ("exit 0" if base == 0 else f"exit {base} (refused)")
        lines.append(
            f"| {r['model']} | {r.get('folded', '-')} of {r.get('bns', '-')} | "
            f"{r.get('scale') or 0:.3g} | {r.get('raw') or 0:.2g} | {verdict}{ratio} | "
            f"{compare} | {base_text} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the project's Python")
    parser.add_argument("--baseline", type=Path, help="another checkout (the old judge)")
    parser.add_argument("--only", nargs="*")
    outputs.add_arguments(parser, "real_exporters", "docs/verification.md's exporter table")
    args = parser.parse_args()
    rows = []
    for name, size in MODELS:
        if args.only and name not in args.only:
            continue
        row = measure(name, size, args.python, args.baseline)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    table = render(rows)
    print(table)
    if args.write_docs:
        outputs.replace_marked(DOC, "real_exporters", table)


if __name__ == "__main__":
    main()
