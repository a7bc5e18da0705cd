"""Shared helpers of the benchmarks: model builders, fresh-process timing, peak RSS, JSON.

Models are built with onnx.helper (random weights, random BN statistics), so no torch is needed:
legacy-style Conv (no bias) -> BatchNormalization -> Relu graphs with the real ResNet-50 and
MobileNetV2 topologies and channel counts, and a deep Conv-BN stack of any size whose weights go
to external data written chunk by chunk (a 3 GB model never sits in memory while it is built).
Generated models are cached under bench/.cache/ (ignored by git).

Every measurement runs in a fresh process: `measure(argv)` spawns it, waits with os.wait4 and
returns the wall time, that child's own peak RSS (ru_maxrss) and the JSON line it printed, if any.
The tasks those processes run are in bench/_workers.py (`worker_argv`), which imports nothing but
what each tool needs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
OPSET = 13
MiB = 1 << 20


# -- model builders ---------------------------------------------------------------------------
class _Builder:
    """Accumulates nodes and initializers of a legacy-style Conv -> BN -> act network."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)  # (ascontiguousarray would make a 0-d scalar 1-d)
        self.inits.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def conv(
        self, x: str, cin: int, cout: int, k: int, stride: int, name: str, group: int = 1
    ) -> str:
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        self.init(f"{name}.weight", w)
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}.weight"], [f"{name}_out"], name=name,
                kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group,
            )
        )  # fmt: skip
        return f"{name}_out"

    def bn(self, x: str, c: int, name: str, gamma: tuple[float, float] = (0.5, 1.5)) -> str:
        r = self.rng
        self.init(f"{name}.weight", r.uniform(*gamma, c).astype(np.float32))
        self.init(f"{name}.bias", r.normal(0.0, 0.1, c).astype(np.float32))
        self.init(f"{name}.running_mean", r.normal(0.0, 0.1, c).astype(np.float32))
        self.init(f"{name}.running_var", r.uniform(0.5, 2.0, c).astype(np.float32))
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, f"{name}.weight", f"{name}.bias", f"{name}.running_mean",
                 f"{name}.running_var"],
                [f"{name}_out"], name=name, epsilon=1e-5, momentum=0.9,
            )
        )  # fmt: skip
        return f"{name}_out"

    def act(self, x: str, kind: str = "Relu") -> str:
        self.count += 1
        out = f"{kind.lower()}_{self.count}"
        if kind == "Relu6":
            self.nodes.append(
                helper.make_node("Clip", [x, "relu6_min", "relu6_max"], [out], name=out)
            )
        else:
            self.nodes.append(helper.make_node(kind, [x], [out], name=out))
        return out

    def conv_bn(
        self, x, cin, cout, k, stride, name, *, act="Relu", group=1, bn_name=None, gamma=(0.5, 1.5)
    ):
        y = self.conv(x, cin, cout, k, stride, name, group)
        y = self.bn(y, cout, bn_name or f"{name}_bn", gamma)
        return self.act(y, act) if act else y

    def head(self, x: str, c: int, classes: int = 1000) -> str:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="avgpool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
        w = self.rng.standard_normal((classes, c), dtype=np.float32) / np.float32(np.sqrt(c))
        self.init("fc.weight", w)
        self.init("fc.bias", np.zeros(classes, np.float32))
        self.nodes.append(
            helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc",
                             transB=1)
        )  # fmt: skip
        return "logits"

    def model(self, name: str, output: str, classes: int = 1000) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
            self.inits,
        )  # fmt: skip
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnsurgery-bench"
        )
        model.ir_version = 7
        return model


