"""The deep corpus is what it claims to be, its correct folds agree with it, and each wrong-fold
mutator changes exactly what it says.

Every CORPUS model is a valid exported network (checker, IR 8, a dynamic batch, torch names) that
ONNX Runtime runs; default statistics make the residual networks' outputs reach hundreds while
trained ones keep activations O(1); bnsurgery's fold folds each model's foldable BNs and its output
stays within 1e-4 of max|output| (float32) of the original's, on ORT at ORT_DISABLE_ALL.
"""

from __future__ import annotations

import functools

import deep_models as dm
import models as m
import numpy as np
import onnx
import pytest
import wrong_folds as wf
from deep_builder import batch_feeds, torch_scope
from onnx import helper, numpy_helper

from bnsurgery.passes import PassResult
from bnsurgery.passes.fold import FoldPass

NAMES = list(dm.CORPUS)
BN_COUNT = {
    "resnet50": 53, "resnet18": 20, "mobilenetv2": 52, "efficientnet_b0": 49, "regnetx": 71,
    "densenet": 121, "inception_like": 57, "shufflenet_like": 56, "detection_head": 6,
    "fp16_deep": 10, "bn15_mixed": 6, "mlp_bn": 6,
}  # fmt: skip
# DenseNet's pre-activation BNs follow a Concat and precede a Relu: only conv0's and each dense
# layer's second BN can fold. Every other model folds all its BNs.
FOLDABLE = {"densenet": 1 + (6 + 12 + 24 + 16)}
GROWING = ["resnet50", "regnetx", "detection_head"]  # residual growth (or pixels) past 50
# A correct fold's bound, relative to max|output|: 1e-4 in float32; ten epsilons in float16, where
# a correct fold rounds every folded weight once to float16 and that alone moves these outputs by
# up to 3.4e-3 (3.5 epsilons) of their maximum.
BOUND = {m.F32: 1e-4, m.F16: 10 * float(np.finfo(np.float16).eps)}


def base(name: str) -> str:
    """The builder's name: resnet18_fp16_trained -> resnet18."""
    return name.removesuffix("_trained").removesuffix("_fp16")


@functools.cache
def built(name: str) -> onnx.ModelProto:
    return dm.CORPUS[name]()


@functools.cache
def feeds(name: str) -> dict[str, np.ndarray]:
    return batch_feeds(built(name), batch=2, seed=1)


@functools.cache
def outputs(name: str) -> np.ndarray:
    return m.run_ort(built(name), feeds(name))[0]


@functools.cache
def folded(name: str) -> PassResult:
    return FoldPass()(built(name))


def deviation(name: str, candidate: onnx.ModelProto) -> float:
    """max|candidate - original| / max|original| on the name's feeds, in float64."""
    original = outputs(name).astype(np.float64)
    got = m.run_ort(candidate, feeds(name))[0].astype(np.float64)
    return float(np.abs(got - original).max() / np.abs(original).max())


