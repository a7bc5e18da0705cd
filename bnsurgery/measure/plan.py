"""The dataflow plan of exact re-estimation: waves of BNs and stages of the main graph.

BNs with no path between them are measured in the same pass: a BN's wave is one more than the
newest wave upstream of it. Stage s holds the nodes whose newest upstream BN belongs to wave s;
stage s runs once over the data, from cached stage-boundary tensors, and measures the inputs
of wave s+1. Only nodes that lead to a measured tensor ever run. The plan also answers what
must be recomputed when a tensor is not cached (`recompute`), and which constant-producing
nodes a set of nodes reads (`static_closure`).
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

import onnx

from bnsurgery.data import model_inputs
from bnsurgery.errors import BadInputError
from bnsurgery.measure.targets import BnTarget
from bnsurgery.model.graph import node_inputs_with_implicit


@dataclass
class Plan:
    """Stages of the model's main graph for a set of targets."""

    nodes: list[onnx.NodeProto]  # the main graph's nodes, in order (indices below)
    dynamic: list[bool]  # whether a node depends on the model inputs
    stage: list[int]  # the stage a node runs in
    needed: set[int]  # the dynamic nodes that lead to a measured tensor
    producer: dict[str, int]  # tensor -> the node that outputs it
    runtime_inputs: dict[str, onnx.ValueInfoProto]  # the inputs DATA feeds
    waves: int
    last_use: dict[str, int]  # tensor -> the last stage that reads it
    static_producer: dict[str, int]  # constant-producing nodes, by output
    inputs: list[list[str]]  # each node's inputs, implicit (subgraph) ones included

    @classmethod
    def build(
        cls, model: onnx.ModelProto, targets: list[BnTarget], single_wave: bool = False
    ) -> Plan:
        """The plan of `model`'s main graph for `targets`; sets each target's `wave` (all 1
        with `single_wave`: every BN measured on the model as it is)."""
        graph = model.graph
        nodes = list(graph.node)
        runtime_inputs = {v.name: v for v in model_inputs(model)}
        by_node = {id(t.node): t for t in targets}
        dynamic_names = set(runtime_inputs)
        level: dict[str, int] = {}
        producer: dict[str, int] = {}
        dynamic, stage = [False] * len(nodes), [0] * len(nodes)
        inputs_of = [node_inputs_with_implicit(node) for node in nodes]
        for i, node in enumerate(nodes):
            inputs = inputs_of[i]
            dyn = any(n in dynamic_names for n in inputs)
            lvl = max((level.get(n, 0) for n in inputs), default=0)
            target = by_node.get(id(node))
            if target is not None:
                target.wave = 1 if single_wave else lvl + 1
                if not single_wave:
                    lvl = target.wave
            dynamic[i], stage[i] = dyn, lvl
            for out in node.output:
                if out:
                    producer[out] = i
                    level[out] = lvl
                    if dyn:
                        dynamic_names.add(out)
        if not all(t.x in dynamic_names for t in targets):
            constant = [t.key for t in targets if t.x not in dynamic_names]
            raise BadInputError(f"BN input does not depend on the model inputs: {constant[0]}")
        # only what leads to a measured tensor ever runs
        needed: set[int] = set()
        stack = [producer[t.x] for t in targets if t.x in producer]
        while stack:
            i = stack.pop()
            if i in needed or not dynamic[i]:
                continue
            needed.add(i)
            stack.extend(producer[n] for n in inputs_of[i] if n in producer)
        waves = max(t.wave for t in targets)
        last_use: dict[str, int] = {}
        for i in needed:
            for name in inputs_of[i]:
                if name in dynamic_names:
                    last_use[name] = max(last_use.get(name, -1), stage[i])
        for t in targets:  # measured in the run before the target's stage
            last_use[t.x] = max(last_use.get(t.x, -1), t.wave - 1)
        static_producer = {n: i for n, i in producer.items() if not dynamic[i]}
        return cls(
            nodes,
            dynamic,
            stage,
            needed,
            producer,
            runtime_inputs,
            waves,
            last_use,
            static_producer,
            inputs_of,
        )

    def recompute(
        self, wanted: Iterable[str], available: Container[str], run: set[int]
    ) -> set[int]:
        """The nodes beyond `run` that must run to produce `wanted` from the `available`
        tensors and the model inputs."""
        extra: set[int] = set()
        stack = [n for n in wanted if n in self.producer and self.dynamic[self.producer[n]]]
        while stack:
            name = stack.pop()
            i = self.producer[name]
            if i in run or i in extra or name in available:
                continue
            extra.add(i)
            stack.extend(
                n for n in self.inputs[i] if n in self.producer and self.dynamic[self.producer[n]]
            )
        return extra

    def static_closure(self, run: set[int]) -> set[int]:
        """Constant-producing nodes the run's nodes read (they run again in every part)."""
        found: set[int] = set()
        stack = [n for i in run for n in self.inputs[i]]
        while stack:
            name = stack.pop()
            i = self.static_producer.get(name)
            if i is None or i in found:
                continue
            found.add(i)
            stack.extend(self.inputs[i])
        return found
