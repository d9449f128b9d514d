"""The job event contract (v1): decode, validate, and reject with a reason.

``parse(raw)`` is total: for any bytes or text it returns an :class:`Event` or
a :class:`Rejected` with a code from :data:`REJECTION_CODES` and a short
reason; it never raises.  The contract is written down as JSON Schema in
``schemas/job-event.v1.schema.json``; a test proves both agree.  Beyond the
schema, three limits of the implementation (RFC 8259 §9 allows them) are
rejections: an event larger than ``max_bytes`` (``too_large``), JSON nested
deeper than :data:`MAX_DEPTH` levels (``too_large``), and a message that is not
valid UTF-8 anywhere, also inside members meter ignores (``invalid_json``: RFC
8259 §8.1, such a message is not JSON).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from datetime import timedelta
from itertools import accumulate
from typing import Annotated, Final, Literal, get_args

import msgspec

from meter.domain.month import TimeError, hour_stamp, stamp_text, utc_hour, utc_month

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
#: Deepest nesting of JSON arrays and objects the meter decodes (an event needs 2).
#: Checked exactly, so the outcome never depends on how deep the caller's stack is.
MAX_DEPTH: Final = 512
#: A reason quotes at most this many characters of any input value.
EXCERPT_CHARS: Final = 60
#: No reason is longer than this (a dead-letter header must stay small).
MAX_REASON_CHARS: Final = 400


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
#: JSON text of n bytes nests at most n // 2 levels: shorter ones need no depth check.
_SHALLOW: Final = 2 * MAX_DEPTH + 1
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_NESTING: Final = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))

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
    #: UTC calendar date of ``time`` as ``YYYYMMDD`` (for rate-card lookup); ``0``
    #: when that date is outside the years 0001 to 9999 (see :func:`utc_month`).
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
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
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
    "future_time",
    "internal_error",
)


# The batch contract: the same shape, stricter.  Many lines are decoded in one call
# (:func:`decode_lines`); a line the batch refuses is judged again on its own by
# :func:`parse`, so only what the batch accepts must agree with it exactly.
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _BatchData(msgspec.Struct, gc=False):
    tenant_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    workload_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    workload_type: WorkloadType
    result: Result
    license: License | msgspec.UnsetType = msgspec.UNSET


class BatchEvent(msgspec.Struct, gc=False):
    """An event as :func:`decode_lines` gives it: the contract's shape and types, ids and
    sources not empty, tenant and workload ids within their lengths.  The rest of the
    contract (the tenant id's characters, control characters in the workload id, the
    license a type needs, the time) is for the caller to check."""

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: Literal["meter.job.workload"]
    time: str
    data: _BatchData


_batch_decoder: Final = msgspec.json.Decoder(BatchEvent)
#: Each line wrapped as a one-element array: ``[[line],[line],...]``.
_wrapped_decoder: Final = msgspec.json.Decoder(list[tuple[BatchEvent]])
_LINE: Final = re.compile(r"at `\$\[(?P<index>[0-9]+)\]")
_BYTE: Final = re.compile(r"\(byte (?P<at>[0-9]+)\)$")
_NOT_ASCII: Final = re.compile(rb"[\x80-\xff]")
#: Without ``[``, JSON nests deeper than :data:`MAX_DEPTH` only in at least ``{"":`` repeated
#: MAX_DEPTH times around ``{}``, and as many ``}``: 5 * MAX_DEPTH + 2 bytes.
_FLAT_LINE: Final = 5 * MAX_DEPTH


class BatchRefused(Exception):
    """:func:`decode_lines` cannot vouch for every line of a batch; ``line`` is the first
    one it suspects (0-based), or ``None`` when it cannot tell."""

    def __init__(self, line: int | None) -> None:
        super().__init__(line)
        self.line = line


def decode_lines(block: bytes) -> list[tuple[BatchEvent]]:
    """Decode the JSON lines of ``block`` (each but maybe the last ends in ``\\n``; none is
    longer than the caller's ``max_bytes``) in one call: one event per line (each in a
    1-tuple), each exactly what :func:`parse` decodes from that line alone; or raise
    :class:`BatchRefused`.

    Each line is wrapped as a one-element array, ``[[line],[line],...]``, and decoded as
    ``list[tuple[BatchEvent]]``: the ``],[`` put in place of each newline is valid only
    between whole values when the lines hold no ``[`` (inside an object a ``]`` closes
    nothing) or inside a string (a raw newline in a string: then fewer values than lines
    come back, and the block is refused), and a one-tuple takes exactly one value, so a
    line that holds two values, none or part of one is refused.  Every byte must be ASCII
    (then UTF-8 and byte order marks need no look) and every line short enough that it
    cannot nest deeper than :data:`MAX_DEPTH`.  A block with ``[`` is checked another
    way (:func:`_decode_lines`).
    """
    if not block.isascii():
        where = _NOT_ASCII.search(block)
        raise BatchRefused(None if where is None else block.count(b"\n", 0, where.start()))
    if block.find(b"[") != -1:
        return _decode_lines(block)
    # No line longer than _FLAT_LINE: the last newline of every such stretch starts a line.
    pos, end = 0, len(block)
    while end - pos > _FLAT_LINE:
        nl = block.rfind(b"\n", pos, pos + _FLAT_LINE)
        if nl == -1:
            return _decode_lines(block)
        pos = nl + 1
    body = block[:-1] if block.endswith(b"\n") else block
    wrapped = b"[[" + body.replace(b"\n", b"],[") + b"]]"
    try:
        events = _wrapped_decoder.decode(wrapped)
    except msgspec.ValidationError as exc:
        m = _LINE.search(str(exc))
        raise BatchRefused(None if m is None else int(m["index"])) from None
    except msgspec.DecodeError as exc:
        m = _BYTE.search(str(exc))
        raise BatchRefused(None if m is None else wrapped.count(b"],[", 0, int(m["at"]))) from None
    except (RecursionError, MemoryError):
        raise BatchRefused(None) from None
    # A ``],[`` inside a string is a raw newline inside a string in the input (which no
    # line alone decodes): two lines read as one value.  Every other ``],[`` is between
    # two one-tuples, so one value per line is exactly as many values as lines.
    if len(events) != body.count(b"\n") + 1:
        raise BatchRefused(None)
    return events


def _decode_lines(block: bytes) -> list[tuple[BatchEvent]]:
    """:func:`decode_lines` of a block with ``[`` or long lines.

    msgspec reads newline-delimited JSON as whitespace-separated values, so a value may
    span lines or share one.  Here every line boundary must be ``}`` (maybe ``\\r``),
    newline, ``{``: a ``}`` followed by ``{`` never occurs inside a JSON value (and no
    string holds a raw newline), so each boundary is one between values, each line holds
    at least one, and as many values as lines means exactly one each.  The block must
    have so few brackets that no line can nest deeper than :data:`MAX_DEPTH` (each event
    has at least two ``{``).
    """
    lines = block.count(b"\n") + (not block.endswith(b"\n"))
    if block.count(b"}\n{") + block.count(b"}\r\n{") != lines - 1:
        raise BatchRefused(None)
    if block.count(b"{") + block.count(b"[") > 2 * lines + MAX_DEPTH - 2:
        raise BatchRefused(None)
    try:
        events = _batch_decoder.decode_lines(block)
    except msgspec.ValidationError as exc:
        m = _LINE.search(str(exc))
        raise BatchRefused(None if m is None else int(m["index"])) from None
    except msgspec.DecodeError as exc:
        m = _BYTE.search(str(exc))
        raise BatchRefused(None if m is None else block.count(b"\n", 0, int(m["at"]))) from None
    except (RecursionError, MemoryError):
        raise BatchRefused(None) from None
    if len(events) != lines:
        raise BatchRefused(None)
    return [(e,) for e in events]


def _utf8_json(buf: bytes, where: str) -> bytes | Rejected:
    """Non-ASCII JSON bytes without a leading byte order mark, or why they are not UTF-8.

    msgspec checks UTF-8 only in the strings it decodes, and then raises
    UnicodeDecodeError; RFC 8259 §8.1 wants the whole message checked.
    """
    try:
        buf.decode()
    except UnicodeDecodeError as exc:
        return Rejected("invalid_json", f"{where}not valid UTF-8 at byte {exc.start}")
    return buf[3:] if buf.startswith(_BOM) else buf


def parse(raw: bytes | str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Event | Rejected:
    """Decode and validate one event.  Never raises, whatever ``raw`` holds.

    Text is taken as its UTF-8 encoding.  An input larger than ``max_bytes`` is
    rejected as ``too_large`` without being decoded.  A UTF-8 byte order mark
    before the JSON is ignored, as RFC 8259 allows.  (``max_bytes`` is not
    keyword-only because that makes every call slower on CPython 3.11.)
    """
    if raw.__class__ is bytes:
        buf: bytes = raw
    else:
        as_bytes = _to_bytes(raw, max_bytes)
        if isinstance(as_bytes, Rejected):
            return as_bytes
        buf = as_bytes
    size = len(buf)
    if size > max_bytes:
        return too_large(size, max_bytes)
    if not buf.isascii():  # the common case needs no call
        checked = _utf8_json(buf, "")
        if isinstance(checked, Rejected):
            return checked
        buf = checked
    try:
        env = _decoder.decode(buf)
    except msgspec.ValidationError as exc:
        return _explain(str(exc))
    except msgspec.DecodeError as exc:
        return Rejected("invalid_json", f"not valid JSON: {exc}")
    except RecursionError:
        return _too_deep()
    if size > _SHALLOW and _depth(buf) > MAX_DEPTH:
        return _too_deep()
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
        return Rejected("invalid_time", f"time: {excerpt(env.time)} {exc}")
    return Event(env.id, env.source, env.time, tenant, wid, wtype, lic, data.result, month, date)


#: The headers of a binary-mode event that meter needs (CloudEvents Kafka protocol binding 1.0,
#: §3.2.3), in the order a missing one is reported.
CE_HEADERS: Final = ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time")
CONTENT_TYPE: Final = "content-type"
#: ``content-type`` of a structured-mode message; any other ``application/cloudevents``
#: type is an event format meter does not read.
STRUCTURED_JSON: Final = "application/cloudevents+json"
_READ: Final = frozenset((*CE_HEADERS, CONTENT_TYPE))
_ATTRIBUTES: Final = frozenset(h[3:] for h in CE_HEADERS)
_CLOUDEVENTS: Final = b"application/cloudevents"
#: A ``content-type`` longer than this is not one meter supports (and is quoted cut).
_MAX_MEDIA_TYPE: Final = 256
_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
_NO_VALUE: Final = Rejected("invalid_json", "message has no value")


def parse_message(
    value: bytes | str | None,
    headers: Iterable[tuple[str, bytes | None]] | None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Event | Rejected:
    """Decode and validate the event in one Kafka message, in either content mode of the
    CloudEvents Kafka protocol binding 1.0.  Never raises, whatever the value and headers.

    A ``content-type`` header starting ``application/cloudevents`` means structured mode;
    else a message with a ``ce_`` header is binary mode; else (no headers, as plain JSON
    producers send) structured.  Structured: the value is the event, read by :func:`parse`.
    Binary: the attributes are the headers ``ce_specversion``, ``ce_id``, ``ce_source``,
    ``ce_type`` and ``ce_time``, the value is ``data`` and ``content-type`` (absent, or
    ``application/json``) its media type.  Binary mode is put together as the structured event
    and read by :func:`parse`, so the contract, the rules and the rejection codes are the
    same; reasons name the header (``header ce_time: ...``).  Its size is the value's plus
    those five headers'.  A header meter reads that is missing, null, repeated or not UTF-8
    is a rejection naming it; other headers are ignored.
    """
    if not headers:
        return _NO_VALUE if value is None else parse(value, max_bytes)
    found: dict[str, bytes | None] = {}
    repeated: set[str] = set()
    binary = False
    for name, raw in headers:
        if name in _READ:
            if name in found:
                repeated.add(name)
            found[name] = raw
        if not binary and name.startswith("ce_"):
            binary = True
    media = found.get(CONTENT_TYPE)
    if media is not None and media[: len(_CLOUDEVENTS)].lower() == _CLOUDEVENTS:
        problem = _media_problem(media, STRUCTURED_JSON, repeated)
        if problem is not None:
            return Rejected(
                "invalid_value", f"{problem} (structured-mode events must be {STRUCTURED_JSON})"
            )
        binary = False
    if not binary:
        return _NO_VALUE if value is None else parse(value, max_bytes)
    return _parse_binary(value, found, repeated, max_bytes)


def _parse_binary(
    value: object, found: dict[str, bytes | None], repeated: set[str], max_bytes: int
) -> Event | Rejected:
    size = 0
    for name in CE_HEADERS:
        raw = found.get(name)
        if raw is None:
            return Rejected("missing_field", f"header {name}: missing (binary-mode CloudEvent)")
        if name in repeated:
            return Rejected("invalid_value", f"header {name}: appears more than once")
        size += len(raw)
    if value is None or value == b"":
        return Rejected(
            "missing_field", "data: missing (a binary-mode message's value is the event's data)"
        )
    data = value if isinstance(value, bytes) else _to_bytes(value, max_bytes)
    if isinstance(data, Rejected):
        return data
    size += len(data)
    if size > max_bytes:
        return Rejected(
            "too_large", f"event is {size} bytes (value and ce_ headers); the limit is {max_bytes}"
        )
    media = found.get(CONTENT_TYPE)
    if media is not None:
        problem = _media_problem(media, "application/json", repeated)
        if problem is not None:
            return Rejected(
                "invalid_value", f"{problem} (binary-mode data must be application/json)"
            )
    attributes = []
    for name in CE_HEADERS:
        try:
            attributes.append(msgspec.json.encode(found[name].decode()))  # type: ignore[union-attr]
        except UnicodeDecodeError as exc:
            return Rejected("invalid_value", f"header {name}: not valid UTF-8 at byte {exc.start}")
    if not data.isascii():
        checked = _utf8_json(data, "data: ")
        if isinstance(checked, Rejected):
            return checked
        data = checked
    try:
        _raw_decoder.decode(data)  # exactly one JSON value, so the envelope below is sound
    except msgspec.DecodeError as exc:
        return Rejected("invalid_json", f"data: not valid JSON: {exc}")
    except RecursionError:
        return _too_deep()
    envelope = b'{"specversion":%b,"id":%b,"source":%b,"type":%b,"time":%b,"data":%b}' % (
        *attributes,
        data,
    )
    result = parse(envelope, len(envelope))
    if result.__class__ is Rejected:
        assert isinstance(result, Rejected)
        field, sep, rest = result.reason.partition(": ")
        if field in _ATTRIBUTES:
            return Rejected(result.code, f"header ce_{field}{sep}{rest}")
    return result


def _media_problem(raw: bytes, expected: str, repeated: set[str]) -> str | None:
    """What is wrong with ``content-type`` value ``raw`` if it is not ``expected``
    (parameters allowed, but a charset only if UTF-8), else ``None``."""
    if CONTENT_TYPE in repeated:
        return f"header {CONTENT_TYPE}: appears more than once"
    text = raw[: _MAX_MEDIA_TYPE + 1].decode("utf-8", "replace")
    kind, _, params = text.partition(";")
    charset = "utf-8"
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
    if len(raw) <= _MAX_MEDIA_TYPE and kind.strip().lower() == expected and charset == "utf-8":
        return None
    return f"header {CONTENT_TYPE}: {excerpt(text)} is not supported"


def too_large(size: int, limit: int) -> Rejected:
    """The rejection of an input of ``size`` bytes over the ``limit``."""
    return Rejected("too_large", f"event is {size} bytes; the limit is {limit}")


def excerpt(value: str) -> str:
    """A value quoted for a reason: its ``repr``, cut after :data:`EXCERPT_CHARS`
    characters (ending in ``...`` and the full length) so a reason stays short."""
    if len(value) <= EXCERPT_CHARS:
        quoted = repr(value)
        if len(quoted) <= EXCERPT_CHARS + 2:
            return quoted
    else:
        quoted = repr(value[:EXCERPT_CHARS])
    return f"{quoted[: EXCERPT_CHARS + 1]}... ({len(value)} characters)"


def _to_bytes(raw: object, max_bytes: int) -> bytes | Rejected:
    """Text as UTF-8, any other bytes-like object as bytes."""
    if isinstance(raw, str):
        if len(raw) > max_bytes:  # a character is at least one byte
            return Rejected(
                "too_large", f"event is at least {len(raw)} bytes; the limit is {max_bytes}"
            )
        try:
            return raw.encode()
        except UnicodeEncodeError as exc:
            return Rejected(
                "invalid_json", f"not valid UTF-8: a lone surrogate at character {exc.start}"
            )
    try:
        return memoryview(raw).tobytes()  # type: ignore[arg-type]
    except TypeError:
        return Rejected("invalid_json", f"not bytes or text but {type(raw).__name__}")


def _depth(data: bytes) -> int:
    """How deep arrays and objects nest in JSON ``data`` (which msgspec accepted)."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return 0  # too few brackets to nest deeper than the limit, wherever they are
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def _too_deep() -> Rejected:
    return Rejected("too_large", f"JSON nested more than {MAX_DEPTH} levels deep (the limit)")


def _bad_tenant(tenant: str) -> Rejected:
    if not tenant:
        return Rejected("invalid_value", "data.tenant_id: must not be empty")
    if len(tenant) > 128:
        return Rejected(
            "invalid_value", f"data.tenant_id: longer than 128 characters ({len(tenant)})"
        )
    return Rejected(
        "invalid_value",
        f"data.tenant_id: {excerpt(tenant)} must start with a letter or digit and hold only "
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


_MISSING: Final = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_EXPECTED: Final = re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`")
_ENUM: Final = "Invalid enum value "
_ALLOWED: Final = {
    "specversion": "'1.0'",
    "type": f"'{EVENT_TYPE}'",
    "data.workload_type": ", ".join(WORKLOAD_TYPES),
    "data.license": ", ".join(LICENSES),
    "data.result": ", ".join(RESULTS),
}
_NAMES: Final = {"str": "a string", "object": "an object", "int": "an integer"}


def _explain(message: str) -> Rejected:
    """Turn a msgspec validation message into ``field: what was wrong``.

    msgspec names the place last (`` - at `$.data.result` ``); an enum message
    quotes the whole value (``repr``), which is cut to an excerpt here.
    """
    msg, at, path = message.rpartition(" - at `$")
    if at:
        path = path.rstrip("`").lstrip(".")
    else:
        msg, path = message, ""
    if (missing := _MISSING.match(msg)) is not None:
        field = f"{path}.{missing['field']}" if path else missing["field"]
        return Rejected("missing_field", f"{field}: missing")
    where = path or "event"
    if msg.startswith(_ENUM):
        value = _unrepr(msg[len(_ENUM) :])
        allowed = _ALLOWED.get(path)
        tail = f" (expected one of {allowed})" if allowed else ""
        return Rejected("invalid_value", f"{where}: {value} is not allowed{tail}")
    if (exp := _EXPECTED.match(msg)) is not None:
        if where == "event":
            return Rejected("not_an_object", f"event: expected a JSON object, got {exp['got']}")
        if path in _ALLOWED:
            want = f"one of {_ALLOWED[path]}"
        else:
            want = _NAMES.get(exp["want"], exp["want"])
        return Rejected("wrong_type", f"{where}: expected {want}, got {exp['got']}")
    if msg.startswith("Number out of range"):
        want = f"one of {_ALLOWED[path]}" if path in _ALLOWED else "a string"
        return Rejected("wrong_type", f"{where}: expected {want}, got a number out of range")
    return Rejected("invalid_value", f"{where}: {msg}")


def _unrepr(text: str) -> str:
    """An excerpt of the value msgspec quoted as ``text`` (a Python ``repr``)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return excerpt(text)
    return excerpt(value) if isinstance(value, str) else excerpt(text)


#: The clock-skew tolerance: an event dated after the end of the UTC hour of its record's
#: timestamp (``meter rate``: its clock) plus this is rejected as ``future_time``.
DEFAULT_CLOCK_SKEW: Final = timedelta(hours=1)
_MS: Final = timedelta(milliseconds=1)


def skew_ms(skew: timedelta | None) -> int | None:
    """A tolerance in whole milliseconds; ``None`` (off) stays ``None``."""
    return None if skew is None else int(skew / _MS)


#: Kafka's timestamp of a record that has none (``RecordBatch.NO_TIMESTAMP``); the broker
#: refuses any other negative timestamp.
NO_TIMESTAMP: Final = -1


def not_after(timestamp_ms: int, skew: int | None) -> int | None:
    """The last UTC hour (``YYYYMMDDHH``) an event may be dated in, for a record (or a clock)
    at ``timestamp_ms`` and a tolerance of ``skew`` milliseconds; ``None``: any time (no
    tolerance set, or a record without a timestamp)."""
    if skew is None or timestamp_ms == NO_TIMESTAMP:
        return None
    return hour_stamp(timestamp_ms + skew)


def future_time(event: Event, not_after: int) -> Rejected | None:
    """``Rejected("future_time")`` when ``event`` is dated after the UTC hour ``not_after``
    (``YYYYMMDDHH``: the hour of its Kafka record's timestamp, or of ``meter rate``'s clock,
    plus the clock-skew tolerance); else ``None``.

    A restore point from 2099 is a broken clock, not usage: such an event is held out of
    both views.  The rule compares whole UTC hours, so an event is kept up to the end of
    the hour its limit falls in, and it decides the same way at every replay (the record's
    timestamp travels with it)."""
    day = not_after // 100
    if event.date < day or (event.date == day and utc_hour(event.time, event.date) <= not_after):
        return None
    return Rejected(
        "future_time",
        f"time: {excerpt(event.time)} is after {stamp_text(not_after)}, the end of the hour "
        "of the record's timestamp plus the clock-skew tolerance (a clock running ahead? "
        "fix it, then send the event again)",
    )
