"""The written contract and the code agree: ``schemas/job-event.v1.schema.json``
accepts exactly the events that :func:`meter.domain.parse` turns into an
:class:`~meter.domain.Event`.

Checked on the example files under ``schemas/examples`` (where each invalid
example must also be rejected with the code and field recorded in
``schemas/examples/invalid/EXPECTED.json``) and on events mutated by hypothesis.
The schema is validated with format assertions on, so ``format: date-time`` is
really checked (by rfc3339-validator, through jsonschema's format checker).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import rfc3339_validator
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker, ValidationError

from meter.domain import LICENSED_TYPES, LICENSES, RESULTS, WORKLOAD_TYPES, Event, Rejected, parse

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "schemas" / "job-event.v1.schema.json"
EXAMPLES = ROOT / "schemas" / "examples"
EXPECTED_PATH = EXAMPLES / "invalid" / "EXPECTED.json"

SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

_STOCK = FormatChecker()


def _format_checker() -> FormatChecker:
    """jsonschema's own format checker, with leap seconds let through.

    ``date-time`` is checked by jsonschema's stock checker, which calls
    rfc3339-validator.  rfc3339-validator 0.1.4 does not support leap seconds
    (its docstring says so) although RFC 3339 and the contract allow second 60,
    so a time with second 60 is checked as if it were second 59.
    """
    if "date-time" not in _STOCK.checkers:
        raise RuntimeError(
            "jsonschema has no date-time format checker: install jsonschema[format] "
            "(rfc3339-validator); without it format: date-time would not be asserted"
        )
    checker = FormatChecker()

    @checker.checks("date-time")
    def _date_time(instance: object) -> bool:
        if not isinstance(instance, str) or _STOCK.conforms(instance, "date-time"):
            return True
        leap = instance[17:19] == "60"
        return leap and _STOCK.conforms(instance[:17] + "59" + instance[19:], "date-time")

    return checker


CHECKER = _format_checker()
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=CHECKER)


def _strict_loads(raw: bytes | str) -> Any:
    """``json.loads`` that, like msgspec, refuses NaN/Infinity and duplicate names."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate member names in {names}")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, object_pairs_hook=pairs, parse_constant=constant)


def _schema_fields(instance: Any) -> set[str]:
    """The fields the schema's errors point at, spelled like parse's reasons."""
    fields = set()
    for error in VALIDATOR.iter_errors(instance):
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required" and isinstance(error.instance, dict):
            path += [name for name in error.validator_value if name not in error.instance]
        fields.add(".".join(path) or "event")
    return fields


def _schema_errors(instance: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or 'event'}: {e.message}"
        for e in VALIDATOR.iter_errors(instance)
    ]


# -- the schema itself and its format checking ---------------------------------------


def test_schema_is_a_valid_2020_12_schema() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"] == "https://meter.example/schemas/job-event.v1.schema.json"
    assert SCHEMA["title"]
    Draft202012Validator.check_schema(SCHEMA)

    def described(node: dict[str, Any], where: str) -> None:
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{where}.{name} has no description"
            described(sub, f"{where}.{name}")

    described(SCHEMA, "event")


def test_date_time_format_is_really_asserted() -> None:
    # jsonschema's date-time checker is the one from its format module, backed by
    # rfc3339-validator; if either is missing, format would silently pass.
    func, _raises = _STOCK.checkers["date-time"]
    assert func.__module__ == "jsonschema._format"
    assert rfc3339_validator.validate_rfc3339("2026-02-30T00:00:00Z") is False
    assert VALIDATOR.format_checker is CHECKER
    for checker in (_STOCK, CHECKER):
        assert not checker.conforms("2026-02-30T00:00:00Z", "date-time")
        assert not checker.conforms("2026-02-29T00:00:00Z", "date-time")
        assert not checker.conforms("0000-01-01T00:00:00Z", "date-time")
        assert checker.conforms("2024-02-29T00:00:00Z", "date-time")
        assert checker.conforms("2026-11-03t10:00:00z", "date-time")
    # rfc3339-validator lacks leap seconds; our checker adds them back.
    assert not _STOCK.conforms("2016-12-31T23:59:60Z", "date-time")
    assert CHECKER.conforms("2016-12-31T23:59:60Z", "date-time")
    assert not CHECKER.conforms("2016-12-31T23:59:61Z", "date-time")

    # The pattern alone lets 2026-02-30 through: format is what rejects it.
    event = _strict_loads((EXAMPLES / "valid" / "vm-rental-utc-z.json").read_bytes())
    event["time"] = "2026-02-30T00:00:00Z"
    assert Draft202012Validator(SCHEMA).is_valid(event)
    assert not VALIDATOR.is_valid(event)


