"""Option values a command cannot use are refused by the option itself: exit 2, one line."""

from __future__ import annotations

import pytest
from conftest import SAMPLES

SAMPLE = SAMPLES / "digits_cnn.onnx"


@pytest.mark.parametrize("command", ["compare", "validate"])
def test_negative_seed_is_refused(cli, command: str) -> None:
    """Found by fuzzing the options: numpy's ValueError came out as an unforeseen error."""
    code, _, err = cli(command, SAMPLE, "--seed", "-1")
    assert code == 2 and "--seed" in err and len(err.strip().splitlines()) == 1
