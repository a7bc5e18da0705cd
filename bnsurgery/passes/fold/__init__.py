"""Folding BatchNormalization into neighbouring linear ops: the pass, its arithmetic in
float64, weight layouts, the per-BN report, the streamed file-to-file fold and its
fold-by-fold verification."""
