"""Run a model over DATA on one execution provider: its outputs and chosen intermediate tensors.

A Runner has a plain lifecycle (Polygraphy's): `activate()` builds the session and verifies its
placement, `infer(feeds)` runs one batch, and nothing here judges results. Intermediate tensors
are returned by adding them as graph outputs of a copy of the model, typed from ONNX shape
inference where it knows them and untyped otherwise (ONNX Runtime accepts both).

`run_model()` streams a DataSource through a runner, one batch at a time, with a progress bar on
stderr only when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.runtime.providers import ProviderConfig, SessionInfo, create_session


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
    """One model on one provider. `extra_outputs` are intermediate tensors to return as well."""

    def __init__(
        self,
        model: onnx.ModelProto,
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
        # a serialized model (bytes) learns its outputs from the session
        graph = getattr(model, "graph", None)
        self.output_names: list[str] = [o.name for o in graph.output] if graph else []

    def activate(self) -> SessionInfo:
        if self.session is None:
            if self.model is None:
                raise RuntimeError(f"{self.label}: its serialized model went with its session")
            model = with_outputs(self.model, self.extra_outputs) if self.extra_outputs else None
            self.session, self.info = create_session(model or self.model, self.config)
            self.output_names = [o.name for o in self.session.get_outputs()]
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
        self.session = None


@dataclass
class RunResult:
    """Everything one run produced, concatenated over batches."""

    outputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    session: SessionInfo
    samples: int
    batches: int
    seconds: float
    intermediates: dict[str, np.ndarray] = field(default_factory=dict)


def run_model(
    model: onnx.ModelProto,
    data: Any,
    config: ProviderConfig | None = None,
    *,
    intermediates: Sequence[str] = (),
    show_progress: bool | None = None,
) -> RunResult:
    """Run `model` over `data` (a DataSource, or any DATA spec load_data accepts) on one
    provider, streaming batches; outputs and the chosen intermediates are concatenated."""
    from bnsurgery.data import DataSource, load_data

    source = data if isinstance(data, DataSource) else load_data(data, model)
    runner = Runner(model, config, extra_outputs=intermediates)
    info = runner.activate()
    graph_outputs = [o.name for o in model.graph.output]
    collected: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    samples = batches = 0
    start = time.perf_counter()
    with progress(
        source.batches(),
        length=source.num_batches,
        label=f"running {runner.label}",
        enabled=show_progress,
    ) as stream:
        for batch in stream:
            for name, value in runner.infer(batch.feeds).items():
                collected.setdefault(name, []).append(value)
            if batch.labels is not None:
                labels.append(batch.labels)
            samples += batch.size
            batches += 1
    seconds = time.perf_counter() - start
    joined = {name: _join(parts) for name, parts in collected.items()}
    return RunResult(
        outputs={n: joined[n] for n in graph_outputs if n in joined},
        labels=np.concatenate(labels) if labels and len(labels) == batches else None,
        session=info,
        samples=samples,
        batches=batches,
        seconds=seconds,
        intermediates={n: joined[n] for n in intermediates if n in joined},
    )


def _join(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(p.ndim > 0 for p in parts):
        try:
            return np.concatenate(parts)
        except ValueError:
            pass
    return np.stack(parts) if len({p.shape for p in parts}) == 1 else np.asarray(parts[-1])
