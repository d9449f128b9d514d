"""``--replication-factor`` and ``--min-insync-replicas`` (issue 20, part 3)."""

from __future__ import annotations

import pytest

from meter.cli import build_parser
from meter.cli.common import stream_config


@pytest.mark.parametrize("command", ["worker", "run"])
def test_not_given_they_are_chosen_for_the_cluster(command: str) -> None:
    args = build_parser().parse_args([command])
    config = stream_config(args)
    assert (config.replication_factor, config.min_insync_replicas) == (None, None)


@pytest.mark.parametrize("command", ["worker", "run"])
def test_given_they_reach_the_config(command: str) -> None:
    args = build_parser().parse_args(
        [command, "--replication-factor", "1", "--min-insync-replicas", "1"]
    )
    config = stream_config(args)
    assert (config.replication_factor, config.min_insync_replicas) == (1, 1)


def test_zero_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["worker", "--replication-factor", "0"])
    assert exit_.value.code == 2
    assert "--replication-factor: expected a whole number above 0, got '0'" in (
        capsys.readouterr().err
    )