# -- the example files -------------------------------------------------------------------

VALID = sorted((EXAMPLES / "valid").glob("*.json"))
INVALID = sorted(p for p in (EXAMPLES / "invalid").glob("*.json") if p != EXPECTED_PATH)
EXPECTED: dict[str, dict[str, str]] = json.loads(EXPECTED_PATH.read_text(encoding="utf-8"))


def test_example_sets() -> None:
    assert len(VALID) >= 12
    assert len(INVALID) >= 30
    assert set(EXPECTED) == {p.name for p in INVALID}, "EXPECTED.json and the files differ"


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_example(path: Path) -> None:
    raw = path.read_bytes()
    assert _schema_errors(_strict_loads(raw)) == []
    result = parse(raw)
    assert isinstance(result, Event), result


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_example(path: Path) -> None:
    raw = path.read_bytes()
    want = EXPECTED[path.name]
    instance = _strict_loads(raw)
    assert not VALIDATOR.is_valid(instance), "the schema accepts it"
    assert want["field"] in _schema_fields(instance), _schema_errors(instance)
    result = parse(raw)
    assert isinstance(result, Rejected), result
    assert result.code == want["code"], result
    assert result.reason.startswith(want["field"] + ":"), result


# -- mutated events ------------------------------------------------------------------------

#: Characters near the edges of the rules: the tenant alphabet and its neighbours,
#: control characters at both ends of both ranges, non-control invisibles,
#: non-ASCII letters and digits, astral characters, time punctuation.
INTERESTING = (
    "aZ09._:@-/ +,\\\"'"
    "\t\n\r\x00\x1f\x7f\x80\x85\x9f\xa0\u2028\u200b\ufeff"
    "\u00e9\u0663\uff11\U0001f600TtZz"
)
_chars = st.sampled_from(INTERESTING) | st.characters(exclude_categories=("Cs",))
_text = st.text(_chars, max_size=12)
_tenant_chars = st.sampled_from("aZ09._:@-")
_BAD_SUFFIXES = ["", "", "", "\n", "/", " ", "\x00", "\u0663", "\u00e9", "\x85"]


def _around(limit: int, fill: str) -> st.SearchStrategy[str]:
    return st.integers(limit - 2, limit + 2).map(lambda n: fill * n)


tenants = st.one_of(
    st.text(_tenant_chars, min_size=1, max_size=8),
    st.builds(
        lambda head, tail, suffix: head + tail + suffix,
        st.sampled_from(["a", "Z", "0", "9", ".", "-", "_", ":", "@", "/", " ", "\n", ""]),
        st.text(_tenant_chars, max_size=6),
        st.sampled_from(_BAD_SUFFIXES),
    ),
    _around(128, "t"),
    _text,
)
workload_ids = st.one_of(
    _text,
    st.builds(
        lambda a, c, b: a + c + b,
        st.text(st.sampled_from("vm-4221"), max_size=4),
        st.sampled_from(["\x00", "\t", "\n", "\x1f", "\x7f", "\x80", "\x85", "\x9f", "\xa0", "x"]),
        st.text(st.sampled_from("vm-4221"), max_size=4),
    ),
    _around(256, "w"),
    _around(256, "\U0001f600"),
)


#: First and last days of the calendar, of years and of February.
EDGE_DATES = [
    "0001-01-01",
    "9999-12-31",
    "2026-12-31",
    "2027-01-01",
    "2024-02-29",
    "2000-02-29",
    "2026-11-30",
]
#: Dates that look right but are not.
BAD_DATES = ["0000-01-01", "2026-02-29", "1900-02-29", "2026-04-31", "2026-00-10", "2026-13-01"]


