"""Measuring a model's BatchNormalization inputs over data: the engine behind re-estimation
(targets, probes, a dataflow plan, a tensor cache, the exact and batch engines, Ray)."""
