"""Folding BatchNormalization into neighbouring linear ops.

One rule per module, the way onnxscript keeps its rewrite rules:

- core: FoldPass (verification is its postcondition), the walk over scopes, each BN's decision;
- dispatch: which rule an affine goes to; conv, gemm, matmul: folding into those ops;
  batchnorm: a BN as an affine, and BN into BN; affine: per-channel Mul/Add/Sub/Div;
- plan, context, walk, apply: the shared vocabulary, what rules read, the paths between an
  affine and its op, and applying a fold;
- arithmetic (float64), layout (channel maps), report, streamed (file to file),
  verify_folds (verification fold by fold).
"""

from bnsurgery.passes.fold.core import FoldPass, VerificationFailed
from bnsurgery.passes.fold.report import (
    FOLDED,
    REASONS,
    AffineFold,
    BnDecision,
    FoldReport,
    dry_run_words,
)

__all__ = [
    "FOLDED",
    "REASONS",
    "AffineFold",
    "BnDecision",
    "FoldPass",
    "FoldReport",
    "VerificationFailed",
    "dry_run_words",
]
