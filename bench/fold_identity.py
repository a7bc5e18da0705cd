"""Fold outputs, byte for byte: the SHA-256 of `bnsurgery fold`'s output file for every sample
model, every bench model and every real exporter's model cached under bench/.cache/exported.

A refactoring must not change a single folded byte. Record the hashes before it and check
them after:

    python bench/fold_identity.py --out bench/fold_identity.json      # record
    python bench/fold_identity.py --check bench/fold_identity.json    # compare; exit 1 on change

The fold runs through the CLI (the streamed file-to-file path) with --no-verify, because the
verdict is not part of the bytes; models absent on this machine are listed as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import cached_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
EXPORTED = ROOT / "bench" / ".cache" / "exported"


def models() -> dict[str, Path]:
    found = {p.stem: p for p in sorted(SAMPLES.glob("*.onnx"))}
    for name in ("resnet50", "mobilenetv2", "small_stack"):
        found[f"bench/{name}"] = cached_model(name)
    for path in sorted(EXPORTED.glob("*.onnx")):
        if not path.stem.endswith((".base", ".folded")):
            found[f"exported/{path.stem}"] = path
    return found


def folded_digest(model: Path, workdir: Path) -> str:
    out = workdir / f"{model.stem}.out.onnx"
    subprocess.run(
        [sys.executable, "-m", "bnsurgery", "fold", str(model), "-o", str(out), "--no-verify"],
        check=True,
        capture_output=True,
    )
    digest = hashlib.sha256()
    for path in sorted(workdir.glob(f"{out.name}*")):  # the model and any external data
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
        path.unlink()
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the hashes here")
    group.add_argument("--check", type=Path, help="compare against hashes written before")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hashes = {name: folded_digest(path, Path(tmp)) for name, path in models().items()}
    if args.out:
        args.out.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
        print(f"{len(hashes)} folded models hashed into {args.out}")
        return 0
    recorded = json.loads(args.check.read_text())
    changed = [name for name in recorded if name in hashes and hashes[name] != recorded[name]]
    skipped = [name for name in recorded if name not in hashes]
    same = len(recorded) - len(changed) - len(skipped)
    print(f"{same} identical, {len(changed)} changed, {len(skipped)} skipped (not on this machine)")
    for name in changed:
        print(f"  changed: {name}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
