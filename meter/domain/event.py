"""The job event contract (v1): decode, validate, and reject with a reason.

``parse(raw)`` returns an :class:`Event` or a :class:`Rejected`; it never
raises on bad input.  The contract is written down as JSON Schema in
``schemas/job-event.v1.schema.json``; a test proves both agree.
"""

from __future__ import annotations

import re
from typing import Final, Literal, get_args

import msgspec

from meter.domain.month import TimeError, utc_month

WorkloadType = Literal[
    "vm",
    "replica",
    "workstation",
    "server",
    "cloud_vm",
    "cloud_database",
    "cloud_file_share",
    "cloud_vpc",
]
License = Literal["rental", "subscription", "perpetual"]
Result = Literal["success", "warning", "failed"]

WORKLOAD_TYPES: Final[tuple[str, ...]] = get_args(WorkloadType)
LICENSES: Final[tuple[str, ...]] = get_args(License)
RESULTS: Final[tuple[str, ...]] = get_args(Result)
COUNTED_RESULTS: Final = frozenset({"success", "warning"})
#: Workload types whose rate depends on the tenant's license: ``license`` is required.
LICENSED_TYPES: Final = frozenset({"vm", "replica", "workstation", "server"})
EVENT_TYPE: Final = "meter.job.workload"
#: Largest event (bytes) the meter accepts; larger inputs are rejected as ``too_large``.
#: Events are ~300 bytes; Apache Kafka's default message limit is 1 MiB.
DEFAULT_MAX_EVENT_BYTES: Final = 64 * 1024


class _Data(msgspec.Struct, gc=False):
    tenant_id: str
    workload_id: str
    workload_type: WorkloadType
    result: Result
    license: License | msgspec.UnsetType = msgspec.UNSET


class _Envelope(msgspec.Struct, gc=False):
    specversion: Literal["1.0"]
    id: str
    source: str
    type: Literal["meter.job.workload"]
    time: str
    data: _Data


_decoder: Final = msgspec.json.Decoder(_Envelope)
_BOM: Final = b"\xef\xbb\xbf"

_TENANT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Tenant ids already seen to be valid (there are few tenants; bounded anyway).
_GOOD_TENANTS: set[str] = set()


class Event(msgspec.Struct, frozen=True, gc=False):
    """A job event that meets the contract, reduced to what rating needs."""

    id: str
    source: str
    time: str
    tenant_id: str
    workload_id: str
    workload_type: str
    license: str | None
    result: str
    #: UTC calendar month of ``time``, ``YYYY-MM``.
    month: str
    #: UTC calendar date of ``time`` as ``YYYYMMDD`` (for rate-card lookup).
    date: int

    @property
    def counted(self) -> bool:
        """True when the session protected the workload (success or warning)."""
        return self.result in COUNTED_RESULTS


class Rejected:
    """An input the meter cannot count, and why.

    ``code`` is a short, bounded label (for metrics); ``reason`` names the field
    and what was wrong, for a person.
    """

    __slots__ = ("code", "reason")

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Rejected({self.code!r}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Rejected) and other.code == self.code and other.reason == self.reason
        )

    def __hash__(self) -> int:
        return hash((self.code, self.reason))


#: Every rejection code, so metrics can pre-declare bounded label values.
REJECTION_CODES: Final = (
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "invalid_time",
    "no_ratecard",
    "too_large",
    "internal_error",
)


