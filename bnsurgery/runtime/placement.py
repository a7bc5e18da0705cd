"""Where every node of a session ran, and whether the requested provider took all of them.

ONNX Runtime gives a node to the first provider in the session's list that claims it, and
hands the rest to the CPU provider without a word: `get_providers()` still lists the requested
provider even when it claimed nothing. So the harness records the assignment itself
(`session.record_ep_graph_assignment_info` and `get_provider_graph_assignment_info()`, ONNX
Runtime 1.24 and later). A node off the requested provider is a *partial* fallback, a provider
that took no node a *full* fallback; the harness refuses both (exit 3) unless fallback is
allowed, and names the op types either way.

Nodes ONNX Runtime adds itself (MemcpyToHost/MemcpyFromHost between devices) are not the
model's and are not counted.

Older ONNX Runtime (before 1.24) has no such record; there the placement comes from the
verbose log of a throwaway session (`Node placements`, written to stderr while the session is
created): it lists the nodes each provider took, a compiling provider's as fused subgraphs, so
the nodes off the requested provider are named and the rest are counted as on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

RECORD_CONFIG = "session.record_ep_graph_assignment_info"
ORT_ADDED_OPS = frozenset({"MemcpyToHost", "MemcpyFromHost"})
CPU = "CPUExecutionProvider"


def short_name(provider: str) -> str:
    """`OpenVINOExecutionProvider` -> `OpenVINO`, `CPUExecutionProvider` -> `CPU`."""
    return provider.removesuffix("ExecutionProvider") or provider


@dataclass
class Placement:
    """Nodes per provider of one session; `recorded` False where ORT cannot say."""

    requested: str
    recorded: bool
    nodes: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op_type, provider)
    reason: str = ""

    @property
    def total(self) -> int:
        return len(self.nodes)

    @property
    def on_requested(self) -> int:
        return sum(1 for _, _, ep in self.nodes if ep == self.requested)

    @property
    def elsewhere(self) -> list[tuple[str, str, str]]:
        return [n for n in self.nodes if n[2] != self.requested]

    @property
    def kind(self) -> str:
        """ "none" (every node on the requested provider), "partial" or "full" fallback, or
        "unknown" where it was not recorded."""
        if not self.recorded:
            return "unknown"
        if not self.elsewhere:
            return "none"
        return "full" if self.on_requested == 0 else "partial"

    def off_op_types(self) -> dict[str, dict[str, int]]:
        """{provider: {op_type: count}} of the nodes that ran elsewhere."""
        table: dict[str, Counter[str]] = {}
        for _, op, ep in self.elsewhere:
            table.setdefault(ep, Counter())[op] += 1
        return {ep: dict(sorted(ops.items())) for ep, ops in table.items()}

    def summary(self, label: str = "") -> str:
        """`openvino: 15 of 16 nodes; on CPU: Hardmax`."""
        label = label or short_name(self.requested)
        if not self.recorded:
            return f"{label}: placement not recorded ({self.reason})"
        text = f"{label}: {self.on_requested} of {self.total} nodes"
        for ep, ops in self.off_op_types().items():
            text += f"; on {short_name(ep)}: " + ", ".join(
                op if n == 1 else f"{op} x{n}" for op, n in ops.items()
            )
        return text

    def problem(self) -> str | None:
        """The fallback sentence, or None when every node ran on the requested provider."""
        kind = self.kind
        if kind in ("none", "unknown"):
            return None
        ops = sorted({op for _, op, _ in self.elsewhere})
        if kind == "full":
            return (
                f"{self.requested} took no node of the model: all {self.total} ran on "
                f"{', '.join(sorted({ep for _, _, ep in self.elsewhere}))} "
                f"(op types: {', '.join(ops)})"
            )
        return (
            f"{self.requested} ran {self.on_requested} of {self.total} nodes; "
            f"{len(self.elsewhere)} fell back ({self.summary().split('; ', 1)[1]})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "recorded": self.recorded,
            "reason": self.reason or None,
            "nodes": self.total,
            "on_requested": self.on_requested,
            "fallback": self.kind,
            "elsewhere": self.off_op_types(),
            "off_nodes": [
                {"node": name, "op_type": op, "provider": ep} for name, op, ep in self.elsewhere
            ],
            "summary": self.summary(),
        }


def enable_recording(options: Any) -> bool:
    """Ask the session options to record the assignment; False where ORT cannot."""
    try:
        options.add_session_config_entry(RECORD_CONFIG, "1")
    except Exception:
        return False
    return True


def read(session: Any, requested: str) -> Placement:
    """The placement of a session created with recording on."""
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        import onnxruntime as ort

        return Placement(
            requested,
            recorded=False,
            reason=f"onnxruntime {ort.__version__} does not report it; 1.24 and later do",
        )
    nodes = [
        (node.name, node.op_type, subgraph.ep_name)
        for subgraph in getter()
        for node in subgraph.get_nodes()
        if node.op_type not in ORT_ADDED_OPS
    ]
    return Placement(requested, recorded=True, nodes=nodes)


_PLACED = re.compile(r"(All nodes|Node\(s\)) placed on \[([^\]]+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3,}(\S+) \((.*)\)\s*$")


def from_log(log: str, requested: str, model_nodes: list[tuple[str, str]]) -> Placement:
    """The placement ONNX Runtime's verbose `Node placements` log states, for a model whose
    nodes are `model_nodes` [(name, op_type)]."""
    listed: dict[str, list[tuple[str, str]]] = {}
    everything: str | None = None
    current = None
    for line in log.splitlines():
        placed = _PLACED.search(line)
        if placed:
            current = placed.group(2)
            listed.setdefault(current, [])
            if placed.group(1) == "All nodes":
                everything = current
            continue
        node = _NODE.search(line)
        if node and current is not None:
            listed[current].append((node.group(2), node.group(1)))
    if not listed:
        return Placement(requested, recorded=False, reason="ONNX Runtime logged no placement")
    if everything is not None:
        return Placement(requested, True, [(n, op, everything) for n, op in model_nodes])
    off = [(name, op, ep) for ep, nodes in listed.items() if ep != requested for name, op in nodes]
    off_names = {name for name, _, _ in off}
    on = [(n, op, requested) for n, op in model_nodes if n not in off_names]
    return Placement(requested, True, on + [n for n in off if n[1] not in ORT_ADDED_OPS])


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """What the process writes to file descriptor 2 (ONNX Runtime's log) within the block."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield lambda: (sink.seek(0), sink.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
