"""The benchmarks' --smoke modes run and write valid JSON (numbers are not asserted here).

Each smoke mode uses a tiny model, no anchors and no torch, and no plot (matplotlib is optional);
together they take well under a minute. The full benchmarks are run by hand
(docs/benchmarks.md), never in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.slow

SMOKES = {
    "fold_speed": ("models", "targets", "machine"),
    "inference_latency": ("models", "targets"),
    "large_model": ("tools", "ratios", "targets"),
    "moments_accuracy": ("rows", "onnxruntime"),
    "reestimate_speed": ("models", "targets"),  # owned by the re-estimation work
    "reestimate_anchor": ("models", "targets"),
    "reestimate_memory": ("tools", "ratios", "targets"),
    "reestimate_ray_scaling": ("results", "machine"),
}


def run_smoke(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("script", sorted(SMOKES))
def test_smoke_mode_writes_valid_json(script: str, tmp_path: Path) -> None:
    out = tmp_path / f"{script}.json"
    proc = run_smoke(script, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["smoke"] is True and all(key in payload for key in SMOKES[script])
