"""run_isolated: ONNX Runtime work in a forked child, so that no engine crash kills bnsurgery.

A crash in the child is one EngineCrashed line (exit 2) in a parent that lives on; results and
exceptions come back as they were; switched off, nested or forkless it runs in-process.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import models
import numpy as np
import onnxruntime as ort
import pytest
from conftest import SAMPLES

from bnsurgery.errors import (
    EXIT_BAD_INPUT,
    BadInputError,
    CheckFailed,
    DataError,
    EngineCrashed,
    EngineError,
    EnvironmentProblem,
    UnsafePathError,
    UsageError,
    is_onnxruntime_error,
)
from bnsurgery.pipeline.config import StepFailed
from bnsurgery.runtime import isolation
from bnsurgery.runtime.isolation import run_isolated
from bnsurgery.validation.gate import ValidationFailed, ValidationReport

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="isolation forks on Linux only"
)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def session_run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def zombies_of(pid: int) -> list[int]:
    """Children of pid that have ended but were never reaped."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# -- crashes -----------------------------------------------------------------------------------
def test_a_child_killed_by_sigsegv_is_one_engine_crashed_line_and_the_parent_lives_on():
    with pytest.raises(EngineCrashed) as caught:
        run_isolated(segfault, what="model.onnx")
    assert str(caught.value) == "ONNX Runtime crashed (signal 11, SIGSEGV) running model.onnx"
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert isinstance(caught.value, BadInputError)
    assert caught.value.signal_number == signal.SIGSEGV
    assert run_isolated(lambda: "still here", what="next") == "still here"


def test_a_child_that_exits_without_a_result_names_its_exit_status():
    with pytest.raises(EngineCrashed) as caught:
        run_isolated(os._exit, 7, what="model.onnx")
    message = "ONNX Runtime ended without a result (exit status 7) running model.onnx"
    assert str(caught.value) == message
    assert caught.value.exit_status == 7 and caught.value.signal_number is None


def test_a_killed_child_hints_at_memory():
    with pytest.raises(EngineCrashed, match=r"\(signal 9, SIGKILL\) running m\.onnx \(killed; "):
        run_isolated(lambda: os.kill(os.getpid(), signal.SIGKILL), what="m.onnx")


def test_the_real_onnxruntime_crash_is_caught(tmp_path: Path):
    """The BN whose running mean/var outputs are declared but unnamed segfaults ORT's kernel."""
    model = models.ort_crashing_bn().SerializeToString()
    feeds = {"x": np.ones((2, 3, 5, 5), np.float32)}
    with pytest.raises(EngineCrashed) as caught:
        run_isolated(session_run, model, feeds, what="ort_crash.onnx")
    assert str(caught.value) == "ONNX Runtime crashed (signal 11, SIGSEGV) running ort_crash.onnx"


@pytest.mark.parametrize("opset", [9, 13])
def test_the_crashing_model_really_kills_a_plain_onnxruntime_process(tmp_path: Path, opset: int):
    """Without isolation the same model ends a Python process with SIGSEGV (so the test above
    catches a real crash, not a Python error)."""
    path = tmp_path / "crash.onnx"
    path.write_bytes(models.ort_crashing_bn(opset).SerializeToString())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "print('created', flush=True)\n"
        "s.run(None, {'x': np.ones((2, 3, 5, 5), np.float32)})\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert done.stdout == "created\n"  # the session builds; the run crashes
    assert done.returncode == -signal.SIGSEGV


def test_no_child_is_left_a_zombie():
    run_isolated(lambda: 1, what="ok")
    with pytest.raises(EngineCrashed):
        run_isolated(segfault, what="crash")
    with pytest.raises(ValueError):
        run_isolated(lambda: int("x"), what="error")
    assert zombies_of(os.getpid()) == []


def test_keyboard_interrupt_in_the_parent_kills_the_child_and_propagates(tmp_path: Path):
    pid_file = tmp_path / "child.pid"

    def slow() -> None:
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_isolated(slow, what="slow")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child, 0)


def running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_child_does_not_outlive_a_killed_parent(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from bnsurgery.runtime.isolation import run_isolated
        def slow():
            Path({str(pid_file)!r}).write_text(str(os.getpid()))
            time.sleep(60)
        run_isolated(slow, what="slow")
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.02)
        child = int(pid_file.read_text())
        assert running(child)
    finally:
        parent.kill()  # SIGKILL: no handler of ours runs in the parent
        parent.wait()
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running(child)