def build_resnet50(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 v1.5 (torchvision layout: stride on the 3x3), 53 Conv + 53 BN, ~25.6M params."""
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2, "conv1", bn_name="bn1")
    b.nodes.append(
        helper.make_node("MaxPool", [x], ["maxpool_out"], name="maxpool", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1])
    )  # fmt: skip
    x, cin = "maxpool_out", 64
    for li, (blocks, width, stride) in enumerate(
        [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)], start=1
    ):
        for bi in range(blocks):
            s = stride if bi == 0 else 1
            p = f"layer{li}.{bi}"
            y = b.conv_bn(x, cin, width, 1, 1, f"{p}.conv1", bn_name=f"{p}.bn1")
            y = b.conv_bn(y, width, width, 3, s, f"{p}.conv2", bn_name=f"{p}.bn2")
            # residual branches end with a small gamma, so activations stay O(1) over 16 blocks
            y = b.conv_bn(y, width, width * 4, 1, 1, f"{p}.conv3", bn_name=f"{p}.bn3", act=None,
                          gamma=(0.1, 0.3))  # fmt: skip
            if bi == 0:
                short = b.conv_bn(x, cin, width * 4, 1, s, f"{p}.downsample.0",
                                  bn_name=f"{p}.downsample.1", act=None)  # fmt: skip
            else:
                short = x
            b.nodes.append(helper.make_node("Add", [y, short], [f"{p}_add"], name=f"{p}.add"))
            x, cin = b.act(f"{p}_add"), width * 4
    return b.model("resnet50", b.head(x, 2048))


def build_mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 1.0 (torchvision layout), 52 Conv + 52 BN, Relu6 as Clip, ~3.5M params."""
    b = _Builder(seed)
    b.init("relu6_min", np.array(0.0, np.float32))
    b.init("relu6_max", np.array(6.0, np.float32))
    x = b.conv_bn("input", 3, 32, 3, 2, "features.0.0", bn_name="features.0.1", act="Relu6")
    cin, index = 32, 1
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:  # fmt: skip
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            p = f"features.{index}.conv"
            y, j = x, 0
            if t != 1:
                y = b.conv_bn(y, cin, hidden, 1, 1, f"{p}.{j}.0", bn_name=f"{p}.{j}.1", act="Relu6")
                j += 1
            y = b.conv_bn(y, hidden, hidden, 3, stride, f"{p}.{j}.0", bn_name=f"{p}.{j}.1",
                          act="Relu6", group=hidden)  # fmt: skip
            y = b.conv_bn(y, hidden, c, 1, 1, f"{p}.{j + 1}", bn_name=f"{p}.{j + 2}", act=None)
            if stride == 1 and cin == c:
                out = f"features.{index}_add"
                b.nodes.append(helper.make_node("Add", [x, y], [out], name=f"features.{index}.add"))
                y = out
            x, cin, index = y, c, index + 1
    x = b.conv_bn(x, 320, 1280, 1, 1, "features.18.0", bn_name="features.18.1", act="Relu6")
    return b.model("mobilenetv2", b.head(x, 1280))


def build_small_stack(seed: int = 0, blocks: int = 4, channels: int = 8) -> onnx.ModelProto:
    """A tiny Conv-BN-Relu stack for smoke runs (same graph style, a few kB)."""
    b = _Builder(seed)
    x = b.conv_bn("input", 3, channels, 3, 2, "stem", bn_name="stem_bn")
    for i in range(blocks):
        x = b.conv_bn(x, channels, channels, 3, 1, f"block{i}", bn_name=f"block{i}_bn")
    return b.model("small_stack", b.head(x, channels, classes=10), classes=10)


def build_conv_bn_stack(
    path: Path, *, layers: int, channels: int, kernel: int = 3, spatial: int = 8, seed: int = 0
) -> int:
    """A deep Conv-BN-Relu stack, every weight in `<path>.data`, written chunk by chunk.

    Returns the size of the external data in bytes. Memory stays at one weight tensor.
    """
    rng = np.random.default_rng(seed)
    data_name = f"{path.name}.data"
    nodes, inits = [], []
    offset = 0
    scale = np.float32(np.sqrt(2.0 / (channels * kernel * kernel)))
    with open(path.parent / data_name, "wb") as fh:

        def external(name: str, array: np.ndarray) -> None:
            nonlocal offset
            raw = np.ascontiguousarray(array, dtype=np.float32)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(raw.shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(raw.nbytes))):  # fmt: skip
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            fh.write(raw.tobytes())
            offset += raw.nbytes
            pad = (-offset) % 4096  # page-aligned like onnx's own writer
            fh.write(b"\0" * pad)
            offset += pad
            inits.append(tensor)

        x = "input"
        for i in range(layers):
            w = rng.standard_normal((channels, channels, kernel, kernel), dtype=np.float32)
            external(f"conv{i}.weight", w * scale)
            external(f"bn{i}.weight", rng.uniform(0.5, 1.5, channels).astype(np.float32))
            external(f"bn{i}.bias", rng.normal(0, 0.1, channels).astype(np.float32))
            external(f"bn{i}.running_mean", rng.normal(0, 0.1, channels).astype(np.float32))
            external(f"bn{i}.running_var", rng.uniform(0.5, 2.0, channels).astype(np.float32))
            nodes.append(
                helper.make_node("Conv", [x, f"conv{i}.weight"], [f"conv{i}_out"],
                                 name=f"conv{i}", kernel_shape=[kernel, kernel],
                                 pads=[kernel // 2] * 4)
            )  # fmt: skip
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [f"conv{i}_out", f"bn{i}.weight", f"bn{i}.bias", f"bn{i}.running_mean",
                     f"bn{i}.running_var"], [f"bn{i}_out"], name=f"bn{i}",
                )
            )  # fmt: skip
            nodes.append(helper.make_node("Relu", [f"bn{i}_out"], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(
        nodes, "conv_bn_stack",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, spatial, spatial])],  # noqa: E501
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, spatial, spatial])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 7
    path.write_bytes(model.SerializeToString())
    return offset


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet50": build_resnet50,
    "mobilenetv2": build_mobilenetv2,
    "small_stack": build_small_stack,
}


