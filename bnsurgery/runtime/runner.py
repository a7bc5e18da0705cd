"""Run a model batch by batch on one execution provider: its outputs and chosen intermediates.

A Runner has a plain lifecycle (Polygraphy's): `activate()` builds the session and verifies its
placement, `infer(feeds)` runs one batch, `deactivate()` lets the session go, and nothing here
judges results. `Executor` is that lifecycle as a protocol: the engine seam of the comparing
harness, which runs a Runner (ONNX Runtime) or a runtime.reference.ReferenceRunner
(onnx.reference) alike. Intermediate tensors are returned by adding them as graph outputs of a
copy of the model, typed from ONNX shape inference where it knows them and untyped otherwise
(ONNX Runtime accepts both).

`progress()` wraps a stream of batches in a progress bar on stderr, shown only when stderr is
a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.runtime.providers import ProviderConfig, SessionInfo, create_session

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """One model ready to run batch by batch on one engine (the harness's engine seam)."""

    label: str
    extra_outputs: list[str]

    def activate(self) -> SessionInfo:
        """Make the session (once); what runs it."""
        ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Run one batch: every output (graph outputs and extra ones) by name."""
        ...

    def deactivate(self) -> None:
        """Let the session go; nothing of it outlives this."""
        ...


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(
    iterable: Iterable[Any],
    *,
    length: int | None = None,
    label: str = "",
    enabled: bool | None = None,
) -> Iterator[Iterable[Any]]:
    """A click progress bar on stderr when it is a terminal (or when enabled=True)."""
    show = stderr_is_tty() if enabled is None else enabled
    if not show:
        yield iterable
        return
    import click

    with click.progressbar(iterable, length=length, label=label, file=sys.stderr) as bar:
        yield bar


def node_outputs(model: onnx.ModelProto) -> list[str]:
    """Outputs of the main graph's nodes, in the graph's (topological) order."""
    return [name for node in model.graph.node for name in node.output if name]


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """value_info by name from ONNX shape inference; empty where inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:  # unknown ops, >2 GB models, inconsistent shapes: go untyped
        return {}
    table = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            table[value.name] = value
    return table


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (main-graph tensors)."""
    known = set(node_outputs(model)) | {i.name for i in model.graph.input}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInputError(
            "no tensor named " + ", ".join(f"'{n}'" for n in unknown[:5]) + " in the main graph"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in present]
    if not wanted:
        return copy
    types = _inferred_types(copy)
    for name in wanted:
        value = onnx.ValueInfoProto()
        if name in types:
            value.CopyFrom(types[name])
            # a stale or partial shape must not make ORT reject a valid run: keep only the type
            value.type.tensor_type.ClearField("shape")
        else:
            value.name = name
        copy.graph.output.append(value)
    return copy


class Runner:
    """One model on one provider: a ModelProto, its serialized bytes, or the path of its file
    (ONNX Runtime then reads it itself). `extra_outputs` are intermediate tensors to return as
    well (a ModelProto only)."""

    def __init__(
        self,
        model: onnx.ModelProto | bytes | str,
        config: ProviderConfig | None = None,
        *,
        extra_outputs: Sequence[str] = (),
        label: str = "",
    ) -> None:
        self.model: Any = model  # a serialized model (bytes) is dropped once its session exists
        self.config = config or ProviderConfig()
        self.extra_outputs = list(extra_outputs)
        self.label = label or self.config.alias
        self.session: Any = None
        self.info: SessionInfo | None = None
        # a serialized model (bytes, a path) learns its outputs from the session
        graph = getattr(model, "graph", None)
        self.output_names: list[str] = [o.name for o in graph.output] if graph else []

    def activate(self) -> SessionInfo:
        if self.session is None:
            if self.model is None:
                raise RuntimeError(f"{self.label}: its serialized model went with its session")
            model = with_outputs(self.model, self.extra_outputs) if self.extra_outputs else None
            started = time.perf_counter()
            self.session, self.info = create_session(model or self.model, self.config)
            self.output_names = [o.name for o in self.session.get_outputs()]
            logger.debug(
                "%s: session on %s, %s, %d outputs, made in %.2f s", self.label,
                self.info.describe(), self.info.opt_level, len(self.output_names),
                time.perf_counter() - started,
            )  # fmt: skip
            if isinstance(self.model, bytes):  # the session has its own copy: don't keep two
                self.model = None
        assert self.info is not None
        return self.info

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; every output (graph outputs and extra ones) by name."""
        self.activate()
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def deactivate(self) -> None:
        """Let the session go (its memory with it); `activate()` makes it again if needed."""
        self.session = None