# -- results -----------------------------------------------------------------------------------
def test_results_of_several_megabytes_come_back_equal_and_writable():
    r = np.random.default_rng(0)
    sent = {
        "logits": r.standard_normal((64, 1000)).astype(np.float32),
        "features": r.standard_normal((8, 256, 28, 28)).astype(np.float32),  # 6.4 MB
        "fortran": np.asfortranarray(r.standard_normal((300, 200))),
        "strided": np.arange(1000, dtype=np.int64)[::3],
        "half": r.standard_normal(1001).astype(np.float16),
        "empty": np.zeros((3, 0), np.float32),
        "names": ["y", "mean"],
    }
    back = run_isolated(lambda: sent, what="results")
    assert back.keys() == sent.keys()
    assert back["names"] == sent["names"]
    for key in sent.keys() - {"names"}:
        assert back[key].dtype == sent[key].dtype and back[key].shape == sent[key].shape
        np.testing.assert_array_equal(back[key], sent[key])
    assert back["fortran"].flags.f_contiguous
    back["features"][0, 0, 0, 0] = 1.0  # ours to use, like any array


def test_arguments_are_not_pickled_so_generators_and_closures_work():
    counter = {"calls": 0}

    def total(numbers, *, scale):
        counter["calls"] += 1  # the child's copy: the parent's stays 0
        return scale * sum(numbers)

    assert run_isolated(total, (n for n in range(5)), scale=2, what="gen") == 20
    assert counter["calls"] == 0


