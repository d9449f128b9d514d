"""A month's final record says what the running record of the same state says."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from meter.domain import Ledger, Rate, load_ratecards
from meter.stream.closing import HomeClose, tenant_report
from meter.stream.records import usage_record

CARDS = load_ratecards()
GRACE = timedelta(days=2)
RATES = sorted(
    {
        (points, c.version, lic or "")
        for c in CARDS.cards
        for by_license in c.rates.values()
        for lic, points in by_license.items()
    }
)
entries = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["vm", "replica", "cloud_vm"]),
    st.sampled_from(["1", "2", "3"]),
    st.sampled_from(RATES),
)


@settings(max_examples=200)
@given(st.lists(entries, min_size=1, max_size=40))
def test_final_tenant_month_has_the_running_revision(
    log: list[tuple[str, str, str, Rate]],
) -> None:
    month = "2026-11"
    ledger = Ledger(height=CARDS.height)
    for t, w, i, r in log:
        ledger.add(t, month, w, i, r)
    hc = HomeClose(height=CARDS.height)
    hc.finals[month] = hc.snapshot(ledger, month)
    for tm in ledger.tenant_months():
        final = hc.final_tenant_month(tm.tenant_id, month)
        assert final.revision == tm.revision
        assert usage_record(final, "t") == usage_record(tm, "t")
        assert tenant_report(final, GRACE) == tenant_report(tm, GRACE)
