"""Measuring a model's BatchNormalization inputs over data: the engine behind re-estimation.

One job per module, in the order a measurement uses them:

- targets: which BNs are measured, and their current parameters;
- feeds: DATA as a re-iterable stream of batches;
- plan: waves of BNs and stages of the main graph (exact mode);
- probes: the ONNX nodes that measure a BN's input, and the sub-models that carry them;
- runner: ONNX Runtime sessions for those sub-models (on bnsurgery.runtime);
- cache: exact mode's stage-boundary tensors within a budget, its planner injected;
- exact, batch: the two engines; engine: one call for either;
- params: writing the new statistics into the model; report: what was done;
- ray, ray_worker: the engine on a Ray cluster.

Nothing here imports bnsurgery.passes: what is written into each BN between waves is the
caller's `on_wave`.
"""
