"""Fold a model file into another file, the fast way: what `bnsurgery fold` and
`bnsurgery.fold_file` run.

The model is loaded lazily (onnxio.load.load_model(..., external_data="lazy")): large weights,
embedded or external, stay in their file until the pass reads them, and the ones it does not
rewrite are copied file to file on save. Without verification the pass rewrites the loaded
model in place. With verification (the pass's postcondition) the original and the folded model
are run on ONNX Runtime first, and nothing is written when they disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bnsurgery.errors import CheckFailed
from bnsurgery.onnxio import has_external_files, load_model, save_model
from bnsurgery.passes.fold.core import FoldPass, VerificationFailed
from bnsurgery.passes.fold.report import FoldReport


def fold_file_checked(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    backward: bool = True,
    affine: bool = True,
    verify: bool = True,
    external_data: bool = False,
    shapes: Mapping[str, list[int]] | None = None,
) -> tuple[FoldReport, Path | None, CheckFailed | None]:
    """(report, the path written or None, the verification failure or None).

    A model that came with external data keeps it, as does one saved with external_data=True.
    On a verification failure nothing is written; the report still says what fold did.
    """
    original = load_model(model, external_data="lazy")
    keeps_external = external_data or has_external_files(original)
    # Verifying needs the original beside the folded model, so the fold then works on a copy.
    fold = FoldPass(
        backward=backward, affine=affine, in_place=not verify, verify=verify, shapes=shapes,
        label=str(model),
    )  # fmt: skip
    try:
        result = fold(original)
    except VerificationFailed as failure:
        assert failure.result is not None
        return failure.result.report, None, failure  # type: ignore[return-value]
    written = save_model(
        result.model, output, external_data=True if keeps_external else None, stream=True
    )
    return result.report, written, None  # type: ignore[return-value]
