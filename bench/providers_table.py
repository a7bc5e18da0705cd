"""Each sample model against its fold on every execution provider given: the table of
docs/providers.md.

Run it with the Python of an environment that has the provider (a venv with
onnxruntime-openvino, or one with onnxruntime-ggml):

    VENV/bin/python bench/providers_table.py --providers cpu,openvino --out results.json
    VENV/bin/python bench/providers_table.py --providers cpu,ggml --self-only \\
        --provider-option ggml:weights=f32 --models digits_mlp --out ggml.json

For every model: `bnsurgery.fold` (verified on CPU), then `bnsurgery.compare(model, folded)` on
the providers (or, with --self-only, the folded model against itself across providers, for an
EP that takes no BN model), on the model's real test data where it has some. Per pair: max abs,
the judge's ratio (deviation / rounding noise, limit 8), the placement, and the median time of a
batch in session.run (the pairs of one compare share the batches; --repeat compares run).
--write-docs also writes the JSON under docs/bench/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
DATA = {  # real held-out data where the model has it; otherwise seeded random samples
    "digits_cnn": str(SAMPLES / "digits_test.npz"),
    "digits_cnn_nobn": str(SAMPLES / "digits_test.npz"),
    "digits_mlp": "flat:" + str(SAMPLES / "digits_test.npz"),  # the same images, [N, 64]
    "resnet_small": "random:64",
}


def measure(name: str, providers: list[str], options: list[str], self_only: bool,
            repeat: int) -> list[dict]:  # fmt: skip
    import onnx

    import bnsurgery

    model = onnx.load(SAMPLES / f"{name}.onnx")
    folded = bnsurgery.fold(model).model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.folded.onnx"
        onnx.save(folded, path)
        data = DATA[name]
        if data.startswith("flat:"):
            import numpy as np

            arrays = dict(np.load(data.removeprefix("flat:")))
            arrays = {k: v.reshape(len(v), -1) if v.ndim > 2 else v for k, v in arrays.items()}
            data = str(Path(tmp) / "flat.npz")
            np.savez(data, **arrays)
        reference = path if self_only else SAMPLES / f"{name}.onnx"
        candidate = None if self_only else path
        runs = [
            bnsurgery.compare(
                reference,
                candidate,
                providers=providers,
                data=data,
                batch_size=32,
                provider_options=options,
                allow_fallback=True,
            )
            for _ in range(repeat)
        ]
    rows = []
    for index, pair in enumerate(runs[0].pairs):
        (metrics,) = pair.outputs[:1]
        batches = runs[0].data["batches"]
        seconds = statistics.median(run.pairs[index].seconds for run in runs)
        placement = pair.session.placement
        rows.append(
            {
                "model": name,
                "pair": f"{'folded' if self_only else pair.model} on {pair.provider}",
                "provider": pair.provider,
                "passed": pair.passed,
                "max_abs": metrics.max_abs,
                "noise_max_abs": metrics.noise_max_abs,
                "judge_ratio": metrics.ratio,
                "placement": placement.summary(pair.provider) if placement else None,
                "fallback": pair.session.fallback,
                "samples": runs[0].data["samples"],
                "batch_size": 32,
                "ms_per_batch": 1000 * seconds / max(batches, 1),
                "onnxruntime": pair.session.onnxruntime_version,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="cpu,openvino")
    parser.add_argument("--provider-option", action="append", default=[])
    parser.add_argument("--models", default=",".join(DATA))
    parser.add_argument("--self-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / ".cache" / "results" / "providers.json"
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    import onnxruntime

    providers = args.providers.split(",")
    rows = []
    for name in args.models.split(","):
        rows += measure(name, providers, args.provider_option, args.self_only, args.repeat)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": sys.version},
        "onnxruntime": onnxruntime.__version__,
        "providers": providers,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.write_docs:
        target = ROOT / "docs" / "bench" / args.out.name
        target.write_text(json.dumps(result, indent=2))
    for row in rows:
        ratio = row["judge_ratio"]
        print(
            f"| {row['model']} | {row['pair']} | {row['max_abs']:.3g} | "
            f"{'-' if ratio is None else f'{ratio:.2g}x'} | {row['placement'] or '-'} | "
            f"{row['ms_per_batch']:.2f} | {'pass' if row['passed'] else 'FAIL'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
