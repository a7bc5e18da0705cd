"""Build the sample models and data sets that bnsurgery's tests and docs use.

This script is a BUILD-TIME tool: it needs torch, scikit-learn and onnxscript, which the
bnsurgery package itself never imports. Tests only read the committed artifacts it writes:

- ``digits_cnn.onnx``       small CNN trained on scikit-learn's digits, with 4 BatchNormalization
                            nodes (3 after Conv, 1 after Gemm), legacy exporter, BN kept.
- ``digits_cnn_nobn.onnx``  the same trained weights as PyTorch's default (dynamo) exporter writes
                            them: BatchNorm folded away, zero BatchNormalization nodes.
- ``digits_mlp.onnx``       MLP (Gemm + BatchNorm1d) trained on the digits flattened to 64 features.
- ``resnet_small.onnx``     ResNet-18-style net (reduced widths) with seeded random weights and
                            random but plausible BN statistics, so folding is not trivial.
- ``digits_train.npz`` / ``digits_test.npz``  the stratified split, keys ``input`` and ``label``.

Rebuild with::

    pip install torch==2.13.0 scikit-learn onnxscript && python sample_models/build.py
"""

from __future__ import annotations

import argparse
import logging
import random
import time
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

SEED = 0
OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's native opset; down-converting its graph to 17 fails
ATOL = 1e-4
ModelT = TypeVar("ModelT", bound=nn.Module)
DYNAMIC_AXES = {"input": {0: "batch"}, "logits": {0: "batch"}}


