"""Every graph pattern the tests use, built in one place with onnx.helper, and the runner.

Builders are deterministic (seeded numpy RNG) and return a model that passes
`onnx.checker.check_model(full_check=True)`, unless their name says the model is broken. Nodes
have names ("conv", "bn", ...) so tests can ask the fold report about them. BN statistics are
realistic: var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta and mean ~ N(0, 0.5).

The runner executes a model with ONNX Runtime CPU at ORT_DISABLE_ALL, or with
onnx.reference.ReferenceEvaluator when ORT cannot run it (fp64 Conv, bf16, opset 6); a pair of
models is always run by the same engine.

The builders live in one module per family (build: the building blocks; forward and backward:
the fold patterns; topology: sharing and parameter sources; variants: opsets and dtypes;
scopes: subgraphs and functions; faulty: broken models; running: inspection and the runner).
This package re-exports every one of them, so a test writes `import models as M` and
`M.conv_bn()` without knowing the family.
"""

from .backward import (
    affine_before_conv as affine_before_conv,
)
from .backward import (
    backward_shared_weight as backward_shared_weight,
)
from .backward import (
    bn_conv as bn_conv,
)
from .backward import (
    bn_flatten_gemm as bn_flatten_gemm,
)
from .backward import (
    bn_gemm as bn_gemm,
)
from .backward import (
    bn_reshape_matmul as bn_reshape_matmul,
)
from .backward import (
    bn_reshape_rows_matmul as bn_reshape_rows_matmul,
)
from .backward import (
    bn_two_convs as bn_two_convs,
)
from .backward import (
    conv_bn_conv as conv_bn_conv,
)
from .backward import (
    gap_bn_flatten_gemm as gap_bn_flatten_gemm,
)
from .build import (
    BF16 as BF16,
)
from .build import (
    BOOL as BOOL,
)
from .build import (
    F16 as F16,
)
from .build import (
    F32 as F32,
)
from .build import (
    F64 as F64,
)
from .build import (
    I64 as I64,
)
from .build import (
    NP_DTYPE as NP_DTYPE,
)
from .build import (
    Stats as Stats,
)
from .build import (
    _conv_bn_w as _conv_bn_w,
)
from .build import (
    bn_inits as bn_inits,
)
from .build import (
    bn_node as bn_node,
)
from .build import (
    bn_stats as bn_stats,
)
from .build import (
    conv_out_size as conv_out_size,
)
from .build import (
    init as init,
)
from .build import (
    make as make,
)
from .build import (
    rng as rng,
)
from .build import (
    vi as vi,
)
from .build import (
    weight as weight,
)
from .faulty import (
    bad_statistics as bad_statistics,
)
from .faulty import (
    checker_failing as checker_failing,
)
from .faulty import (
    fp16_overflow as fp16_overflow,
)
from .faulty import (
    ort_crashing_bn as ort_crashing_bn,
)
from .faulty import (
    wrong_shape_params as wrong_shape_params,
)
from .forward import (
    bn_bn as bn_bn,
)
from .forward import (
    bn_bn_first_is_output as bn_bn_first_is_output,
)
from .forward import (
    conv_affine as conv_affine,
)
from .forward import (
    conv_bn as conv_bn,
)
from .forward import (
    conv_bn_bn as conv_bn_bn,
)
from .forward import (
    conv_const_first as conv_const_first,
)
from .forward import (
    conv_transpose_bn as conv_transpose_bn,
)
from .forward import (
    convt_affine as convt_affine,
)
from .forward import (
    depthwise_conv_bn as depthwise_conv_bn,
)
from .forward import (
    gemm_affine as gemm_affine,
)
from .forward import (
    gemm_bn as gemm_bn,
)
from .forward import (
    matmul_3d_bn as matmul_3d_bn,
)
from .forward import (
    matmul_add_full_bias_bn as matmul_add_full_bias_bn,
)
from .forward import (
    matmul_bn as matmul_bn,
)
from .running import (
    TOLERANCE as TOLERANCE,
)
from .running import (
    all_nodes as all_nodes,
)
from .running import (
    assert_equivalent as assert_equivalent,
)
from .running import (
    count_op as count_op,
)
from .running import (
    initializer as initializer,
)
from .running import (
    max_error as max_error,
)
from .running import (
    node_named as node_named,
)
from .running import (
    output_dtype as output_dtype,
)
from .running import (
    random_feeds as random_feeds,
)
from .running import (
    run_ort as run_ort,
)
from .running import (
    run_pair as run_pair,
)
from .running import (
    run_reference as run_reference,
)
from .scopes import (
    bn_in_branch_after_outer_conv as bn_in_branch_after_outer_conv,
)
from .scopes import (
    conv_out_read_by_subgraph as conv_out_read_by_subgraph,
)
from .scopes import (
    function_bn as function_bn,
)
from .scopes import (
    if_bn as if_bn,
)
from .scopes import (
    loop_bn as loop_bn,
)
from .scopes import (
    scan_bn as scan_bn,
)
from .scopes import (
    weight_shared_with_subgraph as weight_shared_with_subgraph,
)
from .topology import (
    bn_relu as bn_relu,
)
from .topology import (
    conv_bn_relu as conv_bn_relu,
)
from .topology import (
    conv_graph_output as conv_graph_output,
)
from .topology import (
    conv_two_consumers as conv_two_consumers,
)
from .topology import (
    params_from_constants as params_from_constants,
)
from .topology import (
    params_graph_inputs as params_graph_inputs,
)
from .topology import (
    params_overridable as params_overridable,
)
from .topology import (
    relu_between as relu_between,
)
from .topology import (
    shared_bias as shared_bias,
)
from .topology import (
    shared_bn_params as shared_bn_params,
)
from .topology import (
    shared_weights as shared_weights,
)
from .variants import (
    bn_extra_outputs as bn_extra_outputs,
)
from .variants import (
    conv_bn_typed as conv_bn_typed,
)
from .variants import (
    fp16_conv_fp32_params as fp16_conv_fp32_params,
)
from .variants import (
    fp16_tiny_var as fp16_tiny_var,
)
from .variants import (
    opset6_bn as opset6_bn,
)
from .variants import (
    spatial0_bn as spatial0_bn,
)
from .variants import (
    training_mode_bn as training_mode_bn,
)
