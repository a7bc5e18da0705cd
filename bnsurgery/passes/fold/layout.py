"""Which BN channel each output channel of a linear op lands on, through Reshape/Transpose.

A chain such as MatMul -> Reshape -> Transpose -> BatchNormalization only moves elements: the
BN's channel axis (1) may still be a function of the linear op's channel axis (MatMul's last
axis, Conv's axis 1). When it is, the BN is a per-channel affine of the linear op's output and
folds into it with the BN's vectors gathered through that function. `channel_map` proves it
by moving an array of channel indices through the chain with numpy, exactly as the runtime
moves the data, and checking that every position of one op channel lands on one BN channel.

The batch axis may be dynamic: then every step must keep samples apart (a Reshape that keeps
axis 0 with `0` or `-1`, a Transpose that leaves axis 0 in place, Flatten with axis 1), and
one sample stands for all. Anything not proven raises LayoutError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUT_OPS = frozenset({"Identity", "Reshape", "Transpose", "Flatten"})
MAX_ELEMENTS = 1 << 22  # an index array this large is still cheap to move through the chain


class LayoutError(Exception):
    """The chain does not provably map op channels onto BN channels."""


@dataclass(frozen=True)
class LayoutStep:
    """One op of the chain with its constant parameters resolved."""

    op: str
    target: tuple[int, ...] | None = None  # Reshape
    allowzero: bool = False  # Reshape
    perm: tuple[int, ...] | None = None  # Transpose (None: reverse the axes)
    axis: int = 1  # Flatten


def channel_map(
    steps: list[LayoutStep], shape: tuple[int | None, ...], axis: int, bn_channels: int
) -> np.ndarray:
    """For each index along `axis` of the op's output (of `shape`), the BN channel it reaches.

    `steps` run from the op's output to the BN's input. Raises LayoutError when a shape is
    unknown, the chain is not provably per-sample with a dynamic batch, the result's axis 1
    does not have `bn_channels` entries, or one op channel reaches two BN channels.
    """
    if not shape or any(d is None for d in shape[1:]) or not 0 <= axis < len(shape):
        raise LayoutError("the linear op's output shape is not known")
    if _per_sample(steps, shape):
        concrete = (1, *shape[1:])
    elif shape[0] is not None:
        concrete = shape
    else:
        raise LayoutError("the chain mixes samples of a dynamic batch")
    dims = tuple(int(d) for d in concrete)  # type: ignore[arg-type]
    if int(np.prod(dims)) > MAX_ELEMENTS:
        raise LayoutError("the tensor is too large to trace")
    index = np.broadcast_to(_along(dims, axis), dims)
    for step in steps:
        index = _apply(step, index)
    if index.ndim < 2 or index.shape[1] != bn_channels:
        raise LayoutError(
            f"the BN input has shape {list(index.shape)}, not {bn_channels} channels on axis 1"
        )
    bn_channel = np.broadcast_to(_along(index.shape, 1), index.shape).ravel()
    op_channel = index.ravel()
    mapping = np.full(dims[axis], -1, dtype=np.int64)
    mapping[op_channel] = bn_channel
    if (mapping < 0).any() or (mapping[op_channel] != bn_channel).any():
        raise LayoutError("an op channel is spread over several BN channels")
    return mapping


def _along(shape: tuple[int, ...], axis: int) -> np.ndarray:
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.arange(shape[axis], dtype=np.int64).reshape(view)


def _apply(step: LayoutStep, value: np.ndarray) -> np.ndarray:
    if step.op == "Identity":
        return value
    if step.op == "Transpose":
        perm = step.perm if step.perm is not None else tuple(reversed(range(value.ndim)))
        if sorted(perm) != list(range(value.ndim)):
            raise LayoutError(f"Transpose perm {list(perm)} does not fit rank {value.ndim}")
        return np.transpose(value, perm)
    if step.op == "Flatten":
        axis = step.axis + value.ndim if step.axis < 0 else step.axis
        if not 0 <= axis <= value.ndim:
            raise LayoutError(f"Flatten axis {step.axis} does not fit rank {value.ndim}")
        rows = int(np.prod(value.shape[:axis]))
        return value.reshape(rows, -1) if value.size else value.reshape(rows, 0)
    assert step.op == "Reshape" and step.target is not None
    return value.reshape(_resolve(step, value.shape))


def _resolve(step: LayoutStep, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Reshape target with 0 (copy the input's dim) and -1 (the rest) worked out."""
    assert step.target is not None
    if step.allowzero and 0 in step.target:
        raise LayoutError("Reshape with allowzero and a zero dim")
    dims = []
    for i, d in enumerate(step.target):
        if d == 0:
            if i >= len(shape):
                raise LayoutError("Reshape copies a dim the input does not have")
            dims.append(shape[i])
        else:
            dims.append(d)
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise LayoutError(f"Reshape target {list(step.target)} is not valid")
    known = int(np.prod([d for d in dims if d != -1]))
    total = int(np.prod(shape))
    if -1 in dims:
        if known == 0 or total % known:
            raise LayoutError(f"Reshape target {list(step.target)} does not fit {list(shape)}")
        dims[dims.index(-1)] = total // known
    elif known != total:
        raise LayoutError(f"Reshape target {list(step.target)} does not fit {list(shape)}")
    return tuple(dims)


def _per_sample(steps: list[LayoutStep], shape: tuple[int | None, ...]) -> bool:
    """Every step keeps axis 0 as the batch axis and moves nothing across it, so one sample
    behaves as any other (shapes past axis 0 are static)."""
    rest = [int(d) for d in shape[1:]]  # type: ignore[arg-type]
    for step in steps:
        if step.op == "Identity":
            continue
        if step.op == "Transpose":
            if step.perm is None or not step.perm or step.perm[0] != 0:
                return False
            if sorted(step.perm) != list(range(len(rest) + 1)):
                return False
            rest = [rest[p - 1] for p in step.perm[1:]]
        elif step.op == "Flatten":
            if step.axis != 1:
                return False
            rest = [int(np.prod(rest))]
        else:
            target = step.target or ()
            if not target or target[0] not in (0, -1) or step.allowzero:
                return False
            tail = list(target[1:])
            if any(d == -1 for d in tail):
                return False
            tail = [rest[i] if d == 0 and i < len(rest) else d for i, d in enumerate(tail, 0)]
            if any(d <= 0 for d in tail) or int(np.prod(tail)) != int(np.prod(rest)):
                return False
            rest = tail
    return True
