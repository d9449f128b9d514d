"""The license view (vendor rules) is a join: it equals a brute-force reading of the rules.

The reference below is written straight from the vendor's rules, with ``datetime.date``
and nothing of :mod:`meter.domain.license` but its row type: for each month M with
B = the first day of M+1, the counted workloads are those with a session in
[B - 31 days, B); ``first(w)`` is the month of w's earliest session; w is new in M iff
``first(w) == M`` and M is after the history start; a workload is charged once, at the
highest rate of its sessions in the window; rows are totals per tenant and type.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from meter.domain import Ledger, Rate, Rater, load_ratecards
from meter.domain.license import LicenseLedger, LicenseRow, tail_month
from tests.domain.events import line

#: (tenant, UTC date, workload type, workload id, rate)
Session = tuple[str, date, str, str, Rate]

RATES: list[Rate] = sorted(
    [
        (0, "v1", "rental"),
        (0, "v2", "rental"),
        (3, "v1", "perpetual"),
        (5, "v1", "subscription"),
        (5, "v2", "subscription"),
        (10, "v1", "rental"),
        (10, "v2", "subscription"),
    ]
)
#: Strictly increasing in the rate order, so a rate that climbs always moves the revision.
HEIGHTS = {r: r[0] + 2 * i + 2 for i, r in enumerate(RATES)}


def height(rate: Rate) -> int:
    return HEIGHTS[rate]


#: Month ends are where the rules bite: the tails of January (into a leap and a
#: non-leap February), 31 March (into April), 31 July (not into August), 31 December.
EDGES = [
    date(2027, 12, 31),
    date(2028, 1, 1),
    date(2028, 1, 28),
    date(2028, 1, 29),
    date(2028, 1, 30),
    date(2028, 1, 31),
    date(2028, 2, 1),
    date(2028, 2, 29),
    date(2028, 3, 1),
    date(2028, 3, 30),
    date(2028, 3, 31),
    date(2028, 4, 1),
    date(2028, 4, 30),
    date(2029, 1, 29),
    date(2029, 1, 31),
    date(2029, 2, 28),
    date(2029, 7, 31),
    date(2029, 8, 1),
]
days = st.one_of(
    st.sampled_from(EDGES),
    st.dates(date(2027, 12, 1), date(2028, 5, 31)),
    st.dates(date(2029, 1, 1), date(2029, 3, 31)),
)
sessions_st = st.tuples(
    st.sampled_from(["a", "b"]),
    days,
    st.sampled_from(["vm", "replica"]),
    st.sampled_from(["1", "2", "3"]),
    st.sampled_from(RATES),
)
starts = st.sampled_from([None, "2027-11", "2028-01", "2028-02", "2028-03", "2029-02"])


def month_of(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def first_of_next(month: str) -> date:
    y, m = int(month[:4]), int(month[5:7])
    return date(y + 1, 1, 1) if m == 12 else date(y, m + 1, 1)


def reference(sessions: list[Session], history_start: str | None = None) -> list[LicenseRow]:
    """The license rows the vendor's rules give, by brute force: months from the declared
    history start on (every month when none is declared); new workloads only in months
    after a declared start."""
    if not sessions:
        return []
    first: dict[tuple[str, str, str], str] = {}
    for t, d, w, i, _ in sessions:
        m = month_of(d)
        first[(t, w, i)] = min(first.get((t, w, i), m), m)
    candidates = {month_of(s[1]) for s in sessions} | {
        month_of(first_of_next(month_of(s[1]))) for s in sessions
    }
    rows: list[LicenseRow] = []
    for month in sorted(candidates):
        if history_start is not None and month < history_start:
            continue  # metering had not begun: no report
        end = first_of_next(month)
        begin = end - timedelta(days=31)
        rate: dict[tuple[str, str, str], Rate] = {}
        for t, d, w, i, r in sessions:
            if begin <= d < end:
                rate[(t, w, i)] = max(rate.get((t, w, i), r), r)
        groups: dict[tuple[str, str], list[int]] = {}
        for (t, w, i), r in rate.items():
            new = history_start is not None and first[(t, w, i)] == month and month > history_start
            g = groups.setdefault((t, w), [0, 0, 0, 0, 0])
            g[0] += 1
            g[1] += new
            g[2] += r[2] == "rental" and r[0] == 0  # a rental machine: free for rental
            g[3] += 0 if new else r[0]
            g[4] += r[0] if new else 0
        rows += [LicenseRow(month, t, w, *g) for (t, w), g in sorted(groups.items())]
    return rows


def feed(view: LicenseLedger, s: Session) -> None:
    """One session as a worker joins it: its calendar month, then the next month's window
    when it falls in the last days that window reaches back to."""
    t, d, w, i, r = s
    view.add(t, month_of(d), w, i, r)
    nxt = tail_month(d.year * 10000 + d.month * 100 + d.day)
    if nxt is not None:
        view.add_tail(t, nxt, w, i, r)


def ledger_of(sessions: list[Session], history_start: str | None = None) -> LicenseLedger:
    view = LicenseLedger(Ledger(height), history_start, height)
    for s in sessions:
        feed(view, s)
    return view


def shuffled_with_repeats(sessions: list[Session], seed: int) -> list[Session]:
    rnd = random.Random(seed)
    out = sessions + [rnd.choice(sessions) for _ in range(len(sessions) // 2)] if sessions else []
    rnd.shuffle(out)
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(sessions_st, max_size=30), st.integers(0, 2**32), starts)
def test_rows_equal_the_brute_force_rules_at_every_step(
    sessions: list[Session], seed: int, history_start: str | None
) -> None:
    order = shuffled_with_repeats(sessions, seed)
    view = LicenseLedger(Ledger(height), history_start, height)
    for n, s in enumerate(order, 1):
        feed(view, s)
        assert view.rows() == reference(order[:n], history_start), order[:n]
    assert view.rows() == reference(sessions, history_start)
    assert view.history_start == history_start  # declared, never taken from the data


@settings(max_examples=300, deadline=None)
@given(st.lists(sessions_st, max_size=40), st.integers(0, 40), st.integers(0, 2**32), starts)
def test_two_ledgers_of_a_split_merge_into_one_of_all(
    sessions: list[Session], cut: int, seed: int, history_start: str | None
) -> None:
    order = shuffled_with_repeats(sessions, seed)
    whole = ledger_of(order, history_start)
    left, right = order[:cut], order[cut:]
    ab = ledger_of(left, history_start).merge(ledger_of(right, history_start))
    ba = ledger_of(right, history_start).merge(ledger_of(left, history_start))
    assert ab == ba == whole
    assert ab.rows() == ba.rows() == whole.rows() == reference(sessions, history_start)
    again = ledger_of(order, history_start).merge(whole)  # merging a ledger with itself
    assert again.rows() == whole.rows()


def content(view: LicenseLedger) -> dict[tuple[str, str], tuple[list[LicenseRow], int]]:
    return {
        (lm.tenant_id, lm.month): (lm.rows(), lm.revision)
        for lm in view.tenant_months()
        if lm.rows()
    }


@settings(max_examples=400, deadline=None)
@given(
    st.lists(sessions_st, max_size=30),
    st.integers(0, 2**32),
    st.sampled_from(["2027-11", "2028-01", "2028-02", "2029-02"]),
)
def test_revision_strictly_grows_whenever_a_tenant_months_rows_change(
    sessions: list[Session], seed: int, history_start: str
) -> None:
    view = LicenseLedger(Ledger(height), history_start, height)
    before = content(view)
    for s in shuffled_with_repeats(sessions, seed):
        feed(view, s)
        after = content(view)
        for key, (rows, revision) in after.items():
            old_rows, old_revision = before.get(key, ([], 0))
            assert revision >= old_revision, (key, s)
            if rows != old_rows:
                assert revision > old_revision, (key, s, old_rows, rows)
        assert set(before) <= set(after)  # a tenant-month never loses its workloads
        before = after


CARDS = load_ratecards()
#: Times of day around midnight, in UTC and in zones that move the UTC date.
CLOCKS = ["T00:00:00Z", "T12:00:00Z", "T23:59:59Z", "T00:30:00+02:00", "T23:30:00-01:00"]
events_st = st.tuples(
    st.sampled_from(["a", "b"]),
    days,
    st.sampled_from(CLOCKS),
    st.sampled_from([("vm", "rental"), ("vm", "subscription"), ("replica", "rental")]),
    st.sampled_from(["1", "2"]),
    st.sampled_from(["success", "warning", "failed"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events_st, max_size=25), st.integers(0, 2**32), starts)
def test_rater_license_view_of_event_bytes_follows_the_rules(
    events: list[tuple[str, date, str, tuple[str, str], str, str]],
    seed: int,
    history_start: str | None,
) -> None:
    sessions: list[Session] = []
    raws = []
    for n, (t, d, clock, (wtype, lic), wid, result) in enumerate(events):
        time = d.isoformat() + clock
        raws.append(line(tenant=t, workload=wid, wtype=wtype, license=lic, result=result,
                         time=time, id=f"e{n}"))  # fmt: skip
        if result != "failed":
            utc = datetime.fromisoformat(time).astimezone(UTC).date()
            rate = (CARDS.cards[0].points(wtype, lic), "vcsp-2026", lic)
            sessions.append((t, utc, wtype, wid, rate))
    random.Random(seed).shuffle(raws)
    rater = Rater(CARDS)
    for raw in raws + raws[: len(raws) // 3]:
        rater.feed(raw)
    assert rater.license_view(history_start).rows() == reference(sessions, history_start)
