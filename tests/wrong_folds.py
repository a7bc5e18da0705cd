"""Wrong folds: small, deliberate corruptions that a verification judge must catch.

Each mutator returns a new model and never touches its argument. Three corrupt the BN statistics
before folding (the fold of the mutated model, compared with the ORIGINAL, then looks like a fold
that used the wrong epsilon, gamma or mean); the fourth corrupts an already folded model the way
a fold done in the wrong precision would. WRONG_FOLDS maps each kind to a function taking the
original model and returning the wrong fold, ready to be judged against the original.

The BN chosen for a single-BN corruption is the middle one of the main graph in node order
(`middle_bn`), and the channel is its most active one on a seeded batch (`chosen_channel`), so
every run corrupts the same place, and a place that reaches the output.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from deep_builder import batch_feeds
from models import run_ort, run_reference
from onnx import TensorProto, numpy_helper

from bnsurgery.passes.fold import FoldPass

WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
DEFAULT_EPSILON = 1e-5  # BatchNormalization's default when the attribute is absent
SCALE, MEAN, VAR = 1, 3, 4  # BN input positions


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def batch_norms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def middle_bn(model: onnx.ModelProto) -> str:
    """The name of the BN a single-BN corruption changes: the middle one in node order."""
    bns = batch_norms(model)
    if not bns:
        raise ValueError(f"{model.graph.name}: no BatchNormalization in the main graph")
    return bns[len(bns) // 2].name


def chosen_channel(model: onnx.ModelProto, bn: str) -> int:
    """The channel a single-channel corruption changes: the one whose BN output is most active
    (largest mean positive part) on a seeded random batch. A channel that a following Relu keeps
    at zero would make the corruption invisible, which is no wrong fold at all."""
    probe = _copy(model)
    node = next(n for n in probe.graph.node if n.name == bn)
    outputs = [o.name for o in probe.graph.output]
    if node.output[0] not in outputs:
        elem_type = probe.graph.input[0].type.tensor_type.elem_type  # BN's Y has X's type
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(node.output[0], elem_type, None)
        )
        outputs.append(node.output[0])
    feeds = batch_feeds(probe, batch=4, seed=7)
    try:
        values = run_ort(probe, feeds)
    except Exception:  # an engine ORT lacks (models.run_pair does the same)
        values = run_reference(probe, feeds)
    y = np.asarray(values[outputs.index(node.output[0])], dtype=np.float64)
    axes = tuple(i for i in range(y.ndim) if i != 1)
    return int(np.argmax(np.maximum(y, 0.0).mean(axis=axes)))


def epsilon(node: onnx.NodeProto) -> float:
    for attr in node.attribute:
        if attr.name == "epsilon":
            return attr.f
    return DEFAULT_EPSILON


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return tensor
    raise ValueError(f"{name!r} is not an initializer; these mutators edit initializers only")


def bn_param(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> np.ndarray:
    return numpy_helper.to_array(_initializer(model, node.input[index]))


def _set_bn_param(
    model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray
) -> None:
    """Give `node` a new value for one parameter, in that parameter's dtype. A parameter shared
    with another node gets a new initializer, so that only this BN changes."""
    name = node.input[index]
    target = _initializer(model, name)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(target.data_type)
    if sum(list(n.input).count(name) for n in model.graph.node) > 1:
        taken = {t.name for t in model.graph.initializer}
        name = next(
            f"{name}.wrong{i}" for i in range(len(taken) + 1) if f"{name}.wrong{i}" not in taken
        )
        node.input[index] = name
        target = model.graph.initializer.add()
    target.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), name))


def scale_epsilons(model: onnx.ModelProto, factor: float = 100.0) -> onnx.ModelProto:
    """Every BN's epsilon times `factor` (an absent epsilon is the default 1e-5)."""
    out = _copy(model)
    for node in batch_norms(out):
        new = epsilon(node) * factor
        for attr in node.attribute:
            if attr.name == "epsilon":
                attr.f = new
                break
        else:
            node.attribute.append(onnx.helper.make_attribute("epsilon", new))
    return out


def nudge_gamma(model: onnx.ModelProto, factor: float = 1.01) -> onnx.ModelProto:
    """One channel's scale (gamma) times `factor` in the middle BN."""
    out = _copy(model)
    node = next(n for n in batch_norms(out) if n.name == middle_bn(out))
    gamma = bn_param(out, node, SCALE).astype(np.float64)
    gamma[chosen_channel(model, node.name)] *= factor
    _set_bn_param(out, node, SCALE, gamma)
    return out


def shift_mean(model: onnx.ModelProto, stds: float = 0.5) -> onnx.ModelProto:
    """One channel's running mean moved by `stds` standard deviations (sqrt(var + eps)) in the
    middle BN."""
    out = _copy(model)
    node = next(n for n in batch_norms(out) if n.name == middle_bn(out))
    mean = bn_param(out, node, MEAN).astype(np.float64)
    var = bn_param(out, node, VAR).astype(np.float64)
    c = chosen_channel(model, node.name)
    mean[c] += stds * np.sqrt(var[c] + epsilon(node))
    _set_bn_param(out, node, MEAN, mean)
    return out


def weight_initializers(model: onnx.ModelProto) -> set[str]:
    """Float32 initializers that are a Conv/ConvTranspose/Gemm/MatMul weight (not a bias)."""
    float32 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS:
            positions = (1,) if node.op_type.startswith("Conv") else (0, 1)
            names.update(node.input[i] for i in positions if node.input[i] in float32)
    return names


def round_weights_through_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float32 linear-op weight rounded through float16 and back: apply it to a correct
    fold, and it is a fold computed in the wrong precision."""
    out = _copy(model)
    names = weight_initializers(out)
    for tensor in out.graph.initializer:
        if tensor.name in names:
            rounded = numpy_helper.to_array(tensor).astype(np.float16).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(rounded, tensor.name))
    return out


def correct_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    return FoldPass()(model).model


WRONG_FOLDS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "epsilon_x100": lambda m: correct_fold(scale_epsilons(m)),
    "gamma_x1.01": lambda m: correct_fold(nudge_gamma(m)),
    "mean_half_std": lambda m: correct_fold(shift_mean(m)),
    "weights_through_fp16": lambda m: round_weights_through_fp16(correct_fold(m)),
}
