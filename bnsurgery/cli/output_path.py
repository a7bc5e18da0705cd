"""The OUT rules of the commands that write a model (fold, insert, reestimate, adapt, run).

OUT is `-o/--output` when given, else `<stem>.<command>.onnx` beside MODEL; `--in-place`
writes MODEL itself, and an OUT that is MODEL is refused unless `--in-place` says so. These
rules speak the command line's language, so they live here and not in the library.
"""

from __future__ import annotations

import os
from pathlib import Path

from bnsurgery.errors import UsageError


def resolve_output_path(
    model_path: str | os.PathLike[str] | None,
    out: str | os.PathLike[str] | None,
    command: str,
    *,
    in_place: bool = False,
) -> Path:
    """The output path of a command: OUT, or `<stem>.<command>.onnx` beside MODEL."""
    if in_place:
        if model_path is None:
            raise UsageError("--in-place needs a model path")
        if out is not None and Path(out).resolve() != Path(model_path).resolve():
            raise UsageError("--in-place and -o/--output name different files")
        return Path(model_path)
    if out is None:
        if model_path is None:
            raise UsageError("an output path is needed when the model is not a file")
        src = Path(model_path)
        return src.with_name(f"{src.stem}.{command}.onnx")
    target = Path(out)
    if model_path is not None and target.exists() and _same_file(target, Path(model_path)):
        raise UsageError(f"output {target} is the input model; use --in-place to overwrite it")
    if model_path is not None and target.resolve() == Path(model_path).resolve():
        raise UsageError(f"output {target} is the input model; use --in-place to overwrite it")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
