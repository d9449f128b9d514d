import logging

from meter.cli.logs import RepeatFilter


def record(name: str, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None)


def test_repeats_are_collapsed_and_counted() -> None:
    f = RepeatFilter(window=0.05)
    assert f.filter(record("aiokafka", "Unable connect to node %s"))
    assert not any(f.filter(record("aiokafka", "Unable connect to node %s")) for _ in range(5))
    assert f.filter(record("aiokafka.conn", "other"))
    # every logger: the worker's own, and asyncio's accept() when fds run out
    assert f.filter(record("meter.stream.worker", "held back too"))
    assert not f.filter(record("meter.stream.worker", "held back too"))
    assert f.filter(record("asyncio", "socket.accept() out of system resource"))
    assert not any(
        f.filter(record("asyncio", "socket.accept() out of system resource")) for _ in range(99)
    )
    import time

    time.sleep(0.06)
    again = record("aiokafka", "Unable connect to node %s")
    assert f.filter(again)
    assert "[5 more like this" in str(again.msg)


def test_the_kinds_remembered_are_bounded() -> None:
    f = RepeatFilter(window=60)
    for i in range(3 * RepeatFilter.MAX_KINDS):
        assert f.filter(record("meter", f"built with an f-string {i}"))
    assert len(f._seen) <= RepeatFilter.MAX_KINDS + 1


def test_lines_that_differ_in_their_arguments_all_show_outside_aiokafka() -> None:
    f = RepeatFilter(window=60)
    closes = [
        logging.LogRecord("meter.stream.worker", logging.INFO, __file__, 1,
                          "closed %s on home partition %d", ("2026-10", n), None)
        for n in range(3)
    ]  # fmt: skip
    assert all(f.filter(r) for r in closes)
    assert not f.filter(closes[0])  # the same line again is held back
