"""Re-estimation through the CLI, in fresh processes, against one forward pass and torch.

bench/reestimate_speed.py (owned by the re-estimation work) times the API in one process against
one ORT pass. This script is the end-to-end view: for sample_models/resnet_small.onnx
and the ResNet-50-sized model of bench/_common.py, on the same 512 seeded random samples (saved
once as .npz), each tool runs in a fresh process, round-robin, `--runs` times (median reported):

  forward_enable_all   one ORT CPU pass over the samples at ORT_ENABLE_ALL (ORT's default)
  forward_disable_all  the same at ORT_DISABLE_ALL
  batch                bnsurgery reestimate MODEL --data D --mode batch --json
  exact                bnsurgery reestimate MODEL --data D --mode exact --json (+ pass count)
  torch_update_bn      torch.optim.swa_utils.update_bn on the same architecture and weights
                       (the ONNX graph rebuilt as torch modules), same data and batch size

Wall time is from spawn to exit for every tool (start-up, imports and data loading included;
the forward passes import onnxruntime and numpy only, bench/_workers.py); `inner_s` is the
tool's own time for the pass itself. Batch size 64 everywhere.

    python bench/reestimate_anchor.py                          # JSON to bench/.cache/results/
    python bench/reestimate_anchor.py --write-docs             # ... and to docs/bench/
    python bench/reestimate_anchor.py --smoke --out /tmp/r.json   # seconds, no torch
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
import numpy as np

BATCH = 64
TARGET_BATCH = 1.25
TARGET_EXACT = 2.5
MODELS = {"resnet_small": c.ROOT / "sample_models" / "resnet_small.onnx"}


def model_path(name: str) -> Path:
    return MODELS[name] if name in MODELS else c.cached_model(name)


def input_shape(path: Path) -> tuple[str, list[int]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in inits)
    dims = [int(d.dim_value) for d in graph_input.type.tensor_type.shape.dim[1:]]
    return graph_input.name, dims


def dataset(name: str, samples: int) -> Path:
    path = c.CACHE / f"{name}.samples{samples}.npz"
    if not path.exists():
        key, dims = input_shape(model_path(name))
        rng = np.random.default_rng(1)
        c.CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{key: rng.standard_normal((samples, *dims), dtype=np.float32)})
        tmp.replace(path)
    return path


def commands(tool: str, model: Path, data: Path, out: Path) -> list[str]:
    if tool in ("batch", "exact"):
        return [c.python(), "-m", "bnsurgery", "reestimate", str(model), "--data", str(data),
                "--mode", tool, "--batch-size", str(BATCH), "-o", str(out), "--json"]  # fmt: skip
    return c.worker_argv(tool, str(model), str(data), str(BATCH))


def bench_model(name: str, tools: list[str], runs: int, samples: int, tmp: Path) -> dict:
    model, data = model_path(name), dataset(name, samples)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    for _ in range(runs):
        for tool in tools:
            out = tmp / f"{name}.{tool}.onnx"
            results[tool].append(c.measure(commands(tool, model, data, out)))
            print(f"{name} {tool}: {results[tool][-1]['wall_s']:.2f} s", flush=True)
    summary = {}
    for tool, runs_ in results.items():
        summary[tool] = c.summarize(runs_)
        inner = runs_[-1]["inner"] or {}
        if tool in ("batch", "exact"):
            summary[tool]["inner_s"] = float(np.median([r["inner"]["seconds"] for r in runs_]))
            for key in ("passes", "waves", "forward_equivalents", "samples", "batches"):
                if key in inner:
                    summary[tool][key] = inner[key]
    return {"model": name, "model_bytes": c.model_bytes(model), "samples": samples,
            "batch_size": BATCH, "tools": summary, "ratios": ratios(summary)}  # fmt: skip


def ratios(summary: dict) -> dict[str, float]:
    out = {}
    for floor in ("forward_enable_all", "forward_disable_all"):
        for tool in ("batch", "exact", "torch_update_bn"):
            if tool in summary and floor in summary:
                out[f"{tool}_wall_over_{floor}_wall"] = (
                    summary[tool]["wall_s"] / summary[floor]["wall_s"]
                )
                out[f"{tool}_inner_over_{floor}_inner"] = (
                    summary[tool]["inner_s"] / summary[floor]["inner_s"]
                )
    if "torch_update_bn" in summary:
        for tool in ("batch", "exact"):
            out[f"{tool}_wall_over_torch_wall"] = (
                summary[tool]["wall_s"] / summary["torch_update_bn"]["wall_s"]
            )
            out[f"{tool}_inner_over_torch_inner"] = (
                summary[tool]["inner_s"] / summary["torch_update_bn"]["inner_s"]
            )
    return {k: round(v, 4) for k, v in out.items()}


def targets(model: dict) -> dict[str, bool]:
    r = model["ratios"]
    out = {
        "batch_<=1.25x_forward": r["batch_wall_over_forward_enable_all_wall"] <= TARGET_BATCH,
        "exact_<=2.5x_forward": r["exact_wall_over_forward_enable_all_wall"] <= TARGET_EXACT,
    }
    if "batch_wall_over_torch_wall" in r:
        out["batch_faster_than_torch"] = r["batch_wall_over_torch_wall"] < 1
        out["exact_faster_than_torch"] = r["exact_wall_over_torch_wall"] < 1
    return out


def torch_from_onnx(model):  # -> torch.nn.Module
    """The Conv/BN/Relu/Clip/MaxPool/Add/GlobalAveragePool/Flatten/Gemm graph as torch modules,
    with the same weights and BN statistics (nn.BatchNorm2d, so update_bn finds them)."""
    import onnx
    import torch
    from onnx import numpy_helper

    nn, F = torch.nn, torch.nn.functional
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def attrs(node):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.steps = []
            self.mods = nn.ModuleDict()
            for i, node in enumerate(model.graph.node):
                a, key = attrs(node), f"m{i}"
                if node.op_type == "Conv":
                    w = inits[node.input[1]]
                    pads = list(a.get("pads", [0, 0, 0, 0]))
                    conv = nn.Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], w.shape[2:],
                                     stride=tuple(a.get("strides", [1, 1])),
                                     padding=tuple(pads[:2]), groups=a.get("group", 1),
                                     dilation=tuple(a.get("dilations", [1, 1])),
                                     bias=len(node.input) > 2)  # fmt: skip
                    conv.weight.data = torch.from_numpy(w.copy())
                    if len(node.input) > 2:
                        conv.bias.data = torch.from_numpy(inits[node.input[2]].copy())
                    self.mods[key] = conv
                elif node.op_type == "BatchNormalization":
                    gamma = inits[node.input[1]]
                    bn = nn.BatchNorm2d(gamma.size, eps=a.get("epsilon", 1e-5))
                    for attr_name, src in zip(("weight", "bias"), node.input[1:3], strict=True):
                        getattr(bn, attr_name).data = torch.from_numpy(inits[src].copy())
                    bn.running_mean.copy_(torch.from_numpy(inits[node.input[3]].copy()))
                    bn.running_var.copy_(torch.from_numpy(inits[node.input[4]].copy()))
                    self.mods[key] = bn
                elif node.op_type == "Gemm":
                    w = inits[node.input[1]]
                    w = w if a.get("transB", 0) else w.T
                    lin = nn.Linear(w.shape[1], w.shape[0])
                    lin.weight.data = torch.from_numpy(np.ascontiguousarray(w))
                    lin.bias.data = torch.from_numpy(inits[node.input[2]].copy())
                    self.mods[key] = lin
                self.steps.append((node, a, key))

        def forward(self, x):
            env = {model.graph.input[0].name: x}
            for node, a, key in self.steps:
                ins = [env.get(n) for n in node.input]
                op = node.op_type
                if op in ("Conv", "BatchNormalization", "Gemm"):
                    y = self.mods[key](ins[0])
                elif op == "Relu":
                    y = F.relu(ins[0])
                elif op == "Clip":
                    lo, hi = (float(inits[n].reshape(-1)[0]) for n in node.input[1:3])
                    y = torch.clamp(ins[0], lo, hi)
                elif op == "MaxPool":
                    y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides", 1),
                                     list(a.get("pads", [0, 0, 0, 0]))[:2])  # fmt: skip
                elif op == "Add":
                    y = ins[0] + ins[1]
                elif op == "GlobalAveragePool":
                    y = F.adaptive_avg_pool2d(ins[0], 1)
                elif op == "Flatten":
                    y = torch.flatten(ins[0], a.get("axis", 1))
                else:
                    raise NotImplementedError(op)
                env[node.output[0]] = y
            return env[model.graph.output[0].name]

    return Net()


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.3), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        tools = list(model["tools"])
        walls = [model["tools"][t]["wall_s"] for t in tools]
        colors = ["#999999" if t.startswith("forward") else "#e08a2c" if t.startswith("torch")
                  else "#2b7bba" for t in tools]  # fmt: skip
        ax.bar(range(len(tools)), walls, color=colors)
        floor = model["tools"]["forward_enable_all"]["wall_s"]
        ax.axhline(floor, color="black", ls="--", lw=0.8, label="forward (ENABLE_ALL)")
        ax.axhline(floor * TARGET_BATCH, color="red", ls=":", lw=0.8, label="1.25x forward")
        ax.axhline(floor * TARGET_EXACT, color="purple", ls=":", lw=0.8, label="2.5x forward")
        for i, tool in enumerate(tools):
            passes = model["tools"][tool].get("passes")
            if passes is not None:
                ax.text(i, walls[i], f"{passes} pass(es)", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(tools)), tools, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("wall time, fresh process (s, median)")
        ax.set_title(f"{model['model']}, {model['samples']} samples, batch {model['batch_size']}")
        ax.legend(fontsize=7)
    fig.suptitle("BN re-estimation (CLI) vs one forward pass and torch update_bn", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet_small,resnet50")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 16 samples, no torch")
    outputs.add_arguments(parser, "reestimate_anchor", "docs/bench/reestimate_anchor.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = outputs.parse_args(parser, argv)
    if args.smoke:
        args.models, args.samples, args.runs, args.no_torch = "small_stack", 16, 1, True
    has_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    tools = ["forward_enable_all", "forward_disable_all", "batch", "exact"]
    tools += ["torch_update_bn"] if has_torch else []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bnsurgery-reest-") as tmp:
        models = [
            bench_model(m, tools, args.runs, args.samples, Path(tmp))
            for m in args.models.split(",")
        ]
    payload = {
        "benchmark": "reestimate_anchor",
        "smoke": args.smoke,
        "machine": c.machine(),
        "runs_per_tool": args.runs,
        "torch_anchor": has_torch,
        "seconds": round(time.time() - started, 1),
        "models": models,
        "targets": {m["model"]: targets(m) for m in models},
    }
    c.write_json(args.out, payload)
    if args.write_docs:
        outputs.copy_to_docs(args.out, outputs.docs_json("reestimate_anchor"))
    if args.plot is not None:
        plot(payload, args.plot)
    for m in models:
        print(f"{m['model']}:")
        for tool, s in m["tools"].items():
            passes = f"  passes {s['passes']}" if "passes" in s else ""
            print(f"  {tool:20s} wall {s['wall_s']:.2f}s  inner {s.get('inner_s', 0):.2f}s  "
                  f"rss {s['peak_rss_mib']:.0f} MiB{passes}")  # fmt: skip
        print("  ratios:", m["ratios"])
    print("targets:", payload["targets"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