def parse(raw: bytes | str) -> Event | Rejected:
    """Decode and validate one event.  Never raises on bad input.

    A UTF-8 byte order mark before the JSON is ignored, as RFC 8259 allows.
    """
    if raw.__class__ is bytes and raw.startswith(_BOM):
        raw = raw[3:]
    try:
        env = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return _explain(str(exc))
    except msgspec.DecodeError as exc:
        return Rejected("invalid_json", f"not valid JSON: {exc}")
    data = env.data
    if not env.id:
        return Rejected("invalid_value", "id: must not be empty")
    if not env.source:
        return Rejected("invalid_value", "source: must not be empty")
    tenant = data.tenant_id
    if tenant not in _GOOD_TENANTS:
        if len(tenant) > 128 or _TENANT.fullmatch(tenant) is None:
            return _bad_tenant(tenant)
        if len(_GOOD_TENANTS) >= 100_000:
            _GOOD_TENANTS.clear()
        _GOOD_TENANTS.add(tenant)
    wid = data.workload_id
    # isprintable() is False for every control character (and some harmless
    # others), so it is only the fast path; the regex decides.
    if not wid or len(wid) > 256 or (not wid.isprintable() and _CONTROL.search(wid)):
        return _bad_workload_id(wid)
    wtype = data.workload_type
    lic: str | None
    if data.license is msgspec.UNSET:
        if wtype in LICENSED_TYPES:
            return Rejected(
                "missing_field", f"data.license: missing (required for workload_type {wtype})"
            )
        lic = None
    else:
        lic = data.license
    try:
        month, date = utc_month(env.time)
    except TimeError as exc:
        if not env.time:
            return Rejected("invalid_time", "time: must not be empty")
        return Rejected("invalid_time", f"time: {env.time!r} {exc}")
    return Event(env.id, env.source, env.time, tenant, wid, wtype, lic, data.result, month, date)


def _bad_tenant(tenant: str) -> Rejected:
    if not tenant:
        return Rejected("invalid_value", "data.tenant_id: must not be empty")
    if len(tenant) > 128:
        return Rejected(
            "invalid_value", f"data.tenant_id: longer than 128 characters ({len(tenant)})"
        )
    return Rejected(
        "invalid_value",
        f"data.tenant_id: {tenant!r} must start with a letter or digit and hold only "
        "letters, digits and . _ : @ -",
    )


def _bad_workload_id(wid: str) -> Rejected:
    if not wid:
        return Rejected("invalid_value", "data.workload_id: must not be empty")
    if len(wid) > 256:
        return Rejected(
            "invalid_value", f"data.workload_id: longer than 256 characters ({len(wid)})"
        )
    return Rejected("invalid_value", "data.workload_id: contains a control character")


_AT: Final = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_MISSING: Final = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_EXPECTED: Final = re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`")
_ENUM: Final = re.compile(r"Invalid enum value (?P<value>.+)")
_ALLOWED: Final = {
    "specversion": "'1.0'",
    "type": f"'{EVENT_TYPE}'",
    "data.workload_type": ", ".join(WORKLOAD_TYPES),
    "data.license": ", ".join(LICENSES),
    "data.result": ", ".join(RESULTS),
}
_NAMES: Final = {"str": "a string", "object": "an object", "int": "an integer"}


def _explain(message: str) -> Rejected:
    """Turn a msgspec validation message into ``field: what was wrong``."""
    at = _AT.match(message)
    assert at is not None  # the pattern matches any string
    msg = at["msg"]
    path = (at["path"] or "").lstrip(".")
    if (missing := _MISSING.match(msg)) is not None:
        field = f"{path}.{missing['field']}" if path else missing["field"]
        return Rejected("missing_field", f"{field}: missing")
    where = path or "event"
    if (enum := _ENUM.match(msg)) is not None:
        allowed = _ALLOWED.get(path)
        tail = f" (expected one of {allowed})" if allowed else ""
        return Rejected("invalid_value", f"{where}: {enum['value']} is not allowed{tail}")
    if (exp := _EXPECTED.match(msg)) is not None:
        if where == "event":
            return Rejected("not_an_object", f"event: expected a JSON object, got {exp['got']}")
        if path in _ALLOWED:
            want = f"one of {_ALLOWED[path]}"
        else:
            want = _NAMES.get(exp["want"], exp["want"])
        return Rejected("wrong_type", f"{where}: expected {want}, got {exp['got']}")
    return Rejected("invalid_value", f"{where}: {msg}")
