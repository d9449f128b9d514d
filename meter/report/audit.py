"""Compare what the raw events say with what the meter published, in both views.  Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meter.domain import UsageRow
from meter.domain.license import LicenseRow


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


#: What a license row says, in this order: workloads, new, rental, points, new points.
LICENSE_FIELDS = ("workloads", "new", "rental", "points", "new_points")
_NONE = (0, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class LicenseDifference:
    month: str
    tenant_id: str
    workload_type: str
    expected: tuple[int, int, int, int, int]  # per the raw events, by the vendor's rules
    published: tuple[int, int, int, int, int]  # per the license topic and its corrections

    def __str__(self) -> str:
        def say(t: tuple[int, ...]) -> str:
            return ", ".join(
                f"{v} {k.replace('_', ' ')}" for k, v in zip(LICENSE_FIELDS, t, strict=True)
            )

        return (
            f"license {self.month} {self.tenant_id} {self.workload_type}: events say "
            f"{say(self.expected)}; published {say(self.published)}"
        )


def compare_license(
    expected: Iterable[LicenseRow], published: Iterable[LicenseRow]
) -> list[LicenseDifference]:
    """Every (month, tenant, type) whose license row differs, missing rows as zeros."""

    def keyed(rows: Iterable[LicenseRow]) -> dict[tuple[str, str, str], tuple[int, ...]]:
        return {
            (r.month, r.tenant_id, r.workload_type): (
                r.workloads,
                r.new,
                r.rental,
                r.points,
                r.new_points,
            )
            for r in rows
        }

    want, got = keyed(expected), keyed(published)
    return [
        LicenseDifference(*key, want.get(key, _NONE), got.get(key, _NONE))  # type: ignore[arg-type]
        for key in sorted(set(want) | set(got))
        if want.get(key, _NONE) != got.get(key, _NONE)
    ]
