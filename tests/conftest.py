"""Hooks for the whole suite."""

from __future__ import annotations

from typing import Any

import pytest

#: Test files whose tests share one costly module fixture and so must run in one pytest-xdist
#: process: the three-broker cluster of the fault tests (three JVMs).  ``--dist loadgroup``
#: with ``xdist_group`` would say this, but with pytest 9.2 it silently stops grouping
#: (pytest-xdist issue 1386), so the scheduler is made here.
TOGETHER = frozenset({"tests/integration/test_cluster_faults.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """For ``-n N`` (``--dist load``, the default): each test its own unit of work, as
    ``load`` schedules them, except that a file of :data:`TOGETHER` is one unit."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling  # only with -n

    class TogetherScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in TOGETHER else nodeid

    return TogetherScheduling(config, log)
