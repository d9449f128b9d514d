import logging

from meter.cli.logs import RepeatFilter


def record(name: str, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None)


def test_repeats_are_collapsed_and_counted() -> None:
    f = RepeatFilter(window=0.05)
    assert f.filter(record("aiokafka", "Unable connect to node %s"))
    assert not any(f.filter(record("aiokafka", "Unable connect to node %s")) for _ in range(5))
    assert f.filter(record("aiokafka.conn", "other"))
    assert f.filter(record("meter.stream.worker", "never held back"))
    assert f.filter(record("meter.stream.worker", "never held back"))
    import time

    time.sleep(0.06)
    again = record("aiokafka", "Unable connect to node %s")
    assert f.filter(again)
    assert "[5 more like this" in str(again.msg)
