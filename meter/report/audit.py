"""Compare what the raw events say with what the meter published.  Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meter.domain import UsageRow


@dataclass(frozen=True, slots=True)
class Difference:
    month: str
    tenant_id: str
    workload_type: str
    expected: tuple[int, int]  # (workloads, points) per the raw events
    published: tuple[int, int]  # per the usage topic and its corrections

    def __str__(self) -> str:
        return (
            f"{self.month} {self.tenant_id} {self.workload_type}: events say "
            f"{self.expected[0]} workloads / {self.expected[1]} points, published "
            f"{self.published[0]} / {self.published[1]}"
        )


def compare(expected: Iterable[UsageRow], published: Iterable[UsageRow]) -> list[Difference]:
    want = {(r.month, r.tenant_id, r.workload_type): (r.workloads, r.points) for r in expected}
    got = {(r.month, r.tenant_id, r.workload_type): (r.workloads, r.points) for r in published}
    return [
        Difference(*key, want.get(key, (0, 0)), got.get(key, (0, 0)))
        for key in sorted(set(want) | set(got))
        if want.get(key, (0, 0)) != got.get(key, (0, 0))
    ]