def bn_io(model: onnx.ModelProto, batch: int = 8) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """Each BN with the value of its input X on a seeded batch."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    dtype = m.output_dtype(model)
    bns = wf.batch_norms(probe)
    for node in bns:
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], dtype, None))
    values = m.run_ort(probe, batch_feeds(probe, batch=batch, seed=3))[1:]
    return [(n, np.asarray(v, dtype=np.float64)) for n, v in zip(bns, values, strict=True)]


def channel_std(x: np.ndarray) -> np.ndarray:
    return x.std(axis=tuple(i for i in range(x.ndim) if i != 1))


# -- the models are valid exported networks -------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_model_is_a_valid_exported_network(name: str) -> None:
    model = built(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert model.opset_import[0].version == (15 if name.startswith("bn15") else 13)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and dims[0].dim_param == "N"
    assert all(d.dim_value > 0 for d in dims[1:])
    assert [o.name for o in model.graph.output] == ["output"]
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(n.startswith("/") for n in names)
    assert m.count_op(model) == BN_COUNT[base(name)]


@pytest.mark.parametrize("name", NAMES)
def test_every_model_runs_on_ort_with_finite_outputs_of_its_declared_shape(name: str) -> None:
    out = outputs(name)
    dims = built(name).graph.output[0].type.tensor_type.shape.dim
    assert out.shape == (2, *(d.dim_value for d in dims[1:]))
    assert np.isfinite(out).all()


def test_names_follow_the_torch_exporter() -> None:
    assert torch_scope("layer1.0.conv1") == "/layer1/layer1.0/conv1"
    assert torch_scope("features.1.conv.0.0") == "/features/features.1/conv/conv.0/conv.0.0"
    resnet = built("resnet50")
    conv = m.node_named(resnet, "/layer1/layer1.0/conv1/Conv")
    assert list(conv.input) == ["/maxpool/MaxPool_output_0", "layer1.0.conv1.weight"]
    bn = m.node_named(resnet, "/layer4/layer4.0/downsample/downsample.1/BatchNormalization")
    assert list(bn.input[1:]) == [f"layer4.0.downsample.1.{p}" for p in
                                  ("weight", "bias", "running_mean", "running_var")]  # fmt: skip
    mobilenet = built("mobilenetv2")
    assert m.node_named(mobilenet, "/features/features.1/conv/conv.0/conv.0.0/Conv").attribute
    assert m.node_named(mobilenet, "/features/features.2/conv/conv.1/conv.1.2/Clip")


def test_resnet50_layout() -> None:
    model = built("resnet50")
    assert m.count_op(model, "Conv") == 53 and m.count_op(model, "Add") == 16
    downsample = [n.name for n in model.graph.node if "downsample.1" in n.name]
    assert [name.split("/")[2] for name in downsample] == [f"layer{i}.0" for i in range(1, 5)]
    stem = [n.op_type for n in model.graph.node[:4]]
    assert stem == ["Conv", "BatchNormalization", "Relu", "MaxPool"]
    assert [n.op_type for n in model.graph.node[-3:]] == ["GlobalAveragePool", "Flatten", "Gemm"]


@pytest.mark.parametrize(
    ("name", "op", "check"),
    [
        ("mobilenetv2", "Conv", lambda n, g: g > 1),  # depthwise
        ("efficientnet_b0", "Conv", lambda n, g: g > 1 and "block.1.0" in n.name),
        ("regnetx", "Conv", lambda n, g: g > 1 and "/f/b/" in n.name),
        ("shufflenet_like", "Split", lambda n, g: True),
        ("shufflenet_like", "Transpose", lambda n, g: True),
        ("inception_like", "Concat", lambda n, g: True),
        ("densenet", "AveragePool", lambda n, g: "transition" in n.name),
    ],
)
def test_layouts_have_their_signature_ops(name: str, op: str, check) -> None:
    def group(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    assert any(check(n, group(n)) for n in built(name).graph.node if n.op_type == op)


def test_efficientnet_has_squeeze_excitation_and_5x5_depthwise() -> None:
    model = built("efficientnet_b0")
    kernels = {
        tuple(a.ints) for n in model.graph.node for a in n.attribute
        if n.op_type == "Conv" and a.name == "kernel_shape" and "block.1.0" in n.name
    }  # fmt: skip
    assert kernels == {(3, 3), (5, 5)}
    nodes = list(model.graph.node)
    pools = [i for i, n in enumerate(nodes) if n.name.endswith("/avgpool/GlobalAveragePool")]
    assert len(pools) == 16  # one squeeze-excitation per MBConv
    se = [n.op_type for n in nodes[pools[0] : pools[0] + 7]]
    assert se == ["GlobalAveragePool", "Conv", "Sigmoid", "Mul", "Conv", "Sigmoid", "Mul"]


# -- the statistics -------------------------------------------------------------------------------
def test_default_statistics_are_an_untrained_exporters() -> None:
    model = built("resnet50")
    for node in wf.batch_norms(model):
        gamma, beta, mean, var = (m.initializer(model, node.input[i]) for i in range(1, 5))
        assert (gamma == 1).all() and (beta == 0).all() and (mean == 0).all() and (var == 1).all()


@pytest.mark.parametrize("name", GROWING)
def test_default_statistics_let_deep_outputs_reach_hundreds(name: str) -> None:
    assert np.abs(outputs(name)).max() > 50


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_trained") or n == "fp16_deep"])
def test_trained_statistics_match_the_activations_that_reach_each_bn(name: str) -> None:
    """Each BN's variance is the spread of its input (median over channels within 2x), so its
    output is O(1); the logits stay moderate (the detection head's boxes are pixels)."""
    for node, x in bn_io(built(name)):
        var = m.initializer(built(name), node.input[4]).astype(np.float64)
        ratio = float(np.median(channel_std(x) / np.sqrt(var)))
        assert 0.5 < ratio < 2.0, f"{node.name}: input spread {ratio:.2f}x sqrt(var)"
    if base(name) != "detection_head":
        assert np.abs(outputs(name)).max() < 50


@pytest.mark.parametrize("name", ["detection_head", "detection_head_trained"])
def test_detection_head_mixes_pixels_and_probabilities_in_one_output(name: str) -> None:
    out = outputs(name).astype(np.float64)
    boxes, probabilities = out[..., :4], out[..., 4:]
    assert out.shape == (2, 8 * 8 * 3, 4 + 6)
    assert np.abs(boxes).max() > 300
    assert probabilities.min() >= 0 and probabilities.max() <= 1


def test_fp16_deep_is_float16_throughout_with_tiny_variances() -> None:
    model = built("fp16_deep")
    float_types = {t.data_type for t in model.graph.initializer} - {onnx.TensorProto.INT64}
    assert float_types == {onnx.TensorProto.FLOAT16}
    assert m.output_dtype(model) == m.F16 == model.graph.input[0].type.tensor_type.elem_type
    for node in wf.batch_norms(model):
        var = m.initializer(model, node.input[4]).astype(np.float64)
        assert 5e-6 < var.min() and var.max() < 2e-3


def test_bn15_mixed_has_float16_x_and_float32_statistics() -> None:
    model = built("bn15_mixed")
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in wf.batch_norms(model):
        assert {types[p] for p in node.input[1:]} == {onnx.TensorProto.FLOAT}
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {types[w] for w in conv_weights} == {onnx.TensorProto.FLOAT16}


def test_mlp_bn_normalizes_a_2d_input() -> None:
    dims = built("mlp_bn").graph.input[0].type.tensor_type.shape.dim
    assert len(dims) == 2
    assert m.count_op(built("mlp_bn"), "Gemm") == 7


# -- a correct fold agrees ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_the_correct_fold_folds_every_foldable_bn_and_agrees(name: str) -> None:
    result = folded(name)
    expected = FOLDABLE.get(base(name), BN_COUNT[base(name)])
    assert len(result.report.folded) == expected
    assert m.count_op(result.model) == BN_COUNT[base(name)] - expected
    assert deviation(name, result.model) <= BOUND[m.output_dtype(built(name))]


# -- wrong-fold mutators --------------------------------------------------------------------------
def unchanged(mutate, model: onnx.ModelProto) -> onnx.ModelProto:
    """Apply `mutate`, asserting that it left its argument as it was."""
    before = model.SerializeToString()
    out = mutate(model)
    assert model.SerializeToString() == before
    return out


def changed_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{name: b's value} of every initializer whose value differs (or is new) in b."""
    old = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    return {
        t.name: numpy_helper.to_array(t) for t in b.graph.initializer
        if t.name not in old or not np.array_equal(old[t.name], numpy_helper.to_array(t))
    }  # fmt: skip


def test_middle_bn_is_the_middle_one_in_node_order() -> None:
    assert wf.middle_bn(built("resnet50")) == "/layer3/layer3.0/bn3/BatchNormalization"
    assert wf.middle_bn(built("mlp_bn")) == "/layers/layers.10/BatchNormalization"
    with pytest.raises(ValueError, match="no BatchNormalization"):
        wf.middle_bn(m.conv_affine())


@pytest.mark.parametrize("name", ["resnet50", "inception_like", "fp16_deep"])
def test_scale_epsilons_multiplies_every_bn_epsilon_and_nothing_else(name: str) -> None:
    model = built(name)
    out = unchanged(wf.scale_epsilons, model)
    assert not changed_initializers(model, out)
    for before, after in zip(wf.batch_norms(model), wf.batch_norms(out), strict=True):
        assert wf.epsilon(after) == pytest.approx(100 * wf.epsilon(before), rel=1e-6)
        others = [a for a in after.attribute if a.name != "epsilon"]
        assert others == [a for a in before.attribute if a.name != "epsilon"]


def one_channel_change(model, mutate, param: int):
    """(the middle BN, its parameter `param` before and after, the one channel that changed),
    asserting the mutation changed that parameter of that BN alone."""
    out = unchanged(mutate, model)
    node = m.node_named(model, wf.middle_bn(model))
    ((changed, value),) = changed_initializers(model, out).items()
    assert changed == node.input[param]
    old = m.initializer(model, changed).astype(np.float64)
    (channel,) = np.flatnonzero(value != old)
    return node, old, value, channel


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_trained", "fp16_deep", "mlp_bn"])
def test_nudge_gamma_scales_one_channel_of_the_middle_bn(name: str) -> None:
    model = built(name)
    node, old, value, diff = one_channel_change(model, wf.nudge_gamma, 1)
    assert diff == wf.chosen_channel(model, node.name)
    tolerance = float(np.finfo(value.dtype).eps)
    assert value[diff] / old[diff] == pytest.approx(1.01, abs=tolerance)


@pytest.mark.parametrize("name", ["resnet50_trained", "regnetx", "bn15_mixed_trained"])
def test_shift_mean_moves_one_channel_half_a_standard_deviation(name: str) -> None:
    model = built(name)
    node, old, value, c = one_channel_change(model, wf.shift_mean, 3)
    var = m.initializer(model, node.input[4]).astype(np.float64)
    step = np.sqrt(var[c] + wf.epsilon(node))
    assert (value[c] - old[c]) / step == pytest.approx(0.5, rel=1e-5)


def test_a_shared_parameter_is_copied_so_only_the_middle_bn_changes() -> None:
    model = m.shared_bn_params()
    node = m.node_named(model, wf.middle_bn(model))
    shared = node.input[1]
    out = unchanged(wf.nudge_gamma, model)
    moved = m.node_named(out, node.name)
    assert moved.input[1] != shared
    assert np.array_equal(m.initializer(out, shared), m.initializer(model, shared))
    assert not np.array_equal(m.initializer(out, moved.input[1]), m.initializer(model, shared))


def test_the_chosen_channel_of_a_bn_that_is_a_graph_output() -> None:
    model = m.conv_bn()  # its only BN writes the graph output
    assert 0 <= wf.chosen_channel(model, "bn") < 6
    out = unchanged(wf.nudge_gamma, model)
    assert list(changed_initializers(model, out)) == ["bn.scale"]


@pytest.mark.parametrize("name", ["resnet50", "detection_head", "mlp_bn"])
def test_round_weights_through_fp16_rounds_every_weight_and_no_bias(name: str) -> None:
    model = folded(name).model
    out = unchanged(wf.round_weights_through_fp16, model)
    weights = wf.weight_initializers(model)
    assert len(weights) == m.count_op(model, "Conv") + m.count_op(model, "Gemm")
    changed = changed_initializers(model, out)
    assert set(changed) == weights  # every weight is changed by rounding, no bias is
    for name_, value in changed.items():
        assert np.array_equal(
            value, m.initializer(model, name_).astype(np.float16).astype(np.float32)
        )


def test_round_weights_through_fp16_leaves_a_float16_model_alone() -> None:
    model = folded("fp16_deep").model
    assert not changed_initializers(model, wf.round_weights_through_fp16(model))


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "detection_head"])
@pytest.mark.parametrize("kind", list(wf.WRONG_FOLDS))
def test_each_wrong_fold_deviates_far_more_than_the_correct_fold(name: str, kind: str) -> None:
    correct = deviation(name, folded(name).model)
    wrong = deviation(name, unchanged(wf.WRONG_FOLDS[kind], built(name)))
    assert wrong > 100 * correct
