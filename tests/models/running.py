"""Inspecting and running the test models: find nodes in every scope, make seeded feeds, run
ONNX Runtime (all optimizations off) or onnx.reference, and compare a pair of models at the
tolerance of their output dtype."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .build import BF16, BOOL, F16, F32, F64, I64, NP_DTYPE, rng

# (atol, rtol) by dtype: the explicit-tolerance defaults of bnsurgery.harness.tolerances
# (docs/compare.md); fp64 is held to a much tighter bound since the fold is fp64.
TOLERANCE = {F32: (1e-5, 1e-4), F16: (2.5e-3, 1e-3), BF16: (2e-2, 1e-2), F64: (1e-10, 1e-9)}


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of the model: main graph, subgraphs (recursively) and local functions."""
    found: list[onnx.NodeProto] = []

    def walk(nodes) -> None:
        for node in nodes:
            found.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return found


def count_op(model: onnx.ModelProto, op_type: str = "BatchNormalization") -> int:
    return sum(1 for n in all_nodes(model) if n.op_type == op_type)


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    matches = [n for n in all_nodes(model) if n.name == name]
    assert len(matches) == 1, f"{len(matches)} nodes named {name!r}"
    return matches[0]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def random_feeds(
    model: onnx.ModelProto, seed: int = 0, **overrides: np.ndarray
) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input without an initializer; dynamic dims become 1.

    Inputs whose name contains "var" get positive values (they are BN variances)."""
    r = rng(1000 + seed)
    initialized = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in initialized or inp.name in overrides:
            continue
        ttype = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in ttype.shape.dim]
        if ttype.elem_type == BOOL:
            feeds[inp.name] = np.array(True).reshape(shape)
        elif ttype.elem_type == I64:
            feeds[inp.name] = np.zeros(shape, dtype=np.int64)
        elif "var" in inp.name:
            feeds[inp.name] = r.uniform(0.5, 2.0, shape).astype(NP_DTYPE[ttype.elem_type])
        else:
            feeds[inp.name] = r.standard_normal(shape).astype(NP_DTYPE[ttype.elem_type])
    feeds.update(overrides)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnx.reference with an inference-mode BN in every opset (see bnsurgery.runtime.reference)."""
    from bnsurgery.runtime.reference import run_reference as evaluate

    return list(evaluate(model, feeds).values())


def run_pair(
    original: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
    """Run both models on one engine: ORT when it runs both, else onnx.reference."""
    try:
        return "ort", run_ort(original, feeds), run_ort(candidate, feeds)
    except Exception:  # ORT lacks a kernel (fp64 Conv, bf16, opset 6, mixed BN-15 dtypes)
        return "reference", run_reference(original, feeds), run_reference(candidate, feeds)


def output_dtype(model: onnx.ModelProto) -> int:
    return model.graph.output[0].type.tensor_type.elem_type


def max_error(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
) -> float:
    """The largest |candidate - original| / (atol + rtol*|original|) over all outputs: <= 1
    means equivalent at the dtype's tolerance."""
    feeds = feeds if feeds is not None else random_feeds(original)
    _, ref, got = run_pair(original, candidate, feeds)
    assert len(ref) == len(got)
    worst = 0.0
    for out, a, b in zip(original.graph.output, ref, got, strict=True):
        atol, rtol = TOLERANCE.get(out.type.tensor_type.elem_type, TOLERANCE[F32])
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        assert a64.shape == b64.shape, f"{out.name}: shape {b64.shape} != {a64.shape}"
        same_nan = np.isnan(a64) & np.isnan(b64)
        same_inf = np.isinf(a64) & (a64 == b64)
        err = np.abs(b64 - a64) / (atol + rtol * np.abs(a64))
        err = np.where(same_nan | same_inf, 0.0, err)
        err = np.where(np.isnan(err), np.inf, err)
        worst = max(worst, float(err.max()) if err.size else 0.0)
    return worst


def assert_equivalent(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """Outputs of candidate equal those of original within the dtype's tolerance (TOLERANCE)."""
    feeds = feeds if feeds is not None else random_feeds(original)
    engine, ref, got = run_pair(original, candidate, feeds)
    assert [o.name for o in candidate.graph.output] == [o.name for o in original.graph.output]
    for out, a, b in zip(original.graph.output, ref, got, strict=True):
        atol, rtol = TOLERANCE.get(out.type.tensor_type.elem_type, TOLERANCE[F32])
        np.testing.assert_allclose(
            np.asarray(b, dtype=np.float64),
            np.asarray(a, dtype=np.float64),
            atol=atol,
            rtol=rtol,
            equal_nan=True,
            err_msg=f"output {out.name!r} differs ({engine})",
        )
