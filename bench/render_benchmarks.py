"""Fill the measured tables of docs/benchmarks.md from the benchmark JSON in docs/bench/.

Each table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers; everything
outside them (the prose, the profiles) is left alone. Run it after any benchmark:

    python bench/render_benchmarks.py            # rewrite docs/benchmarks.md in place
    python bench/render_benchmarks.py --check    # exit 1 if the doc is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
JSON_DIR = ROOT / "docs" / "bench"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _when(payload: dict) -> str:
    m = payload["machine"]
    v = m["versions"]
    return (
        f"{m['cores']} cores ({m['cpu_model']}), onnxruntime {v['onnxruntime']}, onnx {v['onnx']}; "
        f"{payload['runs_per_tool']} runs per tool, round-robin, median; the run took "
        f"{payload['seconds']:.0f} s"
    )


def fold_speed(payload: dict) -> list[str]:
    lines = [f"Measured by `bench/fold_speed.py`: {_when(payload)}.", ""]
    for model in payload["models"]:
        tools = model["tools"]
        floor, cli = tools["floor"], tools["cli"]
        mb = model["model_bytes"] / 1e6
        bn = model["input_ops"]["BatchNormalization"]
        nodes = model["input_ops"]["nodes"]
        lines += [f"**{model['model']}** ({mb:.1f} MB, {nodes} nodes, {bn} BN)", ""]
        rows = []
        for name, t in tools.items():
            rows.append(
                [
                    name,
                    _s(t["wall_s"]),
                    f"{_s(t['wall_s_min'])}-{_s(t['wall_s_max'])}",
                    _s(t.get("inner_s")),
                    f"{t['peak_rss_mib']:.0f}",
                    str(t["output_ops"]["nodes"]),
                    str(t["output_ops"]["BatchNormalization"]),
                    _x(t["wall_s"] / floor["wall_s"]),
                    "-" if name == "cli" else _x(cli["wall_s"] / t["wall_s"]),
                ]
            )
        lines += _table(
            ["tool", "wall s", "min-max", "in-process s", "peak RSS MiB", "nodes", "BN left",
             "wall / floor", "cli / tool"],
            rows,
        )  # fmt: skip
        lines.append("")
    return lines[:-1]


def fold_targets(payload: dict) -> list[str]:
    header = ["target", *[m["model"] for m in payload["models"]]]
    floor_row = ["fold end to end <= 1.3x the load+save floor"]
    anchor_row = ["faster than every anchor (wall, fresh process)"]
    for model in payload["models"]:
        r = model["ratios"]
        over_floor = r["cli_wall_over_floor_wall"]
        floor_row.append(f"{_met(over_floor <= 1.3)} ({_x(over_floor)})")
        anchors = [a for a in ("onnxoptimizer", "onnxsim", "onnxscript", "ort_basic")
                   if f"cli_wall_over_{a}_wall" in r]  # fmt: skip
        parts = [f"{a} {r[f'cli_wall_over_{a}_wall']:.2f}x" for a in anchors]
        ok = all(r[f"cli_wall_over_{a}_wall"] < 1 for a in anchors)
        anchor_row.append(f"{_met(ok)}: " + ", ".join(parts))
    return _table(header, [floor_row, anchor_row])


def large_model(payload: dict) -> list[str]:
    size_gib = payload["model"]["bytes"] / 2**30
    tools = payload["tools"]
    rows = [
        [name, _s(t["wall_s"], 1), f"{t['peak_rss_mib'] / 1024:.2f}",
         _x(t["peak_rss_mib"] / 1024 / size_gib), _x(t["wall_s"] / tools["floor"]["wall_s"])]
        for name, t in tools.items()
    ]  # fmt: skip
    r = payload["ratios"]
    rss = r["cli_peak_rss_over_model_size"]
    return [
        f"Measured by `bench/large_model.py`: {_when(payload)}. The model: "
        f"{payload['model']['layers']} x (Conv 3x3 {payload['model']['channels']}->"
        f"{payload['model']['channels']}, BN, Relu), {size_gib:.2f} GiB with external data; "
        f"BN {payload['model']['input_ops']['BatchNormalization']} -> "
        f"{payload['model']['folded_ops']['BatchNormalization']}.",
        "",
        *_table(["tool", "wall s", "peak RSS GiB", "RSS / model size", "wall / floor"], rows),
        "",
        *_table(
            ["target", "result"],
            [
                [
                    "peak RSS <= 1.3x the model's size",
                    f"{_met(rss <= 1.3)}: {_x(rss)} "
                    f"(floor {_x(r['floor_peak_rss_over_model_size'])})",
                ],
                ["(time against the floor, reported)", _x(r["cli_wall_over_floor_wall"])],
            ],
        ),
    ]


def inference_latency(payload: dict) -> list[str]:
    lines = [
        f"Measured by `bench/inference_latency.py`: {payload['machine']['cores']} cores, "
        f"onnxruntime {payload['onnxruntime']}, intra-op threads {payload['threads']}; original "
        "and folded sessions timed alternately, iteration by iteration, median per run; the run "
        f"took {payload['seconds']:.0f} s.",
        "",
    ]
    rows = []
    for model in payload["models"]:
        for row in model["rows"]:
            if row["level"] == "DISABLE_ALL":
                speedup = row["speedup_original_over_folded"]
                target = f"folded >= 1.2x faster: {_met(speedup >= 1.2)}"
            else:
                target = f"folded <= 1.02x original: {_met(row['folded_over_original'] <= 1.02)}"
            rows.append(
                [
                    f"{model['model']} ({model['bns_before']} BN, {model['nodes_before']} -> "
                    f"{model['nodes_after']} nodes)",
                    row["level"],
                    str(row["batch"]),
                    str(row["iterations"]),
                    _s(row["original_ms"], 1),
                    _s(row["folded_ms"], 1),
                    _x(row["speedup_original_over_folded"]),
                    f"{row['max_abs_output_diff']:.1e}",
                    target,
                ]
            )
    lines += _table(
        ["model", "ORT level", "batch", "iterations", "original ms", "folded ms",
         "speed-up", "max abs diff", "target"],
        rows,
    )  # fmt: skip
    return lines


def reestimate_anchor(payload: dict) -> list[str]:
    lines = [f"Measured by `bench/reestimate_anchor.py`: {_when(payload)}.", ""]
    for model in payload["models"]:
        tools = model["tools"]
        floor = tools["forward_enable_all"]
        lines += [
            f"**{model['model']}** ({model['model_bytes'] / 1e6:.1f} MB), {model['samples']} "
            f"samples, batch {model['batch_size']}",
            "",
        ]
        torch_wall = tools.get("torch_update_bn", {}).get("wall_s")
        rows = []
        for name, t in tools.items():
            rows.append(
                [
                    name,
                    _s(t["wall_s"]),
                    _s(t.get("inner_s")),
                    f"{t['peak_rss_mib']:.0f}",
                    str(t.get("passes", "-")),
                    _x(t["wall_s"] / floor["wall_s"]),
                    _x(t["wall_s"] / torch_wall) if torch_wall else "-",
                ]
            )
        lines += _table(
            ["tool", "wall s", "in-process s", "peak RSS MiB", "passes", "wall / forward",
             "wall / torch"],
            rows,
        )  # fmt: skip
        targets = payload["targets"][model["model"]]
        lines += ["", "Targets: " + "; ".join(f"{k} {_met(v)}" for k, v in targets.items()), ""]
    return lines[:-1]


def harness_cost(data: dict) -> list[str]:
    """bnsurgery compare against Polygraphy, and against one session (bench/harness_cost.py)."""
    rows = []
    for row in data["scenarios"]:
        tools = row["tools"]
        floor = tools.get("single", {}).get("peak_rss_mib")
        poly = tools["polygraphy"]
        for name in ("single", "bnsurgery", "today", "polygraphy"):
            if name not in tools:
                continue
            t = tools[name]
            rows.append([
                row["scenario"], name, _s(t["wall_s"], 1), f"{t['peak_rss_mib']:.0f}",
                _x(t["peak_rss_mib"] / floor) if floor else "-",
                _x(poly["wall_s"] / t["wall_s"]) if name != "polygraphy" else "-",
            ])  # fmt: skip
        if row.get("polygraphy_json_mib") is not None:
            rows.append([row["scenario"], "polygraphy's JSON", "-",
                         f"{row['polygraphy_json_mib']:.0f} (file)", "-", "-"])  # fmt: skip
    header = ["scenario", "tool", "wall s", "peak MiB", "peak / one session",
              "Polygraphy's time / this"]  # fmt: skip
    return _table(header, rows)


SECTIONS: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "fold_speed": ("fold_speed.json", fold_speed),
    "fold_targets": ("fold_speed.json", fold_targets),
    "large_model": ("large_model.json", large_model),
    "inference_latency": ("inference_latency.json", inference_latency),
    "reestimate_anchor": ("reestimate_anchor.json", reestimate_anchor),
    "harness_cost": ("harness_cost.json", harness_cost),
}


def replace_marked(text: str, name: str, body: str) -> str:
    """`text` with what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` replaced by
    `body` (ending in a newline); unchanged where the markers are absent."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def render(text: str) -> str:
    for name, (file, build) in SECTIONS.items():
        path = JSON_DIR / file
        if path.exists():
            body = "\n".join(build(json.loads(path.read_text()))) + "\n"
            text = replace_marked(text, name, body)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    before = DOC.read_text()
    after = render(before)
    if args.check:
        return 0 if after == before else 1
    DOC.write_text(after)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
