"""`bnsurgery merge-stats`: combine statistics shards (from `reestimate --save-stats`)."""

from __future__ import annotations

from pathlib import Path

import click

from bnsurgery import stats
from bnsurgery.cli.options import json_option
from bnsurgery.cli.render import emit
from bnsurgery.errors import UsageError

EXAMPLE = """\b
Example:
  bnsurgery reestimate net.onnx --data shard0.npz --save-stats a.npz
  bnsurgery reestimate net.onnx --data shard1.npz --save-stats b.npz
  bnsurgery merge-stats a.npz b.npz -o merged.npz
  bnsurgery reestimate net.onnx --stats merged.npz -o net.adapted.onnx
"""


@click.command("merge-stats", epilog=EXAMPLE)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="The merged .npz."
)
@json_option()
def merge_stats_command(files: tuple[Path, ...], output: Path, as_json: bool) -> None:
    """Merge BN statistics files exactly (Chan's formula, float64).

    Every file must describe the same BNs (names and channel counts) measured in the same
    mode. The merged file applies with `reestimate --stats`. In exact mode the shards'
    later-wave BNs were measured after each shard's own updates upstream; see
    docs/reestimate.md for when that matters.
    """
    if any(Path(f).resolve() == output.resolve() for f in files):
        raise UsageError(f"output {output} is one of the inputs")
    merged = stats.merge_files(files)
    merged.save(output)
    payload = {
        "inputs": [str(f) for f in files],
        "output": str(output),
        "mode": merged.mode,
        "samples": merged.samples,
        "bns": len(merged.entries),
    }
    emit(
        as_json,
        payload,
        lambda: (
            f"merged {len(files)} file(s): {merged.samples} samples, "
            f"{len(merged.entries)} BN(s), mode {merged.mode}\nwrote {output}"
        ),
    )
