"""Public import path of the test-suite assertions (`from bnsurgery.testing import ...`); they
live in bnsurgery.integrations.testing."""

from bnsurgery.integrations.testing import (
    HEALTH_CHECKS,
    assert_bn_healthy,
    assert_fold_equivalent,
)

__all__ = ["HEALTH_CHECKS", "assert_bn_healthy", "assert_fold_equivalent"]
