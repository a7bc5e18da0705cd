"""ONNX node builders that measure a BN's input, and the sub-models that carry them.

A probe is the nodes that measure one target's input inside the session, the outputs they add
and how to decode those outputs into `Moments`. Each measured tensor is reshaped to (N, C, -1)
and reduced per sample and channel to its mean and mean squared deviation (two passes), so
only (N, C) numbers per BN leave the session per batch; numpy merges them, and the batches, in
float64 with Chan's formula (bnsurgery.stats).

Batch mode replaces each BN by a probe that also normalises with the batch's statistics:
`training_mode_rewrite` (the BN itself in training mode, on the CPU EP) or `batch_norm_rewrite`
(standard ops any EP runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnsurgery.measure.targets import BnTarget
from bnsurgery.model.graph import NameGenerator, node_inputs_with_implicit
from bnsurgery.stats import Moments


def submodel(
    base: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[str],
    extra_initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    """A model of `nodes` (in order) fed by `inputs`, with the initializers they read."""
    used: set[str] = set()
    for node in nodes:
        used.update(node_inputs_with_implicit(node))
    graph = onnx.GraphProto(name=f"{base.graph.name or 'graph'}_part")
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    graph.initializer.extend(t for t in base.graph.initializer if t.name in used)
    graph.initializer.extend(extra_initializers)
    graph.sparse_initializer.extend(
        t for t in base.graph.sparse_initializer if t.values.name in used
    )
    model = onnx.ModelProto(ir_version=base.ir_version, graph=graph)
    model.opset_import.extend(base.opset_import)
    model.functions.extend(base.functions)
    return model


def value_info(name: str, dtype: np.dtype | int) -> onnx.ValueInfoProto:
    elem = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return helper.make_tensor_value_info(name, elem, None)


@dataclass
class Probe:
    """The nodes that measure one target's input, and how to read their outputs back."""

    target: BnTarget
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    outputs: list[str]
    decode: Callable[[list[np.ndarray]], Moments]


def reduce_node(
    op: str,
    x: str,
    out: str,
    axes: Sequence[int],
    keepdims: int,
    opset: int,
    names: NameGenerator,
    inits: list[onnx.TensorProto],
) -> onnx.NodeProto:
    """A Reduce* node with its axes as an attribute or an input, as the opset wants."""
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if axes_as_input:
        axes_name = names(f"{out}_axes")
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        return helper.make_node(op, [x, axes_name], [out], name=names(out), keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=names(out), axes=list(axes), keepdims=keepdims)


def _grouped(
    target: BnTarget, x: str, names: NameGenerator, inits: list[onnx.TensorProto]
) -> tuple[onnx.NodeProto, str]:
    """Reshape X to (N, C, -1) (or (N, features, 1) for per-activation BNs)."""
    shape_name = names(f"{target.key}/stats_shape")
    shape = [0, target.channels, -1] if target.view.spatial else [0, -1, 1]
    inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
    out = names(f"{target.key}/grouped")
    return helper.make_node("Reshape", [x, shape_name], [out], name=names(out)), out


