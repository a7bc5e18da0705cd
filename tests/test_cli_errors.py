"""Library errors name the parameter at fault (`option="skip"`); the command line names its flag.

Every `option="..."` the library raises with must be a flag of some command (or a parameter only
the Python API has), so a misspelt option fails here rather than printing a flag that does not
exist."""

from __future__ import annotations

import inspect
import re

import pytest
from conftest import REPO, SAMPLES

import bnsurgery
from bnsurgery.cli.main import COMMAND_FLAGS, COMMANDS, OPTION_FLAGS, command_flags, error_message
from bnsurgery.cli.main import flag_for as cli_flag_for
from bnsurgery.errors import BadInputError
from bnsurgery.passes.reestimate import ReestimatePass
from bnsurgery.validation.gate import validate

CNN = SAMPLES / "digits_cnn.onnx"
# Parameters no command exposes, each with the public function that takes it.
API_ONLY = {
    "only": validate,
    "parity_opt_level": validate,
    "batch_form": ReestimatePass,
    "cache_planner": ReestimatePass,
}
OPTION_LITERAL = re.compile(r"""\boption=["']([A-Za-z_][A-Za-z0-9_]*)["']""")


def _options_raised() -> dict[str, list[str]]:
    """option name -> the files that raise with it, from every `option="..."` in bnsurgery/."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "bnsurgery").rglob("*.py")):
        for name in OPTION_LITERAL.findall(path.read_text()):
            found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def _every_flag() -> set[str]:
    return set().union(*(command_flags(name) for name in COMMANDS))


def test_the_scan_sees_the_options_the_validate_gate_raises_with() -> None:
    assert {"fail_on", "skip", "only"} <= set(_options_raised())


@pytest.mark.parametrize("option", sorted(_options_raised()))
def test_every_option_the_library_names_is_a_flag_of_some_command(option: str) -> None:
    if option in API_ONLY:
        assert option in inspect.signature(API_ONLY[option]).parameters
        return
    flag = cli_flag_for(option)
    assert flag in _every_flag(), (
        f"option={option!r} ({', '.join(_options_raised()[option])}) renders as {flag}, which "
        "no command has: fix the name or add it to cli.main.OPTION_FLAGS"
    )


def test_the_flag_tables_name_flags_that_exist() -> None:
    every = _every_flag()
    assert set(OPTION_FLAGS.values()) <= every
    for command, flags in COMMAND_FLAGS.items():
        assert set(flags.values()) <= command_flags(command), command


def test_flag_for_follows_the_default_rule_the_table_and_the_command() -> None:
    assert cli_flag_for("prior") == "--prior"
    assert cli_flag_for("fail_on") == "--fail-on"
    assert cli_flag_for("shapes") == "--shape"
    assert cli_flag_for("data") == "--data"
    assert cli_flag_for("data", "adapt") == "--target"


def test_a_library_error_inside_a_command_is_printed_with_its_flag(cli) -> None:
    code, out, err = cli("validate", CNN, "--skip", "no-such-check")
    assert code == 2 and out == ""
    assert err.startswith("bnsurgery: error: unknown check 'no-such-check' in --skip (known: ")
    assert len(err.strip().splitlines()) == 1


def test_the_python_api_names_the_parameter_instead() -> None:
    with pytest.raises(BadInputError) as raised:
        bnsurgery.validate(CNN, skip=["no-such-check"])
    assert raised.value.option == "skip"
    assert "unknown check 'no-such-check' in skip (" in str(raised.value)
    with pytest.raises(BadInputError) as raised:
        bnsurgery.validate(CNN, only=["no-such-check"])
    assert raised.value.option == "only"
    with pytest.raises(BadInputError) as raised:
        bnsurgery.validate(CNN, fail_on="info")
    assert raised.value.option == "fail_on"
    assert str(raised.value).startswith("fail_on must be one of error, warning")


def test_under_a_command_without_the_flag_the_parameter_is_named() -> None:
    """`bnsurgery run` sets options in a TOML file: there the key is the parameter's name."""
    error = BadInputError("{option} must be >= 0, got -1", option="prior")
    assert error_message(error, "reestimate") == "--prior must be >= 0, got -1"
    assert error_message(error, "run") == "prior must be >= 0, got -1"
    assert error_message(error, None) == "--prior must be >= 0, got -1"
    assert error_message(BadInputError("plain"), "fold") == "plain"