@dataclass
class Split:
    """A train/test split of the digits data, images shaped (N, 1, 8, 8) float32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass
class Summary:
    """One line of the final summary."""

    name: str
    opset: int
    bn_nodes: int
    size_bytes: int
    max_abs_err: float
    accuracy: float | None


def quiet_exporters() -> None:
    """Silence the exporters' expected chatter (legacy deprecation, no torchvision ops)."""
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def seed_everything(seed: int = SEED) -> None:
    """Seed every RNG in play and make torch deterministic and single-threaded."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_split() -> Split:
    """Load scikit-learn's digits, scale to [0, 1] and split 70/30 stratified."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=SEED)
    return Split(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, MaxPool, Conv-BN-ReLU, GAP, Linear-BN1d-ReLU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=True)  # a bias, on purpose
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 32)
        self.bn4 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.gap(x), 1)
        x = F.relu(self.bn4(self.fc1(x)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    """Linear-BN1d-ReLU, Linear-BN1d-ReLU, Linear on 64 flattened pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, identity or 1x1 Conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetSmall(nn.Module):
    """ResNet-18 layout ([2, 2, 2, 2] basic blocks) with widths 16-32-64-128."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # torchvision's ResNet init keeps activations O(1)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def randomize_bn(model: nn.Module, seed: int = SEED) -> None:
    """Give every BN random but plausible statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            c = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def train(model: ModelT, x: np.ndarray, y: np.ndarray, epochs: int, batch: int = 64) -> ModelT:
    """Train with Adam and cross-entropy; leaves the model in eval mode."""
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt) - batch + 1, batch):  # drop last: no BN on tiny batches
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    return model


def torch_predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of an eval-mode torch model."""
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def export_legacy(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """TorchScript (legacy) export that keeps BatchNormalization nodes."""
    torch.onnx.export(
        model.eval(),
        (torch.from_numpy(example),),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=DYNAMIC_AXES,
        opset_version=OPSET,
    )


def export_dynamo(model: nn.Module, example: np.ndarray, path: Path) -> onnx.ModelProto:
    """PyTorch's default (dynamo) export, weights embedded in the single .onnx file."""
    program = torch.onnx.export(
        model.eval(),
        (torch.from_numpy(example),),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=DYNAMO_OPSET,
        optimize=True,
        verbose=False,
    )
    assert program is not None
    program.save(str(path), external_data=False)
    proto = strip_stack_traces(onnx.load(str(path)))
    onnx.save(proto, str(path))
    return proto


def strip_stack_traces(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the dynamo exporter's per-node stack traces: build paths and line numbers."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return model


def fuse_bn(model: DigitsCNN) -> nn.Module:
    """Fold every BN of a trained DigitsCNN into its Conv/Linear (a copy), BNs -> Identity."""
    fused = deepcopy(model).eval()
    pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("fc1", "bn4"))
    for layer_name, bn_name in pairs:
        layer, bn = getattr(fused, layer_name), getattr(fused, bn_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        setattr(fused, layer_name, fuse(layer, bn))
        setattr(fused, bn_name, nn.Identity())
    return fused


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """All BatchNormalization nodes of the main graph."""
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def check_inference_bns(model: onnx.ModelProto) -> int:
    """Assert every BN is inference-mode with a single output; return the BN count."""
    nodes = bn_nodes(model)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("training_mode", 0) == 0, f"{node.name}: training_mode set"
        assert len([o for o in node.output if o]) == 1, f"{node.name}: extra outputs"
    return len(nodes)


def check_io(model: onnx.ModelProto, rank: int) -> None:
    """One input 'input' and one output 'logits', both with a symbolic batch dim."""
    ins = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert [i.name for i in ins] == ["input"], [i.name for i in ins]
    assert [o.name for o in model.graph.output] == ["logits"]
    for vi in (ins[0], model.graph.output[0]):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value, f"{vi.name}: batch not dynamic"
    assert len(ins[0].type.tensor_type.shape.dim) == rank


def ort_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime on CPU with every graph optimization off."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def verify(
    name: str,
    path: Path,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray | None,
    expect_bn: tuple[int, int],
) -> Summary:
    """Checker, BN count, I/O, and ORT-vs-torch agreement; accuracy when labels given."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    n_bn = check_inference_bns(proto)
    assert expect_bn[0] <= n_bn <= expect_bn[1], f"{name}: {n_bn} BN nodes, want {expect_bn}"
    check_io(proto, x.ndim)
    got = ort_predict(path, x)
    err = float(np.max(np.abs(got - torch_predict(model, x))))
    assert err < ATOL, f"{name}: ORT vs torch max abs err {err:.3g}"
    acc = None if y is None else float(np.mean(got.argmax(1) == y))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return Summary(name, opset, n_bn, path.stat().st_size, err, acc)


def build_digits_cnn(split: Split, out: Path) -> tuple[Summary, Summary]:
    """Train the CNN, export it with BN kept and with BN folded by the dynamo exporter."""
    torch.manual_seed(SEED)
    model = train(DigitsCNN(), split.x_train, split.y_train, epochs=12)
    path = out / "digits_cnn.onnx"
    export_legacy(model, split.x_test[:2], path)
    kept = verify("digits_cnn.onnx", path, model, split.x_test, split.y_test, (4, 10**6))
    assert kept.accuracy is not None and kept.accuracy >= 0.95, kept.accuracy

    nobn = out / "digits_cnn_nobn.onnx"
    proto = export_dynamo(model, split.x_test[:2], nobn)
    if bn_nodes(proto):  # the exporter kept BN: fold in torch first, as a user would
        print(f"note: dynamo export kept {len(bn_nodes(proto))} BN nodes; fusing in torch")
        export_dynamo(fuse_bn(model), split.x_test[:2], nobn)
    folded = verify("digits_cnn_nobn.onnx", nobn, model, split.x_test, split.y_test, (0, 0))
    return kept, folded


def build_digits_mlp(split: Split, out: Path) -> Summary:
    """Train the BatchNorm1d MLP on flattened digits and export it with BN kept."""
    torch.manual_seed(SEED)
    flat_tr = split.x_train.reshape(len(split.x_train), 64)
    flat_te = split.x_test.reshape(len(split.x_test), 64)
    model = train(DigitsMLP(), flat_tr, split.y_train, epochs=30)
    path = out / "digits_mlp.onnx"
    export_legacy(model, flat_te[:2], path)
    summary = verify("digits_mlp.onnx", path, model, flat_te, split.y_test, (2, 2))
    assert summary.accuracy is not None and summary.accuracy >= 0.9, summary.accuracy
    return summary


def build_resnet(out: Path) -> Summary:
    """Seeded random ResNet-style model with random BN statistics."""
    torch.manual_seed(SEED)
    model = ResNetSmall()
    randomize_bn(model)
    x = np.random.default_rng(SEED).standard_normal((4, 3, 64, 64)).astype(np.float32)
    path = out / "resnet_small.onnx"
    export_legacy(model, x[:1], path)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return verify("resnet_small.onnx", path, model, x, None, (n_bn, n_bn))


def save_data(split: Split, out: Path) -> None:
    """Write the train and test splits as .npz with keys 'input' and 'label'."""
    np.savez_compressed(out / "digits_train.npz", input=split.x_train, label=split.y_train)
    np.savez_compressed(out / "digits_test.npz", input=split.x_test, label=split.y_test)


def print_summary(rows: list[Summary], split: Split, seconds: float) -> None:
    """Short human-readable summary on stdout."""
    print(f"digits: {len(split.x_train)} train / {len(split.x_test)} test, opset {OPSET}")
    for r in rows:
        acc = "" if r.accuracy is None else f"  test acc {r.accuracy:.4f}"
        print(
            f"{r.name:22s} opset {r.opset}  BN={r.bn_nodes:2d}  {r.size_bytes / 1024:8.1f} KiB"
            f"  ORT-vs-torch max abs err {r.max_abs_err:.2e}{acc}"
        )
    print(f"done in {seconds:.1f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: --out DIR (default: this script's folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build every artifact into --out and verify each one."""
    out: Path = parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quiet_exporters()
    seed_everything()
    split = load_split()
    save_data(split, out)
    rows = [*build_digits_cnn(split, out), build_digits_mlp(split, out), build_resnet(out)]
    print_summary(rows, split, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
