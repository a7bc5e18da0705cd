"""The CPU arena that exact re-estimation's sessions share: same statistics, one registration
per process, sessions opt in only within a scope, and freed memory goes back to the system."""

from __future__ import annotations

import sys

import bn_reference as ref
import numpy as np
import onnxruntime as ort
import pytest
from models import make, vi
from onnx import helper

from bnsurgery.measure.runner import MeasureRunner
from bnsurgery.passes.reestimate import reestimate
from bnsurgery.runtime import arena
from bnsurgery.runtime.providers import ProviderConfig, session_options


def _relu_model():
    return make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N"])], [vi("y", ["N"])])


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_statistics_are_bit_identical_with_and_without_the_shared_arena(mode):
    net, images = ref.bottleneck_net(), ref.image_data(40, size=8, shift=0.4)
    runs = {
        shared: reestimate(net, {"x": images}, mode=mode, batch_size=16, shared_arena=shared)
        for shared in (True, False)
    }
    assert runs[True].report.session["shared_cpu_arena"] is True
    assert runs[False].report.session["shared_cpu_arena"] is False
    for name, m in runs[False].report.stats.entries.items():
        other = runs[True].report.stats.entries[name]
        np.testing.assert_array_equal(other.mean, m.mean)
        np.testing.assert_array_equal(other.m2, m.m2)


def test_the_session_option_is_set_only_when_asked():
    with pytest.raises(RuntimeError, match="does not have configuration"):
        session_options(ProviderConfig("cpu")).get_session_config_entry(arena.USE_ENV_ALLOCATORS)
    options = session_options(ProviderConfig("cpu", shared_cpu_arena=True))
    assert options.get_session_config_entry(arena.USE_ENV_ALLOCATORS) == "1"


def test_sessions_share_the_arena_only_within_the_runner_scope():
    runner = MeasureRunner("cpu")
    runner.session(_relu_model())
    assert runner.session_info["shared_cpu_arena"] is False
    with runner.scope():
        runner.session_info = None
        runner.session(_relu_model())
        assert runner.session_info["shared_cpu_arena"] is True
    assert MeasureRunner("cpu", shared_arena=False).uses_shared_arena is False
    assert MeasureRunner("cuda").uses_shared_arena is False  # measured on the CPU EP only


def test_the_arena_is_registered_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(arena, "_registered", False)
    monkeypatch.setattr(ort, "create_and_register_allocator", lambda *a: calls.append(a))
    arena.register()
    arena.register()
    assert len(calls) == 1


def test_memory_is_released_once_when_the_last_scope_ends_even_on_error(monkeypatch):
    released = []
    monkeypatch.setattr(arena, "release", lambda: released.append(1))
    with arena.shared_cpu_arena():
        with arena.shared_cpu_arena():
            pass
        assert released == []
    assert released == [1]
    with pytest.raises(RuntimeError), arena.shared_cpu_arena():
        raise RuntimeError("a failing measurement")
    assert released == [1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_returns_the_freed_arena_memory_to_the_system():
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    x = np.ones((64 << 20,), np.float32)  # 256 MiB, touched before the baseline
    with arena.shared_cpu_arena():
        options = session_options(ProviderConfig("cpu", shared_cpu_arena=True))
        session = ort.InferenceSession(
            _relu_model().SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        before = rss_mib()
        (y,) = session.run(["y"], {"x": x})
        assert rss_mib() - before > 200  # the output lives in the shared arena
        del y, session
        held = rss_mib()
    assert held - rss_mib() > 200
