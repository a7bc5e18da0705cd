"""Exact mode's wave cache: stage-boundary tensors, one array per batch, within a byte budget.

What stays cached is decided by a `CachePlanner`, which the engine is given (`GreedyPlanner`
by default; tests and callers may pass their own). The engine asks it two things:

- `plan_stage`: at a stage's first batch, once the batch sizes are known, which of the
  stage's outputs to drop because at full size they would not fit beside what stays cached,
  and which spent inputs to hold on to instead as anchors of a cheap recomputation;
- `victim`: batch by batch, which kept output to drop when the cache is over budget anyway.

With `free_spent`, a cached input that no later stage reads is freed batch by batch as the
stage runs, so the outputs the stage keeps can take its place. A dropped tensor is recomputed
by the later stages that read it (bnsurgery.measure.plan), so no choice changes a statistic:
only the work and the memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnsurgery.measure.plan import Plan

DEFAULT_MEMORY_BUDGET = 2 * 1024**3


class TensorCache:
    """Stage-boundary tensors, one array per batch, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.tensors: dict[str, list[np.ndarray]] = {}
        self.bytes = 0
        self.peak = 0

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def add(self, name: str, arrays: list[np.ndarray]) -> None:
        self.tensors[name] = arrays
        self.bytes += sum(a.nbytes for a in arrays)
        self.peak = max(self.peak, self.bytes)

    def nbytes(self, name: str) -> int:
        return sum(a.nbytes for a in self.tensors[name] if a is not None)

    def release(self, name: str, batch: int) -> None:
        """Free one batch's array of a tensor that no later stage reads."""
        arrays = self.tensors[name]
        if arrays[batch] is not None:
            self.bytes -= arrays[batch].nbytes
            arrays[batch] = None  # type: ignore[call-overload]

    def evict(self, name: str) -> None:
        arrays = self.tensors.pop(name, None)
        if arrays is not None:
            self.bytes -= sum(a.nbytes for a in arrays if a is not None)


class CachePlanner(Protocol):
    """What exact mode keeps in its wave cache (see the module docstring)."""

    @property
    def free_spent(self) -> bool:
        """Free each batch's array of a cached input no later stage reads once it has run."""
        ...

    def plan_stage(
        self,
        plan: Plan,
        projected: Mapping[str, int],
        cache: TensorCache,
        spent: Sequence[str],
        stage: int,
        budget: int,
    ) -> tuple[list[str], dict[str, int]]:
        """(outputs to drop, spent inputs to hold with the last stage each is needed by), for
        a stage whose outputs take `projected` bytes at full size."""
        ...

    def victim(
        self, plan: Plan, kept: Mapping[str, list[np.ndarray]], cache: TensorCache, stage: int
    ) -> str:
        """The kept output to drop now: the cache is over budget. `kept` lists the latest
        producers first."""
        ...


@dataclass(frozen=True)
class GreedyPlanner:
    """Drops the tensors that are cheapest to recompute, in nodes.

    `plan_ahead=False` leaves every choice to the batch-by-batch `victim`; `free_spent=False`
    holds spent inputs to the end of their stage.
    """

    plan_ahead: bool = True
    free_spent: bool = True

    def plan_stage(
        self,
        plan: Plan,
        projected: Mapping[str, int],
        cache: TensorCache,
        spent: Sequence[str],
        stage: int,
        budget: int,
    ) -> tuple[list[str], dict[str, int]]:
        """Which of a stage's outputs to drop when, at full size (`projected` bytes), they would not
        fit beside what stays cached; and which spent inputs to hold on to instead, each with the
        stage up to which it is needed.

        A dropped tensor is recomputed by the later stages that read it. Holding a spent input of
        this stage can make that recomputation a few nodes instead of a path back towards the data:
        on ResNet-50 at 512 samples, a block's 1.6 GB conv3 output and its 1.6 GB shortcut do not
        fit in 2 GB together, but the shortcut and the 0.4 GB conv2 output do, and conv3's output
        is then one BN, ReLU and 1x1 convolution away. Greedy: drop the cheapest output to
        recompute (in nodes) until the rest fits; an anchor is held only when that still fits.
        """
        if not self.plan_ahead:
            return [], {}
        staying = {n for n in cache.tensors if plan.last_use.get(n, -1) > stage}
        fixed = sum(cache.nbytes(n) for n in staying)
        keep = dict(projected)
        spare = {n: cache.nbytes(n) for n in spent}
        held: dict[str, int] = {}  # spent inputs held, with their bytes
        anchors: dict[str, int] = {}
        drops: list[str] = []

        def total() -> int:
            return fixed + sum(keep.values()) + sum(held.values())

        while keep and total() > budget:
            best: tuple[int, str, set[str]] | None = None
            for name in reversed(list(keep)):  # ties go to the earliest producer
                others = staying | set(held) | (set(keep) - {name})
                nodes = plan.recompute([name], others | set(spare), set())
                need = {
                    a for a in set(spare) - set(held) if any(a in plan.inputs[i] for i in nodes)
                }
                if need and total() - keep[name] + sum(spare[a] for a in need) > budget:
                    nodes, need = plan.recompute([name], others, set()), set()
                if best is None or len(nodes) < best[0]:
                    best = (len(nodes), name, need)
            assert best is not None
            _, name, need = best
            drops.append(name)
            del keep[name]
            for a in need:
                held[a] = spare[a]
        # each held input is needed up to the last stage that recomputes from it
        available = staying | set(keep) | set(held)
        for name in drops:
            for i in plan.recompute([name], available, set()):
                for a in set(held) & set(plan.inputs[i]):
                    anchors[a] = max(anchors.get(a, -1), plan.last_use.get(name, -1))
        return drops, anchors

    def victim(
        self, plan: Plan, kept: Mapping[str, list[np.ndarray]], cache: TensorCache, stage: int
    ) -> str:
        """The kept tensor a later stage can recompute with the fewest nodes from what stays cached
        (a BN input one convolution away from a block input that stays, rather than that block
        input, whose recomputation may reach back to the data); ties go to the earliest producer."""
        staying = {n for n in cache.tensors if plan.last_use.get(n, -1) > stage}

        def cost(name: str) -> int:
            return len(plan.recompute([name], staying | (set(kept) - {name}), set()))

        return min(reversed(list(kept)), key=cost)  # kept runs latest producer first
