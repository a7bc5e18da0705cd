"""One CPU memory arena shared by the ONNX Runtime sessions that opt in to it.

Exact re-estimation runs one session per wave (49 on ResNet-50). Each session's own arena
starts empty, so every wave touches its working memory and its outputs for the first time:
on ResNet-50 at 128 samples that was 4.3 M page faults and 15 s of system time in a 20 s run.
Sessions that share ORT's environment arena reuse the memory earlier waves freed (0.7 M
faults, 12 s). The arena is registered with ORT's environment once per process; `release`
hands its free memory back to the system once the sessions are done, so a long-running
pipeline does not keep the peak.

ORT keeps one environment arena per device: registering ours replaces one the process
registered itself with `onnxruntime.create_and_register_allocator`. Such a process passes
`shared_arena=False` to re-estimation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from onnx import TensorProto, helper

from bnsurgery.runtime.installation import onnxruntime
from bnsurgery.runtime.providers import USE_ENV_ALLOCATORS, ProviderConfig, session_options

__all__ = ["USE_ENV_ALLOCATORS", "register", "release", "shared_cpu_arena"]

_lock = threading.Lock()
_registered = False
_users = 0


def register() -> None:
    """Register the shared CPU arena with ORT's environment, once per process."""
    global _registered
    ort = onnxruntime()
    with _lock:
        if _registered:
            return
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # grow by what is asked (kSameAsRequested), not by powers of two: the same speed, and
        # a region holds fewer unrelated chunks, so `release` can free more of them (ResNet-50,
        # 128 samples: 0.6 GB left after the run against 0.9 GB)
        config = ort.OrtArenaCfg({"arena_extend_strategy": 1})
        ort.create_and_register_allocator(info, config)
        _registered = True


def release() -> None:
    """Return the arena's free memory to the system (memory still in use stays)."""
    if not _registered:
        return
    ort = onnxruntime()
    # ORT shrinks an arena only at the end of a run that asks for it: run a one-node session
    # on the shared arena with that request
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "shrink", [value], [out])
    # IR 8 and opset 13: what every supported onnxruntime (>= 1.17) loads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = session_options(ProviderConfig("cpu", shared_cpu_arena=True))
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    run_options = ort.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options)


@contextmanager
def shared_cpu_arena() -> Iterator[None]:
    """Within the block, sessions created with USE_ENV_ALLOCATORS share one arena; when the
    last nested or concurrent block ends, its free memory goes back to the system."""
    global _users
    register()
    with _lock:
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            last = _users == 0
        if last:
            release()
