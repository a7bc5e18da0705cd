"""Folding into Conv and ConvTranspose.

Forward (the affine follows the op): the output channels' weights are scaled and the shift
joins the bias, for Conv and ConvTranspose alike. Backward (the affine precedes a Conv): the
input channels' weights are scaled and the shift, summed over the kernel, joins the bias; this
is exact only when the Conv pads nothing (padding would meet the shift at the borders), and a
backward fold into ConvTranspose is never exact at the borders, so it is refused.
"""

from __future__ import annotations

import onnx

from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.plan import Plan, Refusal, Site, attr


def forward(ctx: ScopeContext, site: Site, conv: onnx.NodeProto) -> Plan:
    w, b = ctx.weight(conv, 1), ctx.optional_const(conv, 2)
    s, t = site.channels(w.shape[0], f"Conv '{conv.name}'")
    new_w, new_b = fm.conv_forward(w, b, s, t)  # W' is cast block by block
    return Plan(conv, ctx.writes(conv, (1, new_w, w.dtype, "W"), (2, new_b, w.dtype, "B")))


def transpose_forward(ctx: ScopeContext, site: Site, conv: onnx.NodeProto) -> Plan:
    w, b = ctx.weight(conv, 1), ctx.optional_const(conv, 2)
    group = int(attr(conv, "group", 1))
    s, t = site.channels(w.shape[1] * group, f"ConvTranspose '{conv.name}'")
    new_w, new_b = fm.conv_transpose_forward(w, b, s, t, group)
    return Plan(conv, ctx.writes(conv, (1, new_w, w.dtype, "W"), (2, new_b, w.dtype, "B")))


def backward(ctx: ScopeContext, site: Site, conv: onnx.NodeProto) -> Plan:
    w, b = ctx.weight(conv, 1), ctx.optional_const(conv, 2)
    _require_no_padding(conv, w.shape[2:])
    group = int(attr(conv, "group", 1))
    s, t = site.channels(w.shape[1] * group, f"Conv '{conv.name}' input")
    new_w, new_b = fm.conv_backward(w, b, s, t, group)
    return Plan(conv, ctx.writes(conv, (1, new_w, w.dtype, "W"), (2, new_b, w.dtype, "B")))


def _require_no_padding(conv: onnx.NodeProto, kernel: tuple[int, ...]) -> None:
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(k != 1 for k in kernel):
        raise Refusal("padding-breaks-backward-fold", f"Conv '{conv.name}' auto_pad={auto_pad}")
    pads = attr(conv, "pads", [])
    if auto_pad in ("NOTSET", "") and any(int(p) != 0 for p in pads):
        raise Refusal("padding-breaks-backward-fold", f"Conv '{conv.name}' pads={list(pads)}")
