import pytest

from meter.domain.month import TimeError, utc_date, utc_month


@pytest.mark.parametrize(
    ("value", "month"),
    [
        ("2026-11-03T10:00:00Z", "2026-11"),
        ("2026-11-01T01:30:00+02:00", "2026-10"),  # the example: October in UTC
        ("2026-10-31T23:30:00-01:00", "2026-11"),
        ("2026-12-31T23:00:00-02:00", "2027-01"),
        ("2027-01-01T00:59:59+01:00", "2026-12"),
        ("2027-01-01T01:00:00+01:00", "2027-01"),
        ("2028-02-29T23:00:00-01:00", "2028-03"),  # leap day, next month in UTC
        ("2026-03-01T00:00:00+00:01", "2026-02"),
        ("2026-11-30T23:59:60Z", "2026-11"),  # leap second
        ("2026-11-03t10:00:00.123456789z", "2026-11"),
        ("2026-11-01T00:00:00-00:00", "2026-11"),
        ("2026-11-01T00:00:00+23:59", "2026-10"),
    ],
)
def test_utc_month(value: str, month: str) -> None:
    assert utc_month(value)[0] == month
    y, m, _ = utc_date(value)
    assert f"{y:04d}-{m:02d}" == month


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-03T10:00:00",  # no zone: never guessed
        "2026-11-03T10:00Z",  # no seconds
        "2026-11-03 10:00:00Z",  # space
        "2026-02-29T10:00:00Z",  # not a leap year
        "2026-04-31T10:00:00Z",
        "2026-13-01T10:00:00Z",
        "2026-00-01T10:00:00Z",
        "2026-11-03T24:00:00Z",
        "2026-11-03T10:60:00Z",
        "2026-11-03T10:00:61Z",
        "2026-11-03T10:00:00+24:00",
        "2026-11-03T10:00:00+02:60",
        "2026-11-03T10:00:00+0200",
        "2026-11-03T10:00:00.Z",
        "0000-01-01T00:00:00Z",
        "２０２６-11-03T10:00:00Z",  # full-width digits
        "2026-11-03T10:00:00Z\n",
        "",
    ],
)
def test_rejects(value: str) -> None:
    with pytest.raises(TimeError):
        utc_month(value)


def test_cache_does_not_hide_bad_seconds() -> None:
    assert utc_month("2026-11-03T10:00:59Z")[0] == "2026-11"
    with pytest.raises(TimeError):
        utc_month("2026-11-03T10:00:99Z")