def cached_model(name: str) -> Path:
    """The path of a built model under bench/.cache/, building it on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}.onnx"
    if not path.exists():
        model = BUILDERS[name]()
        onnx.checker.check_model(model)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    return path


def model_bytes(path: Path) -> int:
    """Size of a model file plus its external data files."""
    total = path.stat().st_size
    for data in path.parent.glob(f"{path.name}*.data"):
        total += data.stat().st_size
    return total


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    return {"nodes": len(ops), "BatchNormalization": ops.count("BatchNormalization")}


# -- fresh-process measurement -----------------------------------------------------------------
def measure(argv: Sequence[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run argv in a fresh process: wall seconds, its own peak RSS, and its last JSON line.

    The child is reaped with os.wait4, so ru_maxrss is that child's alone (RUSAGE_CHILDREN
    would be the maximum over every child so far).
    """
    start = time.perf_counter()
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exec the command with stdout/stderr on the pipes
        os.close(r_out)
        os.close(r_err)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        try:
            os.execvpe(argv[0], list(argv), env if env is not None else os.environ)
        finally:
            os._exit(127)
    os.close(w_out)
    os.close(w_err)
    out, err = _drain(r_out, r_err)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}:\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "inner": _json_of(out)}


def _json_of(out: str) -> dict[str, Any] | None:
    """The JSON document a child printed: all of stdout (--json), else its last JSON line."""
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        pass
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _drain(r_out: int, r_err: int) -> tuple[str, str]:
    import selectors

    chunks: dict[int, list[bytes]] = {r_out: [], r_err: []}
    sel = selectors.DefaultSelector()
    for fd in chunks:
        sel.register(fd, selectors.EVENT_READ)
    open_fds = set(chunks)
    while open_fds:
        for key, _ in sel.select():
            data = os.read(key.fd, 1 << 16)
            if data:
                chunks[key.fd].append(data)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds.discard(key.fd)
    return (b"".join(chunks[r_out]).decode(errors="replace"),
            b"".join(chunks[r_err]).decode(errors="replace"))  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall time, median in-process time and median peak RSS over runs."""
    walls = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_bytes"] for r in runs]
    inner = [r["inner"]["seconds"] for r in runs if r.get("inner") and "seconds" in r["inner"]]
    summary = {
        "runs": len(runs),
        "wall_s": statistics.median(walls),
        "wall_s_min": min(walls),
        "wall_s_max": max(walls),
        "peak_rss_mib": statistics.median(rss) / MiB,
    }
    if inner:
        summary["inner_s"] = statistics.median(inner)
    return summary


def python() -> str:
    return sys.executable


def worker_argv(task: str, *args: str) -> list[str]:
    """The command of a fresh process that runs one timed task of bench/_workers.py."""
    return [python(), str(Path(__file__).resolve().with_name("_workers.py")), task, *args]


# -- machine ------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for dist in ("bnsurgery", "onnx", "onnxruntime", "numpy", "protobuf", "onnxoptimizer",
                 "onnxsim", "onnxscript", "torch", "matplotlib"):  # fmt: skip
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:  # not installed in this environment
            versions[dist] = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
