"""Run ONNX Runtime work in a child process, so that a crash of the engine cannot kill bnsurgery.

ONNX Runtime is C++: a model it mishandles can end the whole process with SIGSEGV, with no
Python exception to catch. `run_isolated(fn, *args, what=MODEL, **kwargs)` calls
`fn(*args, **kwargs)` in a forked child and returns its result, so such a crash becomes one line
and exit 2 (`EngineCrashed`: "ONNX Runtime crashed (signal 11, SIGSEGV) running MODEL").

Contract:
- Where: on Linux the child is made with fork. Nothing is re-imported and the arguments are not
  pickled, so generators, closures and ModelProtos work as arguments, and the cost is the fork
  (page tables, copy-on-write) plus sending the result back. Elsewhere (no fork, or macOS, where
  forking a process that has loaded system frameworks is unsafe) `fn` runs in-process, without
  protection. `BNSURGERY_ISOLATION=0` also runs it in-process (to debug `fn` with pdb), and so
  does a call made inside a child: its parent already isolates it.
- Results come back pickled over a pipe, with pickle protocol 5: the buffers of numpy arrays
  travel out of band, written by the child into an in-memory file (memfd) made before the fork
  and mapped by the parent, so a large array costs one copy, in the child. A result that does
  not pickle raises the pickling error in the parent.
- Exceptions come back as faithfully as they can travel: as themselves when they pickle
  (bnsurgery's errors keep their type, message and so exit code); onnxruntime's own errors, when
  their type does not pickle, as `bnsurgery.errors.EngineError` (same `str()`,
  `is_onnxruntime_error` still true); an exception whose constructor cannot be replayed from
  its args (ValidationFailed) rebuilt as its own type from args and attributes; anything else as
  RuntimeError("TypeName: message"). The child's traceback is added to the exception as a note.
- A child killed by a signal raises EngineCrashed with the signal's number and name; a child
  that exits without sending a result (os._exit, a C library calling exit) raises EngineCrashed
  with its exit status. Nothing else of the child's failure reaches the caller.
- KeyboardInterrupt (or any other exception) in the parent while it waits kills the child
  (SIGKILL), reaps it and propagates. The child ignores SIGINT (Ctrl-C reaches the whole process
  group; the parent decides) and is killed if the parent dies (Linux parent-death signal).
- The child never returns into the caller's code: it leaves with os._exit after sending, so the
  parent's atexit handlers and finalizers do not run there, and stdout/stderr are flushed before
  the fork so buffered text is not written twice. Every child is reaped: no zombies.
- Calls from several threads work; the pipe and fork are made under one lock so that no child
  inherits another call's pipe and holds it open.

Forking a multi-threaded process (numpy's BLAS pool, ONNX Runtime's session threads) is what
Python 3.12+ warns about (DeprecationWarning): a lock held by another thread at the instant of
the fork stays locked forever in the child. The warning is silenced for this one fork, because
here the child only runs `fn` and leaves, and what it needs is reset at fork: glibc's malloc
and CPython's own locks are, OpenBLAS (numpy's wheels) shuts its pool down in an atfork handler
and starts it again on first use, and ONNX Runtime's thread pools and CPU allocator belong to
each session, so a session made in the child starts its own threads and never touches the
parent's. The hazard that remains is another thread of the parent running an engine at the
moment of the fork; keep sessions in children (as the harness does) and it does not arise.
A spawn or forkserver child would avoid it only by pickling every argument (hundreds of MB for
a large model) and importing bnsurgery and onnxruntime again on every call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import itertools
import mmap
import os
import pickle
import signal
import struct
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from bnsurgery.errors import EngineCrashed, EngineError, is_onnxruntime_error

T = TypeVar("T")

ENV_SWITCH = "BNSURGERY_ISOLATION"

# One frame on the pipe: magic, pickle length, buffer count; one length per buffer; the pickle.
# Lengths make a truncated frame (a child that died while writing) recognisable. The buffers
# themselves go through the shared store (see _shared_store), not the pipe.
_MAGIC = b"BNSI"
_HEADER = struct.Struct("<4sQI")
_LENGTH = struct.Struct("<Q")
_ALIGN = 64  # offsets of buffers in the shared store: aligned for any numpy dtype and SIMD
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_in_child = False  # set in a child, where nested calls run in-process
_fork_lock = threading.Lock()


def isolation_enabled() -> bool:
    """True where run_isolated forks: Linux, not inside a child, and not switched off."""
    if _in_child or not (sys.platform.startswith("linux") and hasattr(os, "fork")):
        return False
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in {"0", "false", "no", "off"}


def run_isolated(fn: Callable[..., T], /, *args: Any, what: str, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` run in a child process; its result, or its exception re-raised.
    `what` names the work for the crash message (the model's path, say). See the module's
    docstring for the full contract."""
    if not isolation_enabled():
        return fn(*args, **kwargs)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or replaced stream cannot be flushed
            stream.flush()
    release_free_heap()
    pid = 0
    open_fds: list[int] = []
    try:
        with _fork_lock:  # no other call's child may inherit this call's pipe
            read_end, write_end = os.pipe()
            open_fds += [read_end, write_end]
            store = _shared_store()
            open_fds.append(store)
            parent_pid = os.getpid()
            # Every object alive now goes to the collector's permanent generation for the
            # fork, so the child's collector never finalises the parent's garbage: an ONNX
            # Runtime session awaiting collection would, in the child, join thread-pool threads
            # that do not exist there and hang forever (found running the test suite).
            gc.freeze()
            try:
                with _quiet_fork_warning():
                    pid = os.fork()
            finally:
                if pid != 0:
                    gc.unfreeze()
            if pid == 0:
                _child(read_end, write_end, store, parent_pid, fn, args, kwargs)  # never returns
            os.close(write_end)
            open_fds.remove(write_end)
        with open(read_end, "rb", buffering=0, closefd=False) as pipe:
            message = _receive(pipe, store)
        status = os.waitpid(pid, 0)[1]
    except BaseException:  # KeyboardInterrupt included: the child must not outlive the call
        if pid:
            _kill(pid)
        raise
    finally:
        for fd in open_fds:
            os.close(fd)
    if message is None:
        if os.WIFSIGNALED(status):
            raise EngineCrashed(what, signal_number=os.WTERMSIG(status))
        raise EngineCrashed(what, exit_status=os.waitstatus_to_exitcode(status))
    return _unpack(message)


