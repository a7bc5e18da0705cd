"""Keeping re-estimation's memory bounded on one machine.

Where a ResNet-50 re-estimation's memory went, beyond a plain forward pass over the same data
(docs/benchmarks.md, section 4), and what each piece here does about it:

- ONNX Runtime's *memory pattern* plans one block for a whole run once it has seen the first,
  while the first run's chunks stay in the arena: every activation was held twice. The
  measuring sessions run without it (`ProviderConfig.memory_pattern`).
- Building a session serialises its sub-model (a copy of the weights), and protobuf frees the
  sub-model's buffers to glibc's heap, which keeps them: `release_free_heap` hands free heap
  pages back to the system once a session exists.
- Exact mode's wave cache holds stage-boundary activations of every sample, within
  `memory_budget` (bnsurgery.measure.cache).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_heap"]


@functools.cache
def _malloc_trim():  # -> the C function, or None off glibc
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return None


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system (glibc's malloc_trim); False where
    the C library has no such call. Only free memory is released: nothing in use moves."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
