"""A BatchNormalization as a foldable affine, and folding a BN forward into the BN before it.

`bn_affine` turns a BN site (model.sites) into its per-channel affine y = s*x + t in float64,
or refuses: training mode, per-activation statistics (spatial=0), parameters that are not
floating-point constants, bad statistics (NaN/Inf, negative variance), or an affine that is
not finite. A BN right after another foldable BN folds into that BN's scale and bias.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnsurgery.model.bn import affine, statistics_problem
from bnsurgery.model.sites import BnSite, float64_params
from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.plan import Plan, Refusal, Site


def bn_affine(site: BnSite) -> Site:
    """The BN's per-channel affine, or the Refusal that keeps it."""
    view = site.view()
    if view.training_mode or view.extra_outputs_used(lambda n: site.index.use_count(n) > 0):
        raise Refusal("training-mode", "BN normalises with batch statistics")
    if not view.spatial:
        raise Refusal("per-activation-stats", "spatial=0 keeps statistics per activation")
    values = site.param_values(view)
    problem = site.param_problem(view, values)
    if problem is not None:
        raise Refusal(*problem)
    params = float64_params(view, values, name=view.name or view.y)
    problem_text = statistics_problem(params, view.epsilon)
    if problem_text:
        raise Refusal("bad-statistics", problem_text)
    s, t = affine(params, view.epsilon)
    if not (np.isfinite(s).all() and np.isfinite(t).all()):
        raise Refusal("overflow", "the affine of this BN is not finite in float64")
    return Site(site.node, view.x, view.y, s, t)


def forward(ctx: ScopeContext, site: Site, bn: onnx.NodeProto) -> Plan:
    """Fold `site` into the scale and bias of the BN `bn` that produces its input."""
    try:
        bn_affine(BnSite(bn, ctx.index))
    except Refusal as refusal:
        raise Refusal("no-linear-neighbour", f"the BN before it stays ({refusal.reason})") from None
    gamma = ctx.index.constant(bn.input[1])
    beta = ctx.index.constant(bn.input[2])
    assert gamma is not None and beta is not None
    s, t = site.channels(gamma.shape[0], f"BatchNormalization '{bn.name}'")
    new_gamma, new_beta = fm.affine_forward(gamma, beta, s, t)
    return Plan(
        bn, ctx.writes(bn, (1, new_gamma, gamma.dtype, "scale"), (2, new_beta, beta.dtype, "B"))
    )
