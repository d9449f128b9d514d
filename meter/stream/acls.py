"""The ACLs each meter role needs on a Kafka cluster with an authorizer: least privilege.

Found by experiment on Apache Kafka 4.4.0 with the ``StandardAuthorizer``: from the full
set, each ACL taken away alone stops the role it belongs to (``tests/integration/test_acls.py``
takes a representative one of each kind away and sees the command or worker refused,
naming that ACL).  Kafka's implied operations keep the list short: ``Read`` and ``Write``
on a topic grant ``Describe`` (metadata, ListOffsets); ``Read`` on a group grants
``Describe`` (FindCoordinator, OffsetFetch); ``Write`` on any topic grants the idempotent
producer's ``IdempotentWrite`` on the cluster (Kafka 3.0 and later).  meter uses no
transactions, so it needs no transactional id.

Pure: names and operations only; the README's "Access control" table is this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meter.stream.config import Topics

_DEFAULT: Final = Topics()

#: The roles, as the commands that play them.
ROLES: Final = ("worker", "send", "report", "audit")


@dataclass(frozen=True, slots=True)
class Acl:
    """ALLOW ``operation`` on the ``resource`` (``topic`` or ``group``) named ``name``."""

    resource: str
    name: str
    operation: str
    #: When the role uses it, if not always.
    when: str = ""


_CREATE: Final = "the first start, when meter creates its topics (not when an administrator does)"
_FORWARD: Final = "events on another partition than their tenant's home (partition counts differ)"
_STATE: Final = "with --state-dir (snapshots for workers on a new host)"
_LATE: Final = "late events for a closed month"


def worker_acls(topics: Topics, group: str = "meter", *, create: bool = True) -> list[Acl]:
    """What ``meter worker`` needs.  ``create=False``: its topics exist already."""
    t = topics
    reads = [t.jobs, t.by_tenant, t.changelog, t.snapshots, t.clock, t.reports]
    writes = {
        t.by_tenant: _FORWARD,
        t.changelog: "",
        t.snapshots: _STATE,
        t.clock: "",
        t.usage: "",
        t.corrections: _LATE,
        t.rejected: "",
        t.reports: "",
        t.license: "",
        t.license_corrections: _LATE,
    }
    everything = [
        t.jobs, t.by_tenant, t.changelog, t.snapshots, t.clock, t.usage, t.corrections,
        t.rejected, t.reports, t.license, t.license_corrections,
    ]  # fmt: skip
    acls = [Acl("group", group, "Read")]
    for name in everything:
        if name in reads:
            acls.append(Acl("topic", name, "Read", _STATE if name == t.snapshots else ""))
        if name in writes:
            acls.append(Acl("topic", name, "Write", writes[name]))
        acls.append(Acl("topic", name, "DescribeConfigs", "the check of its topics at start"))
        if create:
            acls.append(Acl("topic", name, "Create", _CREATE))
    return acls


def send_acls(jobs: str = _DEFAULT.jobs) -> list[Acl]:
    """What ``meter send`` needs: it writes the job events, nothing else."""
    return [Acl("topic", jobs, "Write")]


def report_acls(usage: str = _DEFAULT.usage, license_: str = _DEFAULT.license) -> list[Acl]:
    """What ``meter report`` needs: it reads both views and their corrections."""
    names = [usage, f"{usage}.corrections", license_, f"{license_}.corrections"]
    return [Acl("topic", name, "Read") for name in names]


def audit_acls(
    jobs: str = _DEFAULT.jobs, usage: str = _DEFAULT.usage, license_: str = _DEFAULT.license
) -> list[Acl]:
    """What ``meter audit`` needs: the raw events and what ``meter report`` reads."""
    return [Acl("topic", jobs, "Read"), *report_acls(usage, license_)]


def role_acls(role: str, topics: Topics, group: str = "meter", *, create: bool = True) -> list[Acl]:
    """The ACLs of ``role`` (one of :data:`ROLES`) with these topic names."""
    if role == "worker":
        return worker_acls(topics, group, create=create)
    if role == "send":
        return send_acls(topics.jobs)
    if role == "report":
        return report_acls(topics.usage, topics.license)
    if role == "audit":
        return audit_acls(topics.jobs, topics.usage, topics.license)
    raise ValueError(f"unknown role {role!r}; one of {ROLES}")
