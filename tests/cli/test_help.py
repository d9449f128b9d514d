"""Every flag and argument of every command says what it is for."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from meter.cli import build_parser


def parsers(
    parser: argparse.ArgumentParser, name: str = "meter"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def says_something(text: str | None) -> bool:
    """More than a default or an environment variable: ``[meter.reports]`` or
    ``(env METER_X)`` alone is not help."""
    return bool(re.search(r"[A-Za-z]", re.sub(r"\[[^]]*\]|\([^)]*\)", "", text or "")))


def test_every_flag_has_help() -> None:
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not says_something(action.help)
    ]
    assert not missing, missing
    assert not says_something("[meter.reports]")
    assert not says_something("(env METER_SASL_USERNAME)")


def test_every_command_has_help() -> None:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    assert all((h or "").strip() for h in helps.values()), helps
