"""Command-line options built from configuration dataclasses (adaption_fx.app.options): the
help and defaults a user sees are the dataclass's own."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from adaption_fx.app.options import add_dataclass_options, field_docs
from adaption_fx.training.arguments import TrainingArguments


@dataclasses.dataclass
class Example:
    """An example.

    Args:
        count: how many, at least one. A second
            line of the same entry.
        mode: ``"fast"`` or ``"slow"``.
        limit: an upper bound; None: no bound.
        verbose: say more.

    Returns:
        nothing (a section after Args ends it).
    """

    count: int = 3
    mode: Literal["fast", "slow"] = "fast"
    limit: float | None = None
    verbose: bool = False


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x", argument_default=argparse.SUPPRESS)
    add_dataclass_options(parser, Example, **kwargs)
    return parser


def test_field_docs_read_the_args_section():
    assert field_docs(Example) == {
        "count": "how many, at least one. A second line of the same entry.",
        "mode": '``"fast"`` or ``"slow"``.',
        "limit": "an upper bound; None: no bound.",
        "verbose": "say more.",
    }


def test_options_take_help_defaults_types_and_choices_from_the_dataclass():
    parser = _parser()
    text = parser.format_help()
    assert "how many, at least one. A second line of the same entry (default: 3)" in " ".join(
        text.split()
    )
    assert "{fast,slow}" in text and "fast or slow (default: fast)" in " ".join(text.split())
    assert "if not given: no bound" in " ".join(text.split())
    args = parser.parse_args(["--count", "5", "--mode", "slow", "--limit", "2.5", "--verbose"])
    assert vars(args) == {"count": 5, "mode": "slow", "limit": 2.5, "verbose": True}
    assert vars(parser.parse_args([])) == {}  # nothing given: the dataclass decides


def test_a_default_changed_in_the_dataclass_changes_the_help():
    changed = dataclasses.make_dataclass(
        "Changed", [("count", int, dataclasses.field(default=7))], bases=(Example,)
    )
    changed.__doc__ = Example.__doc__
    parser = argparse.ArgumentParser(prog="x")
    add_dataclass_options(parser, changed, only=("count",))
    assert "(default: 7)" in parser.format_help()


def test_given_types_validate_with_argparse_messages(capsys):
    def positive(text: str) -> int:
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
        return int(text)

    with pytest.raises(SystemExit):
        _parser(types={"count": positive}).parse_args(["--count", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_finetune_help_states_every_training_default_once():
    help_text = subprocess.run(
        [sys.executable, "-m", "adaption_fx", "finetune", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(help_text.split())
    for field in dataclasses.fields(TrainingArguments):
        flag = "--" + field.name.replace("_", "-")
        assert flag in flat, flag
        if field.default is None or field.default is False:
            continue  # the entry says what happens when it is not given
        value = f"{field.default:g}" if isinstance(field.default, float) else field.default
        assert f"(default: {value})" in flat, (flag, value)


def test_the_command_line_module_does_not_load_torch():
    code = "import sys, adaption_fx.app.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