def partial_moments_nodes(
    target: BnTarget,
    x_dtype: int,
    opset: int,
    names: NameGenerator,
    inits: list[onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """Nodes computing, per sample n and channel c, the mean m[n, c] and the mean squared
    deviation v[n, c] over that sample's spatial positions (two passes).

    Only these (N, C, 1) arrays leave the session; `decode_partial` merges them in float64
    with Chan's formula. No sum ever spans more than one sample's positions in the activation
    dtype, and centring before squaring means no cancellation: the error stays at the
    rounding level of the activations themselves. (Mul + ReduceMean rather than
    ReduceSumSquare: ONNX Runtime's ReduceMean accumulates blockwise, its ReduceSumSquare
    sequentially. On 64 x 256 x 3136 activations both take 0.075 s, and the variance is within
    4e-7 of float64 against 3e-6 for ReduceSumSquare, 7e-7 against 7e-6 at 12544 positions.)
    """
    k = target.key
    reshape, x3 = _grouped(target, target.x, names, inits)
    nodes = [reshape]
    work = x3
    if x_dtype not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        work = names(f"{k}/grouped_f32")
        nodes.append(
            helper.make_node("Cast", [x3], [work], name=names(work), to=onnx.TensorProto.FLOAT)
        )
    out = {
        s: names(f"{k}/{s}") for s in ("sample_mean", "centred", "squared", "sample_var", "shape")
    }
    nodes += [
        reduce_node("ReduceMean", work, out["sample_mean"], [2], 1, opset, names, inits),
        helper.make_node(
            "Sub", [work, out["sample_mean"]], [out["centred"]], name=names(out["centred"])
        ),
        helper.make_node(
            "Mul", [out["centred"], out["centred"]], [out["squared"]], name=names(out["squared"])
        ),
        reduce_node("ReduceMean", out["squared"], out["sample_var"], [2], 1, opset, names, inits),
        helper.make_node("Shape", [x3], [out["shape"]], name=names(out["shape"])),
    ]
    out["grouped"] = x3
    return nodes, out


def decode_partial(sample_mean: np.ndarray, sample_var: np.ndarray, dims: np.ndarray) -> Moments:
    """Chan's merge of N equal-sized groups (one per sample), in float64."""
    n, positions = int(dims[0]), int(dims[2])
    means = sample_mean.reshape(n, -1).astype(np.float64)
    within = sample_var.reshape(n, -1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: reported by caller
        mean = np.add.reduce(means, axis=0) / n
        spread = means - mean
        m2 = positions * (np.add.reduce(within, axis=0) + np.add.reduce(spread * spread, axis=0))
    return Moments(n * positions, mean, m2)


def measure_probe(target: BnTarget, x_dtype: int, opset: int, names: NameGenerator) -> Probe:
    """The statistics of a BN's input, measured inside the session."""
    if opset < 7:  # no numpy-style broadcasting in the helper ops: read the tensor back

        def decode_raw(arrays: list[np.ndarray]) -> Moments:
            x = arrays[0]
            flat = (
                x.reshape(x.shape[0], x.shape[1], -1)
                if target.view.spatial
                else x.reshape(x.shape[0], -1, 1)
            )
            return Moments.of(flat, axis=1)

        return Probe(target, [], [], [target.x], decode_raw)
    inits: list[onnx.TensorProto] = []
    nodes, out = partial_moments_nodes(target, x_dtype, opset, names, inits)
    outputs = [out["sample_mean"], out["sample_var"], out["shape"]]
    return Probe(target, nodes, inits, outputs, lambda arrays: decode_partial(*arrays))


def batch_norm_rewrite(target: BnTarget, x_dtype: int, opset: int, names: NameGenerator) -> Probe:
    """Nodes replacing one BN: normalise with the batch's mean and biased variance (pooled in
    float64 from the per-sample moments), and expose those moments for the pooled statistics.

    A spatial BN keeps its own node, fed the batch statistics as its mean and var inputs, so
    the normalisation costs what the original BN costs and runs on any EP.
    """
    inits: list[onnx.TensorProto] = []
    k = target.key
    nodes, out = partial_moments_nodes(target, x_dtype, opset, names, inits)
    work = onnx.TensorProto.DOUBLE if x_dtype == onnx.TensorProto.DOUBLE else onnx.TensorProto.FLOAT

    def const(label: str, value: Any, dtype: Any) -> str:
        name = names(f"{k}/{label}")
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, ins: list[str], **attrs: Any) -> str:
        result = names(f"{k}/{op.lower()}")
        nodes.append(helper.make_node(op, ins, [result], name=result, **attrs))
        return result

    def reduce(op: str, x: str, axes: list[int], keepdims: int) -> str:
        result = names(f"{k}/{op.lower()}")
        nodes.append(reduce_node(op, x, result, axes, keepdims, opset, names, inits))
        return result

    # the batch's pooled mean and biased variance, from the per-sample moments (small tensors,
    # in the dtype the moments were computed in: float32, or float64 for a float64 model)
    sample_mean, sample_var = out["sample_mean"], out["sample_var"]  # (N, C, 1)
    mean_keep = reduce("ReduceMean", sample_mean, [0, 2], 1)  # (1, C, 1)
    spread = node("Sub", [sample_mean, mean_keep])
    # pooled biased variance: mean within-sample variance + variance of the sample means
    var_keep = node(
        "Add",
        [
            reduce("ReduceMean", sample_var, [0, 2], 1),
            reduce("ReduceMean", node("Mul", [spread, spread]), [0, 2], 1),
        ],
    )

    def as_type(name: str, dtype: int) -> str:
        return name if dtype == work else node("Cast", [name], to=dtype)

    if target.view.spatial:
        # the BN itself normalises, fed the batch statistics: one pass, like the original
        flat = const("flat", [-1], np.int64)
        bn = onnx.NodeProto()
        bn.CopyFrom(target.node)
        bn.input[3] = as_type(node("Reshape", [mean_keep, flat]), target.dtypes[2])
        bn.input[4] = as_type(node("Reshape", [var_keep, flat]), target.dtypes[3])
        nodes.append(bn)
    else:  # per-activation statistics (opset < 9, spatial=0): normalise with plain ops
        shape1 = (1, -1, 1)
        np_work = helper.tensor_dtype_to_np_dtype(work)
        gamma = const("gamma", target.params.scale.reshape(shape1), np_work)
        beta = const("beta", target.params.bias.reshape(shape1), np_work)
        eps = const("eps", target.view.epsilon, np_work)
        std = node("Sqrt", [node("Add", [var_keep, eps])])
        scale = node("Div", [gamma, std])
        shift = node("Sub", [beta, node("Mul", [mean_keep, scale])])
        y3 = node(
            "Add",
            [
                node("Mul", [out["grouped"], as_type(scale, x_dtype)]),
                as_type(shift, x_dtype),
            ],
        )
        nodes.append(
            helper.make_node(
                "Reshape",
                [y3, node("Shape", [target.x])],
                [target.node.output[0]],
                name=names(f"{k}/batch_norm"),
            )
        )

    outputs = [out["sample_mean"], out["sample_var"], out["shape"]]
    return Probe(target, nodes, inits, outputs, lambda arrays: decode_partial(*arrays))


def training_mode_rewrite(
    target: BnTarget, x_dtype: int, opset: int, names: NameGenerator
) -> Probe | None:
    """The BN itself in training mode with momentum 0: one node normalises with the batch's
    mean and biased variance and returns them, in three passes over its input where the
    centred rewrite needs six. It reduces the whole batch in float32: 1e-7 relative against
    float64 for ordinary channels, where the centred form reaches 1e-8 (docs/reestimate.md,
    "Accuracy").

    None where that form does not apply: opset < 9, a spatial=0 BN, or dtypes other than one
    of float32/float64 throughout (fp16 activations keep the centred float32 rewrite).
    """
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    if opset < 9 or not target.view.spatial or x_dtype not in float_types:
        return None
    if any(dtype != x_dtype for dtype in target.dtypes):
        return None
    k = target.key
    np_dtype = helper.tensor_dtype_to_np_dtype(x_dtype)
    # fresh running inputs: momentum 0 multiplies them by zero, and 0 * inf would be NaN
    zeros, ones = names(f"{k}/running_mean_in"), names(f"{k}/running_var_in")
    inits = [
        numpy_helper.from_array(np.zeros(target.channels, np_dtype), zeros),
        numpy_helper.from_array(np.ones(target.channels, np_dtype), ones),
    ]
    mean, var, shape = names(f"{k}/batch_mean"), names(f"{k}/batch_var"), names(f"{k}/shape")
    outputs = [target.node.output[0], mean, var]
    attrs: dict[str, Any] = {"epsilon": target.view.epsilon, "momentum": 0.0}
    if opset >= 14:
        attrs["training_mode"] = 1
    else:  # opsets 9-13 train when the optional outputs are present, and ORT wants all four
        outputs += [names(f"{k}/saved_mean"), names(f"{k}/saved_inv_std")]
    inputs = [target.x, target.node.input[1], target.node.input[2], zeros, ones]
    nodes = [
        helper.make_node(
            "BatchNormalization", inputs, outputs, name=names(f"{k}/batch_norm"), **attrs
        ),
        helper.make_node("Shape", [target.x], [shape], name=names(shape)),
    ]

    def decode(arrays: list[np.ndarray]) -> Moments:
        batch_mean, batch_var, dims = arrays
        count = int(dims[0]) * int(np.prod(dims[2:]))
        return Moments(count, batch_mean, batch_var.astype(np.float64) * count)

    return Probe(target, nodes, inits, [mean, var, shape], decode)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element types of the main graph's tensors, from shape inference where it works."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a convenience here, never a requirement
        inferred = model
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def nonfinite_message(
    target: BnTarget, batch: int, probes: Sequence[Probe], arrays: dict[str, Any]
) -> str:
    """The message for NaN or Inf in a batch: it names the first BN input, in graph order,
    whose moments are not finite."""
    for p in probes:
        moments = p.decode([arrays[o] for o in p.outputs])
        if not moments.is_finite():
            target = p.target
            break
    return (
        f"NaN or Inf in the activations: first seen in the input '{target.x}' of "
        f"BatchNormalization '{target.key}' (batch {batch}); check DATA and the layers "
        "before it"
    )