def _offset(signs: str, hours: list[int], minutes: list[int]) -> st.SearchStrategy[str]:
    return st.builds(
        "{}{:02d}:{:02d}".format,
        st.sampled_from(signs),
        st.sampled_from(hours),
        st.sampled_from(minutes),
    )


#: RFC 3339 times with every field in range, leaning on the edges.
well_formed_times = st.builds(
    "{}{}{:02d}:{:02d}:{:02d}{}{}".format,
    st.sampled_from(EDGE_DATES) | st.dates().map(lambda d: d.isoformat()),
    st.sampled_from("TTt"),
    st.sampled_from([0, 0, 1, 12, 22, 23, 23]),
    st.sampled_from([0, 30, 59]),
    st.sampled_from([0, 59, 60]),
    st.sampled_from(["", "", ".5", ".000000001"]),
    st.sampled_from(["Z", "z", "+00:00", "-00:00"])
    | _offset("+-", [0, 1, 2, 12, 23], [0, 1, 30, 59]),
)


@st.composite
def broken_times(draw: st.DrawFn) -> str:
    """Mostly well-shaped times with some field pushed past its range, or mangled."""
    date = draw(
        st.sampled_from(EDGE_DATES + BAD_DATES)
        | st.builds(
            "{:04d}-{:02d}-{:02d}".format,
            st.sampled_from([0, 1, 1900, 2000, 2016, 2024, 2026, 9999]) | st.integers(0, 9999),
            st.integers(0, 13),
            st.sampled_from([0, 1, 28, 29, 30, 31, 32]),
        )
    )
    hour = draw(st.sampled_from([0, 1, 12, 22, 23, 24, 25]))
    minute = draw(st.sampled_from([0, 1, 30, 59, 60]))
    second = draw(st.sampled_from([0, 30, 59, 60, 61]))
    sep = draw(st.sampled_from("TTTt _"))
    fraction = draw(st.sampled_from(["", "", ".5", ".123456789", ".", ",5"]))
    zone = draw(
        st.sampled_from(["Z", "Z", "z", "", "UTC", "+0200", "+02", "-00:00"])
        | _offset("+-", [0, 1, 2, 12, 23, 24, 99], [0, 1, 30, 59, 60])
    )
    value = f"{date}{sep}{hour:02d}:{minute:02d}:{second:02d}{fraction}{zone}"
    if draw(st.integers(0, 2)) == 0:  # one character replaced, inserted or removed
        at = draw(st.integers(0, len(value)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(_chars)
        if action == "insert":
            value = value[:at] + char + value[at:]
        elif action == "replace":
            value = value[:at] + char + value[at + 1 :]
        else:
            value = value[:at] + value[at + 1 :]
    return value


times = well_formed_times | broken_times() | _text


any_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)

NEAR_MISSES = [
    "",
    "VM",
    "vm ",
    " vm",
    "cloud-vm",
    "Rental",
    "rental\n",
    "1.0\n",
    "1.0 ",
    "1",
    "meter.job.workload\n",
    "Meter.Job.Workload",
    "null",
]
enum_strings = st.sampled_from(
    [*WORKLOAD_TYPES, *LICENSES, *RESULTS, "1.0", "meter.job.workload", *NEAR_MISSES]
)

TOP = ("specversion", "id", "source", "type", "time", "data")
DATA = ("tenant_id", "workload_id", "workload_type", "license", "result")
STRINGS = {
    "time": times,
    "data.tenant_id": tenants,
    "data.workload_id": workload_ids,
    "id": st.sampled_from(["", "e-1", " "]) | _text,
    "source": st.sampled_from(["", "vbr://acme/vbr-01"]) | _text,
}


@st.composite
def base_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event, except that one of its string fields may come from the wild."""
    wtype = draw(st.sampled_from(WORKLOAD_TYPES))
    data: dict[str, Any] = {
        "tenant_id": draw(st.sampled_from(["acme", "t" * 128]) | st.from_regex(TENANT_RE)),
        "workload_id": draw(st.sampled_from(["vm-4221", "w" * 256])),
        "workload_type": wtype,
        "result": draw(st.sampled_from(RESULTS)),
    }
    if wtype in LICENSED_TYPES or draw(st.booleans()):
        data["license"] = draw(st.sampled_from(LICENSES))
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "6f1c2a9e-5b1d-4c3e-9a57-0d2b8c1e4f10",
        "source": "vbr://acme/vbr-01",
        "type": "meter.job.workload",
        "time": draw(well_formed_times),
        "data": data,
    }
    wild = draw(st.sampled_from([None, "time", "data.tenant_id", "data.workload_id"]))
    if wild is not None:
        _set(event, wild, draw(STRINGS[wild]))
    return event


def _set(event: dict[str, Any], field: str, value: Any) -> None:
    if field.startswith("data."):
        event["data"][field.removeprefix("data.")] = value
    else:
        event[field] = value


TENANT_RE = r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}\Z"


@st.composite
def mutated_events(draw: st.DrawFn) -> Any:
    event: Any = draw(base_events())
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["remove", "retype", "string", "enum", "extra", "root"]))
        field = draw(st.sampled_from([*TOP, *(f"data.{name}" for name in DATA)]))
        parent = event
        if field.startswith("data."):
            parent = event.get("data") if isinstance(event, dict) else None
            name = field.removeprefix("data.")
        else:
            name = field
        if kind == "root":
            event = draw(any_json)
        elif not isinstance(parent, dict):
            continue
        elif kind == "remove":
            parent.pop(name, None)
        elif kind == "retype":
            parent[name] = draw(any_json)
        elif kind == "string":
            parent[name] = draw(STRINGS.get(field, _text))
        elif kind == "enum":
            parent[name] = draw(enum_strings)
        else:  # an extra member, allowed and ignored
            parent[draw(_text.filter(lambda k: k not in TOP + DATA))] = draw(any_json)
    return event


def _assert_agree(event: Any, ascii_only: bool = True, as_bytes: bool = True) -> None:
    text = json.dumps(event, ensure_ascii=ascii_only)
    raw: bytes | str = text.encode() if as_bytes else text
    instance = _strict_loads(raw)
    try:
        VALIDATOR.validate(instance)
    except ValidationError:
        schema_ok = False
    else:
        schema_ok = True
    result = parse(raw)
    verdict = "accepts" if schema_ok else f"rejects ({_schema_errors(instance)})"
    assert schema_ok == isinstance(result, Event), f"schema {verdict}, parse -> {result!r}"


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_settings(1500)
@given(event=mutated_events(), ascii_only=st.booleans(), as_bytes=st.booleans())
@example(event={"data": []}, ascii_only=True, as_bytes=True)
def test_mutated_events_agree(event: Any, ascii_only: bool, as_bytes: bool) -> None:
    _assert_agree(event, ascii_only, as_bytes)


def _valid_event() -> dict[str, Any]:
    return _strict_loads((EXAMPLES / "valid" / "vm-rental-utc-z.json").read_bytes())


@_settings(800)
@given(time=times, ascii_only=st.booleans())
# Valid RFC 3339 times whose UTC instant leaves years 0001-9999 (found by hypothesis).
@example(time="0001-01-01T00:00:00+00:01", ascii_only=True)
@example(time="9999-12-31T23:00:00-01:00", ascii_only=True)
def test_times_agree(time: str, ascii_only: bool) -> None:
    event = _valid_event()
    event["time"] = time
    _assert_agree(event, ascii_only)


@_settings(500)
@given(tenant_id=tenants, ascii_only=st.booleans())
def test_tenant_ids_agree(tenant_id: str, ascii_only: bool) -> None:
    event = _valid_event()
    event["data"]["tenant_id"] = tenant_id
    _assert_agree(event, ascii_only)


@_settings(500)
@given(workload_id=workload_ids, ascii_only=st.booleans())
def test_workload_ids_agree(workload_id: str, ascii_only: bool) -> None:
    event = _valid_event()
    event["data"]["workload_id"] = workload_id
    _assert_agree(event, ascii_only)