def test_onnxruntime_outputs_equal_the_in_process_run():
    model = (SAMPLES / "resnet_small.onnx").read_bytes()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.random.default_rng(1).standard_normal([2, *i.shape[1:]]).astype(np.float32)
        for i in session.get_inputs()
    }
    isolated = run_isolated(session_run, model, feeds, what="resnet_small.onnx")
    for got, want in zip(isolated, session_run(model, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_result_that_does_not_pickle_raises_the_pickling_error():
    with pytest.raises(TypeError, match=r"cannot pickle '_thread\.lock' object"):
        run_isolated(threading.Lock, what="lock")


# -- exceptions --------------------------------------------------------------------------------
ERRORS = [
    BadInputError("not an ONNX model"),
    UsageError("OUT equals MODEL"),
    UnsafePathError("external data outside the folder"),
    DataError("missing input x"),
    EnvironmentProblem("CUDAExecutionProvider is not available"),
    CheckFailed("verification failed"),
    StepFailed("step 2 raised"),
    EngineCrashed("m.onnx", signal_number=11),
    ValidationFailed("2 findings at error", ValidationReport(model="m.onnx")),
    ValueError("plain"),
    SystemExit(3),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_each_error_comes_back_with_its_type_message_and_exit_code(error: BaseException):
    def fail() -> None:
        raise error

    with pytest.raises(type(error)) as caught:
        run_isolated(fail, what="m.onnx")
    assert type(caught.value) is type(error)
    assert str(caught.value) == str(error)
    assert getattr(caught.value, "exit_code", None) == getattr(error, "exit_code", None)
    assert "isolated child process" in caught.value.__notes__[-1]  # the child's traceback


def test_an_exception_that_needs_extra_constructor_arguments_keeps_its_attributes():
    report = ValidationReport(model="m.onnx", batchnorms=3)

    def fail() -> None:
        raise ValidationFailed("1 finding", report)

    with pytest.raises(ValidationFailed) as caught:
        run_isolated(fail, what="m.onnx")
    assert caught.value.report == report


def test_an_exception_whose_type_cannot_travel_becomes_a_runtime_error_naming_it():
    class LocalProblem(Exception):
        pass

    def fail() -> None:
        raise LocalProblem("only the child knows this type")

    with pytest.raises(RuntimeError) as caught:
        run_isolated(fail, what="m.onnx")
    assert type(caught.value) is RuntimeError
    assert str(caught.value) == "LocalProblem: only the child knows this type"


def test_onnxruntime_error_from_a_real_session_keeps_its_message_and_kind():
    model = (SAMPLES / "resnet_small.onnx").read_bytes()
    wrong = {ort.InferenceSession(model).get_inputs()[0].name: np.zeros((1, 2, 3), np.float32)}
    with pytest.raises(Exception) as in_process:
        session_run(model, wrong)
    with pytest.raises(Exception) as isolated:
        run_isolated(session_run, model, wrong, what="resnet_small.onnx")
    assert type(in_process.value).__name__ == "InvalidArgument"
    assert is_onnxruntime_error(isolated.value)
    assert str(isolated.value) == str(in_process.value)


def test_onnxruntime_error_whose_type_does_not_pickle_comes_back_as_engine_error():
    unpicklable = type("Fail", (Exception,), {"__module__": "onnxruntime.capi.not_importable"})

    def fail() -> None:
        raise unpicklable("[ONNXRuntimeError] : 1 : FAIL : kernel missing")

    with pytest.raises(EngineError) as caught:
        run_isolated(fail, what="m.onnx")
    assert is_onnxruntime_error(caught.value)
    assert str(caught.value) == "[ONNXRuntimeError] : 1 : FAIL : kernel missing"
    assert (caught.value.type_name, caught.value.module) == (
        "Fail",
        "onnxruntime.capi.not_importable",
    )
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


# -- where it runs -----------------------------------------------------------------------------
def test_it_runs_in_a_child_by_default():
    assert run_isolated(os.getpid, what="pid") != os.getpid()


def test_isolation_switched_off_runs_in_process(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BNSURGERY_ISOLATION", "0")
    assert run_isolated(os.getpid, what="pid") == os.getpid()
    with pytest.raises(ZeroDivisionError):  # and errors are the untouched originals
        run_isolated(lambda: 1 / 0, what="div")


def test_nested_calls_run_in_the_child_that_is_already_isolated():
    def outer() -> tuple[int, int]:
        return os.getpid(), run_isolated(os.getpid, what="inner")

    child, inner = run_isolated(outer, what="outer")
    assert child == inner != os.getpid()


def test_without_fork_it_runs_in_process(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(isolation.sys, "platform", "win32")
    assert run_isolated(os.getpid, what="pid") == os.getpid()


def test_calls_from_several_threads_each_get_their_own_answer():
    answers: dict[int, int] = {}

    def ask(n: int) -> None:
        answers[n] = run_isolated(lambda: (time.sleep(0.05), n * n)[1], what=f"t{n}")

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == {n: n * n for n in range(6)}


def test_the_child_neither_repeats_buffered_output_nor_runs_atexit(tmp_path: Path):
    script = textwrap.dedent(
        """
        import atexit, sys
        from bnsurgery.runtime.isolation import run_isolated
        atexit.register(lambda: print("atexit"))
        sys.stdout.write("buffered ")  # stdout is a pipe: block-buffered, not yet written
        run_isolated(lambda: print("child"), what="m")
        print("parent")
        """
    )
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=buffered
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "buffered child\nparent\natexit\n"


def test_forking_a_multi_threaded_process_does_not_warn_and_works(monkeypatch):
    """Python 3.12+ warns at a fork with threads; that fork is safe here (the module says why),
    so the warning is silenced for it. Simulated on older Pythons with CPython's own text."""
    real_fork = os.fork

    def fork_like_python_312() -> int:
        pid = real_fork()
        if pid:
            warnings.warn(
                f"This process (pid={os.getpid()}) is multi-threaded, use of fork() may lead "
                "to deadlocks in the child.",
                DeprecationWarning,
                stacklevel=2,
            )
        return pid

    monkeypatch.setattr(isolation.os, "fork", fork_like_python_312)
    model = (SAMPLES / "resnet_small.onnx").read_bytes()
    name = ort.InferenceSession(model).get_inputs()[0]
    feeds = {name.name: np.ones([1, *name.shape[1:]], np.float32)}
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait, daemon=True)
    thread.start()
    live_session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    live_session.run(None, feeds)  # ORT's thread pool lives in the parent at the fork
    np.ones((256, 256)) @ np.ones((256, 256))  # and so does BLAS's
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outputs, product = run_isolated(
                lambda: (session_run(model, feeds), np.ones((256, 256)) @ np.ones((256, 256))),
                what="resnet_small.onnx",
            )
    finally:
        parked.set()
    np.testing.assert_array_equal(outputs[0], session_run(model, feeds)[0])
    assert (product == 256).all()  # BLAS works again in the child