# -- the child ---------------------------------------------------------------------------------
def _child(
    read_end: int,
    write_end: int,
    store: int,
    parent_pid: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Run fn and send what came of it; leave with os._exit whatever happens."""
    global _in_child
    code = 1
    try:
        _in_child = True
        os.close(read_end)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _die_with_parent(parent_pid)
        try:
            message: tuple[Any, ...] = ("result", fn(*args, **kwargs))
        except BaseException as exc:
            message = ("error", _portable(exc), traceback.format_exc())
        try:
            _send(write_end, store, message)
        except OSError:
            raise
        except Exception as exc:  # the result does not pickle: say so instead
            _send(write_end, store, ("error", _portable(exc), traceback.format_exc()))
        for stream in (sys.stdout, sys.stderr):  # what fn printed, not the parent's buffers
            with contextlib.suppress(Exception):
                stream.flush()
        code = 0
    finally:
        os._exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this child when its parent dies, so a killed bnsurgery leaves no
    session running; leave at once if the parent is already gone."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _portable(exc: BaseException) -> Any:
    """What of exc can travel to the parent: itself, a rebuild recipe, or a stand-in."""
    if _round_trips(exc, exc):
        return exc
    if is_onnxruntime_error(exc):
        return EngineError(type(exc).__name__, type(exc).__module__, str(exc))
    for state in (dict(getattr(exc, "__dict__", {})), {}):
        recipe = _Rebuild(type(exc), exc.args, state)
        if _round_trips(recipe, exc):
            return recipe
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _round_trips(payload: Any, exc: BaseException) -> bool:
    """Whether payload pickles and unpickles into an exception of exc's type and message."""
    try:
        back = pickle.loads(pickle.dumps(payload, protocol=5))
        if isinstance(back, _Rebuild):
            back = back.build()
        return type(back) is type(exc) and str(back) == str(exc)
    except Exception:
        return False


class _Rebuild:
    """An exception whose constructor cannot be called again with its args (one that takes
    extra arguments), made again without it: its type by reference, args, attributes."""

    def __init__(self, cls: type[BaseException], args: tuple[Any, ...], state: dict) -> None:
        self.cls, self.args, self.state = cls, args, state

    def build(self) -> BaseException:
        exc = self.cls.__new__(self.cls, *self.args)
        exc.args = self.args
        exc.__dict__.update(self.state)
        return exc


def _send(fd: int, store: int, message: tuple[Any, ...]) -> None:
    """Write the pickle as one frame to the pipe, and its out-of-band buffers (contiguous numpy
    arrays) into the shared store, each at the next aligned offset."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    os.ftruncate(store, sum(_aligned(view.nbytes) for view in views))  # the size the parent maps
    offset = 0
    for view in views:
        _write_all(store, view, offset)
        offset += _aligned(view.nbytes)
    head = _HEADER.pack(_MAGIC, len(data), len(views))
    head += b"".join(_LENGTH.pack(view.nbytes) for view in views)
    _write_all(fd, memoryview(head + data))


def _write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    """All of view to fd (at offset, if given: os.pwrite)."""
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        offset = None if offset is None else offset + written


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


# -- the parent --------------------------------------------------------------------------------
def _receive(pipe: Any, store: int) -> tuple[Any, ...] | None:
    """The child's message, or None when the pipe ends before a whole frame. Out-of-band
    buffers are slices of the shared store, mapped: large arrays arrive without a copy."""
    head = _read_exact(pipe, _HEADER.size)
    if head is None or head[:4] != _MAGIC:
        return None
    _, data_length, count = _HEADER.unpack(head)
    lengths_raw = _read_exact(pipe, _LENGTH.size * count)
    data = _read_exact(pipe, data_length)
    if lengths_raw is None or data is None:
        return None
    lengths = [length for (length,) in _LENGTH.iter_unpack(lengths_raw)]
    starts = [0, *itertools.accumulate(map(_aligned, lengths))]  # the last is the total size
    mapped = memoryview(mmap.mmap(store, starts[-1]) if starts[-1] else bytearray())
    buffers = [mapped[start : start + n] for start, n in zip(starts, lengths, strict=False)]
    return pickle.loads(data, buffers=buffers)


def _read_exact(pipe: Any, size: int) -> bytearray | None:
    """size bytes straight into a new buffer, or None at an early end of the pipe."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        count = pipe.readinto(view[filled:])
        if not count:
            return None
        filled += count
    return buffer


def _unpack(message: tuple[Any, ...]) -> Any:
    if message[0] == "result":
        return message[1]
    _, carried, child_traceback = message
    exc = carried.build() if isinstance(carried, _Rebuild) else carried
    exc.add_note(f"raised in bnsurgery's isolated child process:\n{child_traceback.rstrip()}")
    raise exc


def _shared_store() -> int:
    """A file both processes hold, in memory (memfd) where the system has it, else an unnamed
    temporary file: the child writes large buffers there, the parent maps them."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("bnsurgery-isolated-result", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library of this process (glibc on Linux), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    Before a fork: freed memory that malloc keeps would be shared copy-on-write with the child,
    which reuses it first: every page it touches is then copied (a fault and 4 KiB each).
    Handed back, those pages come to the child fresh. Measured on ResNet-50: session creation
    in the child was 1.4x its in-process CPU time without this, 1.05x with it; the call costs
    milliseconds.
    Between sessions (the harness's one-at-a-time runs): memory one session freed is not counted
    again while the next one lives."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _kill(pid: int) -> None:
    """End the child now and reap it (the parent is leaving early)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@contextlib.contextmanager
def _quiet_fork_warning() -> Iterator[None]:
    """Silence Python 3.12+'s warning about forking a multi-threaded process, for this fork
    only: the module's docstring says why this child is safe."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*multi-threaded, use of fork\(\)", category=DeprecationWarning
        )
        yield
