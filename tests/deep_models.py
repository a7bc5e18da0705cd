"""A corpus of deep models with the layouts of real networks, sized for CI, for judging folds.

ResNet-18/50, MobileNetV2, EfficientNet-B0, RegNetX-400MF, DenseNet-121, GoogLeNet, ShuffleNetV2,
a detection head whose one output mixes pixel coordinates with probabilities, an all-float16
ResNet-18, a float16 stack with tiny variances, a BN-15 stack with float16 X and float32
statistics, and a deep MLP: the real depth and graph layout of each (torchvision's module
structure and the TorchScript exporter's names), with small widths and 32x32 inputs so that each
folds and runs on ONNX Runtime CPU in a fraction of a second.

Weights are He-normal. `stats="default"` gives every BN the statistics of an untrained torch
module (gamma 1, beta 0, mean 0, var 1): with He-normal weights the residual networks' outputs
then grow to hundreds, which is what an exported untrained torchvision model looks like.
`stats="trained"` gives each BN gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2) and a mean/var measured on
the activations that reach it, so activations stay O(1).

The classifiers keep torchvision's 1000 classes: with outputs reaching hundreds, some logits sit
near zero, which is where an absolute tolerance refuses a correct fold.

CORPUS names every model variant that a correct fold must pass on.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
from deep_builder import DeepNet
from models import F16, F32


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to the divisor, never below 90 % of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _classifier(net: DeepNet, x: str, fc: str, classes: int) -> onnx.ModelProto:
    x = net.flatten(net.global_avg_pool(x, "avgpool" if fc == "fc" else ""))
    return net.finish(net.gemm(x, fc, classes))


# -- ResNet ---------------------------------------------------------------------------------------
def _resnet(
    name: str, blocks: list[int], bottleneck: bool, width: int, classes: int, size: int,
    stats: str, seed: int, dtype: int = F32,
) -> onnx.ModelProto:  # fmt: skip
    net = DeepNet(name, (3, size, size), stats=stats, seed=seed, dtype=dtype)
    x = net.relu(net.bn(net.conv("input", "conv1", width, 7, stride=2, pad=3), "bn1"), "relu")
    x = net.max_pool(x, "maxpool", 3, 2, 1)
    expansion = 4 if bottleneck else 1
    for li, n in enumerate(blocks, start=1):
        planes = width * 2 ** (li - 1)
        for bi in range(n):
            p = f"layer{li}.{bi}"
            stride = 2 if bi == 0 and li > 1 else 1
            cin = net.channels(x)
            if bottleneck:
                y = net.relu(net.bn(net.conv(x, f"{p}.conv1", planes, 1), f"{p}.bn1"), f"{p}.relu")
                y = net.bn(net.conv(y, f"{p}.conv2", planes, 3, stride=stride), f"{p}.bn2")
                y = net.relu(y, f"{p}.relu_1")
                y = net.bn(net.conv(y, f"{p}.conv3", planes * 4, 1), f"{p}.bn3")
            else:
                y = net.bn(net.conv(x, f"{p}.conv1", planes, 3, stride=stride), f"{p}.bn1")
                y = net.relu(y, f"{p}.relu")
                y = net.bn(net.conv(y, f"{p}.conv2", planes, 3), f"{p}.bn2")
            short = x
            if stride != 1 or cin != planes * expansion:
                short = net.conv(x, f"{p}.downsample.0", planes * expansion, 1, stride=stride)
                short = net.bn(short, f"{p}.downsample.1")
            x = net.relu(net.add(y, short, p), f"{p}.relu_{2 if bottleneck else 1}")
    return _classifier(net, x, "fc", classes)


def resnet50(
    *, width: int = 8, classes: int = 1000, size: int = 32, stats: str = "default", seed: int = 0
) -> onnx.ModelProto:
    """torchvision ResNet-50 (v1.5, stride on the 3x3): bottlenecks [3, 4, 6, 3], 53 BN."""
    return _resnet("resnet50", [3, 4, 6, 3], True, width, classes, size, stats, seed)


def resnet18(
    *, width: int = 8, classes: int = 1000, size: int = 32, stats: str = "default", seed: int = 1,
    dtype: int = F32,
) -> onnx.ModelProto:  # fmt: skip
    """torchvision ResNet-18: basic blocks [2, 2, 2, 2], 20 BN; float16 throughout with
    dtype=F16 (a model exported with .half())."""
    return _resnet("resnet18", [2, 2, 2, 2], False, width, classes, size, stats, seed, dtype)


# -- MobileNetV2 ----------------------------------------------------------------------------------
def mobilenetv2(
    *, width_mult: float = 0.25, classes: int = 1000, size: int = 32, stats: str = "default",
    seed: int = 2,
) -> onnx.ModelProto:  # fmt: skip
    """torchvision MobileNetV2: 17 inverted residuals (depthwise 3x3, ReLU6 as Clip, linear
    bottleneck), 52 BN."""
    net = DeepNet("mobilenetv2", (3, size, size), stats=stats, seed=seed)
    x = net.conv_bn_act("input", "features.0", _divisible(32 * width_mult), 3, "relu6", stride=2)
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    index = 1
    for t, c, n, s in settings:
        cout = _divisible(c * width_mult)
        for i in range(n):
            stride = s if i == 0 else 1
            cin = net.channels(x)
            hidden = cin * t
            p = f"features.{index}.conv"
            y, j = x, 0
            if t != 1:
                y, j = net.conv_bn_act(y, f"{p}.{j}", hidden, 1, "relu6"), j + 1
            y = net.conv_bn_act(y, f"{p}.{j}", hidden, 3, "relu6", stride=stride, group=hidden)
            y = net.bn(net.conv(y, f"{p}.{j + 1}", cout, 1), f"{p}.{j + 2}")
            if stride == 1 and cin == cout:
                y = net.add(x, y, f"features.{index}")
            x, index = y, index + 1
    x = net.conv_bn_act(x, f"features.{index}", _divisible(1280 * max(1.0, width_mult)), 1, "relu6")
    return _classifier(net, x, "classifier.1", classes)


# -- EfficientNet-B0 ------------------------------------------------------------------------------
def efficientnet_b0(
    *, width_mult: float = 0.25, classes: int = 1000, size: int = 32, stats: str = "default",
    seed: int = 3,
) -> onnx.ModelProto:  # fmt: skip
    """torchvision EfficientNet-B0: 16 MBConv (SiLU, squeeze-excitation, depthwise 3x3 and 5x5),
    49 BN."""
    # Its late stages are 1x1 and up to 288 channels wide: 64 calibration samples leave their
    # statistics drifting (the BN input spread reaches 6x sqrt(var)), 128 do not.
    net = DeepNet("efficientnet_b0", (3, size, size), stats=stats, seed=seed,
                  calibration_batch=128 if stats == "trained" else None)  # fmt: skip
    x = net.conv_bn_act("input", "features.0", _divisible(32 * width_mult), 3, "silu", stride=2)
    settings = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # fmt: skip
    for stage, (t, k, s, c, n) in enumerate(settings, start=1):
        cout = _divisible(c * width_mult)
        for i in range(n):
            stride = s if i == 0 else 1
            cin = net.channels(x)
            hidden = _divisible(cin * t)
            p = f"features.{stage}.{i}.block"
            y, j = x, 0
            if t != 1:
                y, j = net.conv_bn_act(y, f"{p}.{j}", hidden, 1, "silu"), j + 1
            y = net.conv_bn_act(y, f"{p}.{j}", hidden, k, "silu", stride=stride, group=hidden)
            se = f"{p}.{j + 1}"  # squeeze-excitation: scale each channel by a gate in (0, 1)
            g = net.global_avg_pool(y, f"{se}.avgpool")
            g = net.silu(
                net.conv(g, f"{se}.fc1", max(1, cin // 4), 1, bias=True), f"{se}.activation"
            )
            g = net.sigmoid(
                net.conv(g, f"{se}.fc2", hidden, 1, bias=True), f"{se}.scale_activation"
            )
            y = net.mul(g, y, se)
            y = net.bn(net.conv(y, f"{p}.{j + 2}.0", cout, 1), f"{p}.{j + 2}.1")
            if stride == 1 and cin == cout:
                y = net.add(y, x, f"features.{stage}.{i}")
            x = y
    x = net.conv_bn_act(x, "features.8", 4 * net.channels(x), 1, "silu")
    return _classifier(net, x, "classifier.1", classes)


# -- RegNetX-400MF --------------------------------------------------------------------------------
def regnetx(
    *, widths: tuple[int, ...] = (16, 32, 64, 128), depths: tuple[int, ...] = (1, 2, 7, 12),
    group_width: int = 8, classes: int = 1000, size: int = 32, stats: str = "default",
    seed: int = 4,
) -> onnx.ModelProto:  # fmt: skip
    """torchvision RegNetX-400MF layout: ResBottleneck blocks with group convs (bottleneck ratio
    1), depths [1, 2, 7, 12], 22 blocks, 71 BN."""
    net = DeepNet("regnetx", (3, size, size), stats=stats, seed=seed)
    x = net.conv_bn_act("input", "stem", 32 // 2, 3, stride=2)
    for si, (w, d) in enumerate(zip(widths, depths, strict=True), start=1):
        for bi in range(d):
            p = f"trunk_output.block{si}.block{si}-{bi}"
            stride = 2 if bi == 0 else 1
            short = x
            if stride != 1 or net.channels(x) != w:
                short = net.conv_bn_act(x, f"{p}.proj", w, 1, None, stride=stride)
            y = net.conv_bn_act(x, f"{p}.f.a", w, 1)
            y = net.conv_bn_act(y, f"{p}.f.b", w, 3, stride=stride, group=w // group_width)
            y = net.conv_bn_act(y, f"{p}.f.c", w, 1, None)
            x = net.relu(net.add(short, y, p), f"{p}.activation")
    return _classifier(net, x, "fc", classes)


# -- DenseNet-121 ---------------------------------------------------------------------------------
def densenet(
    *, blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 8, init_features: int = 16,
    classes: int = 1000, size: int = 32, stats: str = "default", seed: int = 5,
) -> onnx.ModelProto:  # fmt: skip
    """torchvision DenseNet-121 layout: pre-activation dense layers (BN, Relu, 1x1, BN, Relu, 3x3)
    joined by Concat, transitions (BN, Relu, 1x1, AveragePool), final BN + Relu; 121 BN, of which
    only the conv0 one and each layer's second can fold (the others follow a Concat)."""
    net = DeepNet("densenet", (3, size, size), stats=stats, seed=seed)
    f = "features"
    x = net.conv("input", f"{f}.conv0", init_features, 7, stride=2, pad=3)
    x = net.max_pool(net.relu(net.bn(x, f"{f}.norm0"), f"{f}.relu0"), f"{f}.pool0", 3, 2, 1)
    for bi, layers in enumerate(blocks, start=1):
        features = [x]
        for li in range(1, layers + 1):
            p = f"{f}.denseblock{bi}.denselayer{li}"
            y = features[0] if len(features) == 1 else net.concat(features, p)
            y = net.relu(net.bn(y, f"{p}.norm1"), f"{p}.relu1")
            y = net.relu(
                net.bn(net.conv(y, f"{p}.conv1", 4 * growth, 1), f"{p}.norm2"), f"{p}.relu2"
            )
            features.append(net.conv(y, f"{p}.conv2", growth, 3))
        x = net.concat(features, f"{f}.denseblock{bi}")
        if bi < len(blocks):
            t = f"{f}.transition{bi}"
            x = net.relu(net.bn(x, f"{t}.norm"), f"{t}.relu")
            x = net.conv(x, f"{t}.conv", net.channels(x) // 2, 1)
            x = net.avg_pool(x, f"{t}.pool", 2, 2)
    x = net.relu(net.bn(x, f"{f}.norm5"), "")
    return _classifier(net, x, "classifier", classes)


# -- GoogLeNet ------------------------------------------------------------------------------------
def inception_like(
    *, div: int = 8, classes: int = 1000, size: int = 32, stats: str = "default", seed: int = 6
) -> onnx.ModelProto:
    """torchvision GoogLeNet layout: BasicConv2d (conv, BN eps 1e-3, Relu), nine Inception
    blocks of four parallel branches joined by Concat, ceil-mode max pools; 57 BN."""
    net = DeepNet("inception_like", (3, size, size), stats=stats, seed=seed)

    def basic(x: str, module: str, cout: int, k: int, stride: int = 1) -> str:
        y = net.bn(net.conv(x, f"{module}.conv", max(4, cout // div), k, stride=stride),
                   f"{module}.bn", eps=1e-3)  # fmt: skip
        return net.relu(y, module)

    x = basic("input", "conv1", 64, 7, stride=2)
    x = net.max_pool(x, "maxpool1", 3, 2, ceil_mode=True)
    x = basic(basic(x, "conv2", 64, 1), "conv3", 192, 3)
    x = net.max_pool(x, "maxpool2", 3, 2, ceil_mode=True)
    blocks = {
        "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
        "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
        "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
        "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
        "inception5b": (384, 192, 384, 48, 128, 128),
    }  # fmt: skip
    for name, (c1, c3r, c3, c5r, c5, pool) in blocks.items():
        b1 = basic(x, f"{name}.branch1", c1, 1)
        b2 = basic(basic(x, f"{name}.branch2.0", c3r, 1), f"{name}.branch2.1", c3, 3)
        b3 = basic(basic(x, f"{name}.branch3.0", c5r, 1), f"{name}.branch3.1", c5, 3)
        b4 = net.max_pool(x, f"{name}.branch4.0", 3, 1, 1, ceil_mode=True)
        b4 = basic(b4, f"{name}.branch4.1", pool, 1)
        x = net.concat([b1, b2, b3, b4], name)
        if name in ("inception3b", "inception4e"):
            x = net.max_pool(x, f"maxpool{3 if name == 'inception3b' else 4}", 2, 2, ceil_mode=True)
    return _classifier(net, x, "fc", classes)


# -- ShuffleNetV2 ---------------------------------------------------------------------------------
def shufflenet_like(
    *, channels: tuple[int, ...] = (8, 16, 32, 64, 128), repeats: tuple[int, ...] = (4, 8, 4),
    classes: int = 1000, size: int = 32, stats: str = "default", seed: int = 7,
) -> onnx.ModelProto:  # fmt: skip
    """torchvision ShuffleNetV2 layout: channel split (Split), branches with depthwise convs,
    Concat and channel shuffle (Reshape, Transpose, Reshape), ReduceMean head; 56 BN."""
    net = DeepNet("shufflenet_like", (3, size, size), stats=stats, seed=seed)
    x = net.conv_bn_act("input", "conv1", channels[0], 3, stride=2)
    x = net.max_pool(x, "maxpool", 3, 2, 1)
    for si, (n, cout) in enumerate(zip(repeats, channels[1:4], strict=True), start=2):
        half = cout // 2
        for i in range(n):
            p = f"stage{si}.{i}"
            stride = 2 if i == 0 else 1
            if stride == 1:
                x1, x2 = net.split_half(x, p)
            else:
                x1 = net.bn(net.conv(x, f"{p}.branch1.0", net.channels(x), 3, stride=2,
                                     group=net.channels(x)), f"{p}.branch1.1")  # fmt: skip
                x1 = net.conv_bn_act(x1, f"{p}.branch1", half, 1, conv="2", bn="3", act_name="4")
                x2 = x
            y = net.conv_bn_act(x2, f"{p}.branch2", half, 1)
            y = net.bn(net.conv(y, f"{p}.branch2.3", half, 3, stride=stride, group=half),
                       f"{p}.branch2.4")  # fmt: skip
            y = net.conv_bn_act(y, f"{p}.branch2", half, 1, conv="5", bn="6", act_name="7")
            x = net.concat([x1, y], p)
            h = net.values[x].shape[2]
            x = net.reshape(x, p, [-1, 2, half, h, h])  # channel shuffle, 2 groups
            x = net.reshape(net.transpose(x, p, [0, 2, 1, 3, 4]), p, [-1, cout, h, h])
    x = net.conv_bn_act(x, "conv5", channels[4], 1)
    return net.finish(net.gemm(net.reduce_mean(x, "", [2, 3]), "fc", classes))


# -- detection head: one output mixing pixels and probabilities -----------------------------------
def detection_head(
    *, width: int = 16, classes: int = 6, anchors: tuple[int, ...] = (64, 128, 256),
    image: int = 640, size: int = 64, stats: str = "default", seed: int = 8,
) -> onnx.ModelProto:  # fmt: skip
    """A Conv-BN-Relu backbone (6 layers, stride 8) and a head whose ONE output [N, boxes, 4 + C]
    concatenates boxes in pixels of an `image`-sized original (anchor + delta * stride, values
    reaching hundreds) with class probabilities (Sigmoid, 0..1)."""
    # an 8x8 grid gives the statistics enough samples from 16 images
    net = DeepNet("detection_head", (3, size, size), stats=stats, seed=seed,
                  calibration_batch=16 if stats == "trained" else None)  # fmt: skip
    x = "input"
    for i, (c, s) in enumerate([(1, 2), (1, 1), (2, 2), (2, 1), (4, 2), (4, 1)]):
        x = net.conv_bn_act(x, f"backbone.{i}", width * c, 3, stride=s)
    grid = net.values[x].shape[2]
    a = len(anchors)
    stride = image / grid
    deltas = net.conv(x, "head.reg", a * 4, 1, bias=True)
    logits = net.conv(x, "head.cls", a * classes, 1, bias=True)

    def rows(t: str, k: int) -> str:  # [N, A*k, H, W] -> [N, H*W*A, k]
        return net.reshape(net.transpose(t, "", [0, 2, 3, 1]), "", [-1, grid * grid * a, k])

    cy, cx = np.meshgrid((np.arange(grid) + 0.5) * stride, (np.arange(grid) + 0.5) * stride,
                         indexing="ij")  # fmt: skip
    half = np.array(anchors, dtype=np.float64) / 2
    centers = np.stack([cx, cy], -1).reshape(-1, 1, 2)
    boxes = np.concatenate([centers - half[None, :, None], centers + half[None, :, None]], -1)
    anchor_boxes = net.constant("anchors", boxes.reshape(-1, 4))
    scale = net.constant("stride", np.array(stride))
    box = net.add(net.mul(rows(deltas, 4), scale, ""), anchor_boxes, "")
    return net.finish(net.concat([box, net.sigmoid(rows(logits, classes), "")], "", axis=-1))


# -- dtypes ---------------------------------------------------------------------------------------
def fp16_deep(
    *, layers: int = 10, width: int = 16, classes: int = 1000, size: int = 32, seed: int = 9
) -> onnx.ModelProto:
    """An all-float16 stack of `layers` Conv-BN-Relu whose BN variances are tiny (1e-5..1e-3):
    each conv is scaled so its output channels have exactly that spread, and the BN's
    mean/var are those of its input (trained statistics)."""
    net = DeepNet("fp16_deep", (3, size, size), stats="trained", seed=seed, dtype=F16)
    x = "input"
    for i in range(layers):
        spread = np.sqrt(10 ** net.r.uniform(-5, -3, width))
        y = net.conv(
            x, f"features.{i}.0", width, 3, stride=2 if i in (0, 3, 6) else 1, out_std=spread
        )
        x = net.relu(net.bn(y, f"features.{i}.1"), f"features.{i}.2")
    return _classifier(net, x, "classifier", classes)


def bn15_mixed(
    *, layers: int = 6, width: int = 16, classes: int = 1000, size: int = 32,
    stats: str = "default", seed: int = 10,
) -> onnx.ModelProto:  # fmt: skip
    """Opset 15 Conv-BN-Relu stack whose X and weights are float16 while the BN's
    scale/B/mean/var are float32 (BatchNormalization-15 allows T1 != T2)."""
    net = DeepNet("bn15_mixed", (3, size, size), stats=stats, seed=seed, dtype=F16,
                  param_dtype=F32, opset=15)  # fmt: skip
    x = "input"
    for i in range(layers):
        x = net.conv_bn_act(x, f"features.{i}", width, 3, stride=2 if i % 2 == 0 else 1)
    return _classifier(net, x, "classifier", classes)


def mlp_bn(
    *, features: int = 64, widths: tuple[int, ...] = (64, 64, 48, 48, 32, 32), classes: int = 10,
    stats: str = "default", seed: int = 11,
) -> onnx.ModelProto:  # fmt: skip
    """A deep MLP on a 2-D input [N, features]: (Gemm, BatchNorm1d, Relu) x 6, Gemm."""
    net = DeepNet("mlp_bn", (features,), stats=stats, seed=seed)
    x = "input"
    for i, w in enumerate(widths):
        x = net.relu(net.bn(net.gemm(x, f"layers.{3 * i}", w), f"layers.{3 * i + 1}"),
                     f"layers.{3 * i + 2}")  # fmt: skip
    return net.finish(net.gemm(x, f"layers.{3 * len(widths)}", classes))


CORPUS: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet50": resnet50,
    "resnet50_trained": partial(resnet50, stats="trained"),
    "resnet18": resnet18,
    "resnet18_fp16_trained": partial(resnet18, stats="trained", dtype=F16),
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_trained": partial(mobilenetv2, stats="trained"),
    "efficientnet_b0": efficientnet_b0,
    "efficientnet_b0_trained": partial(efficientnet_b0, stats="trained"),
    "regnetx": regnetx,
    "densenet": densenet,
    "inception_like": inception_like,
    "shufflenet_like": shufflenet_like,
    "detection_head": detection_head,
    "detection_head_trained": partial(detection_head, stats="trained"),
    "fp16_deep": fp16_deep,
    "bn15_mixed": bn15_mixed,
    "bn15_mixed_trained": partial(bn15_mixed, stats="trained"),
    "mlp_bn": mlp_bn,
    "mlp_bn_trained": partial(mlp_bn, stats="trained"),
}
