"""The timed tasks of the benchmarks, one per fresh process: `python bench/_workers.py TASK ARGS`.

Each task imports only what its tool needs, so a process's wall time (spawn to exit) holds
that tool's own start-up and nothing of the benchmark's: ONNX Runtime's tasks never import
onnx (whose ml_dtypes start-up alone costs ~1 s here, docs/benchmarks.md §1), the fold tasks
import what a user of that tool would. Each prints one JSON line: the seconds it timed itself,
from the first byte read to the last byte written, imports excluded.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

# -- fold (bench/fold_speed.py, bench/large_model.py): TASK SRC DST ---------------------------


def _floor(src: str, dst: str) -> None:
    import onnx

    model = onnx.load(src)
    onnx.save(model, dst)


def _floor_external(src: str, dst: str) -> None:
    import onnx

    model = onnx.load(src)
    onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
              location=Path(dst).name + ".data")  # fmt: skip


def _api(src: str, dst: str) -> None:
    import bnsurgery

    result = bnsurgery.fold(src)
    bnsurgery.save_model(result.model, dst)


def _api_file(src: str, dst: str) -> None:
    import bnsurgery

    bnsurgery.fold_file(src, dst)


def _onnxoptimizer(src: str, dst: str) -> None:
    import onnx
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)


def _onnxsim(src: str, dst: str) -> None:
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim check failed")
    onnx.save(model, dst)


def _onnxscript(src: str, dst: str) -> None:
    import onnx
    import onnxscript.optimizer

    onnx.save(onnxscript.optimizer.optimize(onnx.load(src)), dst)


def _ort_basic(src: str, dst: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


# -- re-estimation (bench/reestimate_anchor.py): TASK MODEL DATA BATCH ------------------------


def _batches(data: str, batch: int):
    import numpy as np

    with np.load(data) as npz:
        key = next(iter(npz.files))
        array = npz[key]
    return key, [array[i : i + batch] for i in range(0, len(array), batch)]


def _forward(level: str) -> Callable[..., float]:
    def run(model: str, data: str, batch: str) -> float:
        import onnxruntime as ort

        key, batches = _batches(data, int(batch))
        start = time.perf_counter()
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for x in batches:
            sess.run(None, {key: x})
        return time.perf_counter() - start

    return run


def _torch_update_bn(model: str, data: str, batch: str) -> float:
    """update_bn on the architecture rebuilt as torch modules. A torch user has the module
    already: rebuilding it from the ONNX file (and importing onnx for that) is outside the
    timed part, though inside the wall time."""
    import onnx
    import torch
    from reestimate_anchor import torch_from_onnx
    from torch.optim.swa_utils import update_bn

    _, batches = _batches(data, int(batch))
    net = torch_from_onnx(onnx.load(model))
    start = time.perf_counter()
    update_bn([torch.from_numpy(b) for b in batches], net)
    return time.perf_counter() - start


FOLD_TASKS: dict[str, Callable[[str, str], None]] = {
    "floor": _floor,
    "floor_external": _floor_external,
    "api": _api,
    "api_file": _api_file,
    "onnxoptimizer": _onnxoptimizer,
    "onnxsim": _onnxsim,
    "onnxscript": _onnxscript,
    "ort_basic": _ort_basic,
}
# the modules a fold task's tool needs, imported before its clock starts
FOLD_IMPORTS = {
    "floor": ["onnx"],
    "floor_external": ["onnx"],
    "api": ["bnsurgery", "bnsurgery.passes.fold"],
    "api_file": ["bnsurgery", "bnsurgery.passes.fold.streamed"],
    "onnxoptimizer": ["onnx", "onnxoptimizer"],
    "onnxsim": ["onnx", "onnxsim"],
    "onnxscript": ["onnx", "onnxscript.optimizer"],
    "ort_basic": ["onnxruntime"],
}
TIMED_TASKS: dict[str, Callable[..., float]] = {
    "forward_enable_all": _forward("ENABLE_ALL"),
    "forward_disable_all": _forward("DISABLE_ALL"),
    "torch_update_bn": _torch_update_bn,
}
TIMED_IMPORTS = {
    "forward_enable_all": ["numpy", "onnxruntime"],
    "forward_disable_all": ["numpy", "onnxruntime"],
    "torch_update_bn": ["numpy", "torch"],
}


def main(task: str, args: list[str]) -> None:
    if task in FOLD_TASKS:
        for module in FOLD_IMPORTS[task]:
            __import__(module)
        start = time.perf_counter()
        FOLD_TASKS[task](*args)
        seconds = time.perf_counter() - start
    elif task in TIMED_TASKS:
        for module in TIMED_IMPORTS[task]:
            __import__(module)
        seconds = TIMED_TASKS[task](*args)
    else:
        raise SystemExit(f"unknown task {task}")
    print(json.dumps({"task": task, "seconds": seconds}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
