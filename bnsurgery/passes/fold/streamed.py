"""Fold a model file into another file, the fast way: what `bnsurgery fold` and
`bnsurgery.fold_file` run.

The model is loaded lazily (io.load_model(..., external_data="lazy")): large weights, embedded
or external, stay in their file until the pass reads them, and the ones it does not rewrite
are copied file to file on save. Without verification the pass rewrites the loaded model in
place. With verification the original and the folded model are run on ONNX Runtime first
(bnsurgery.passes.verify), and nothing is written when they disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bnsurgery.errors import CheckFailed
from bnsurgery.onnxio import has_external_files, is_lazy, load_model, materialize, save_model
from bnsurgery.passes import PassResult
from bnsurgery.passes.fold.report import FoldReport
from bnsurgery.passes.fold.rewrite import FoldPass


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
    lazy = is_lazy(original)
    keeps_external = external_data or has_external_files(original)
    result = FoldPass(backward=backward, affine=affine, in_place=not verify)(original)
    report: FoldReport = result.report  # type: ignore[assignment]
    if verify:
        from bnsurgery.passes.verify import verify_fold

        reference, candidate = original, result
        if lazy:  # the runtimes need the weights in memory
            reference = materialize(original)
            candidate = PassResult(materialize(result.model), report, result.modified)
        try:
            verify_fold(reference, candidate, shapes=shapes, label=str(model))
        except CheckFailed as exc:
            return report, None, exc
    written = save_model(
        result.model, output, external_data=True if keeps_external else None, stream=True
    )
    return report, written, None
