"""The measuring runner: ONNX Runtime sessions for the sub-models the engines build.

Each wave (exact mode) or the one pass (batch mode) is a sub-model of the model with its
probes' outputs added; the MeasureRunner opens a session for it with the measuring settings
(priority-based order, no memory pattern, optionally one shared CPU arena) on top of
bnsurgery.runtime, and `run_batch` runs one batch of it. `RunStats` counts what the runs cost.

Memory, beyond a plain forward pass over the same data (docs/benchmarks.md, section 4):
- ONNX Runtime's memory pattern plans one block for a whole run once it has seen the first,
  while the first run's chunks stay in the arena: every activation was held twice, so the
  measuring sessions run without it;
- building a session serialises its sub-model (a copy of the weights), and protobuf frees the
  sub-model's buffers to glibc's heap, which keeps them: the free heap pages are handed back
  once a session exists (runtime.isolation.release_free_heap);
- exact mode's wave cache holds stage-boundary activations within `memory_budget`
  (measure.cache).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import (
    BadInputError,
    BnSurgeryError,
    DataError,
    first_line_or_type,
)
from bnsurgery.onnxio import serialize_if_small
from bnsurgery.runtime.arena import shared_cpu_arena
from bnsurgery.runtime.isolation import release_free_heap
from bnsurgery.runtime.providers import ProviderConfig, create_session, resolve_alias

logger = logging.getLogger(__name__)

# Measurement runs at ORT's default level: every measured tensor is a graph output of its
# sub-model, so ORT cannot fuse it away, and its layout/kernel optimisations make a ResNet-50
# pass ~1.5x faster than ORT_DISABLE_ALL. (Verification, not measurement, runs unoptimised.)
MEASURE_OPT_LEVEL = "all"


@dataclass
class RunStats:
    """What running cost: passes over the data, node evaluations, cache use."""

    passes: int = 0
    node_evaluations: int = 0
    model_nodes: int = 0
    batches: int = 0
    peak_cache_bytes: int = 0
    recomputed_nodes: int = 0

    def to_dict(self) -> dict[str, Any]:
        equivalents = self.node_evaluations / self.model_nodes if self.model_nodes else 0.0
        return {
            "passes": self.passes,
            "forward_equivalents": round(equivalents, 3),
            "recomputed_nodes": self.recomputed_nodes,
            "peak_cache_bytes": self.peak_cache_bytes,
        }


class MeasureRunner:
    """Opens ONNX Runtime sessions for the sub-models of one measurement."""

    def __init__(
        self,
        provider: str = "cpu",
        opt_level: str = MEASURE_OPT_LEVEL,
        threads: int = 0,
        shared_arena: bool = True,
    ) -> None:
        self.provider = provider
        self.opt_level = opt_level
        self.threads = threads
        self.shared_arena = shared_arena
        self.session_info: dict[str, Any] | None = None  # the first session's
        self._in_scope = 0

    @property
    def _on_cpu_ep(self) -> bool:
        return resolve_alias(self.provider) == "CPUExecutionProvider"

    @property
    def uses_shared_arena(self) -> bool:
        """Whether the sessions share one CPU arena (bnsurgery.runtime.arena): measured on the
        CPU EP only, so other EPs keep their per-session arenas."""
        return self.shared_arena and self._on_cpu_ep

    @property
    def runs_training_mode_bn(self) -> bool:
        """Whether batch mode may use training-mode BatchNormalization: tested on ORT's CPU
        kernel; other EPs get plain ops, which every EP runs."""
        return self._on_cpu_ep

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Sessions created within share one arena (when `uses_shared_arena`), whose free memory
        is released after; sessions created outside keep their own."""
        if not self.uses_shared_arena:
            yield
            return
        with shared_cpu_arena():
            self._in_scope += 1
            try:
                yield
            finally:
                self._in_scope -= 1

    def session(self, model: onnx.ModelProto) -> Any:
        """A session for `model`; past protobuf's 2 GB limit it goes through a temporary file
        with external data (`session_from_file`)."""
        # Priority-based order runs each Shape node beside the op it measures. ORT's default
        # order schedules these graph-output leaves last, which keeps every measured activation
        # alive to the end of the run (ResNet-50, batch 32: 3.5 GB of peak RSS against 1.36).
        config = ProviderConfig(
            alias=self.provider,
            opt_level=self.opt_level,
            intra_op_threads=self.threads,
            execution_order="priority_based",
            shared_cpu_arena=self._in_scope > 0,
            memory_pattern=False,  # bounded memory: docs/benchmarks.md, section 4
        )
        try:
            serialized = serialize_if_small(model)
            if serialized is None:
                session, info = self.session_from_file(model, config)
            else:
                session, info = create_session(serialized, config)
        except BnSurgeryError:
            raise
        except Exception as exc:
            why = first_line_or_type(exc)
            raise BadInputError(f"ONNX Runtime cannot load the model: {why}") from None
        if self.session_info is None:
            self.session_info = info.to_dict()
        del serialized
        release_free_heap()  # the serialised copy and protobuf's freed buffers
        return session

    @staticmethod
    def session_from_file(model: onnx.ModelProto, config: ProviderConfig) -> tuple[Any, Any]:
        """(session, info) for a model too large to serialise: saved with external data to a
        temporary folder, which is removed once the session holds the weights."""
        logger.debug("sub-model past the protobuf limit: loading it through external data")
        with tempfile.TemporaryDirectory(prefix="bnsurgery-") as folder:
            path = Path(folder) / "part.onnx"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(path), save_as_external_data=True, location="part.data")
            return create_session(path, config)


def run_batch(
    session: Any, names: list[str], feed: dict[str, np.ndarray], batch: int
) -> dict[str, Any]:
    """The named outputs of one batch; a failing run is a DataError naming the batch."""
    try:
        values = session.run(names, feed)
    except Exception as exc:
        raise DataError(
            f"running the model on DATA failed at batch {batch}: {first_line_or_type(exc)}"
        ) from None
    return dict(zip(names, values, strict=True))
