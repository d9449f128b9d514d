"""Logging set-up for the commands: one line per event, repeats collapsed.

aiokafka logs each failed reconnect at ERROR (about 70 lines a second while a
broker is down), and asyncio one ``accept()`` traceback per refused connection when
file descriptors run out (3.6 MB/s seen).  :class:`RepeatFilter`, on every logger,
lets the first of a kind (logger and message template) through, holds back the same
for ``window`` seconds, then lets one through again saying how many were held back.
A kind is the logger and the whole line, or for aiokafka the message template.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final

from meter.kafka.authz import AiokafkaDenials

FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RepeatFilter(logging.Filter):
    #: Kinds remembered at most (a message built with an f-string is a kind of its own).
    MAX_KINDS: Final = 4096

    def __init__(
        self,
        window: float = 10.0,
        prefixes: tuple[str, ...] = ("",),
        by_template: tuple[str, ...] = ("aiokafka",),
    ) -> None:
        super().__init__()
        self.window = window
        self.prefixes = prefixes
        #: loggers whose lines of one template are one kind whatever their arguments
        #: (aiokafka's reconnects name a node each); elsewhere a kind is the whole line,
        #: so "closed 2026-10 on home partition 0" and "... 1" both show
        self.by_template = by_template
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        if record.name.startswith(self.by_template):
            key: tuple[str, object] = (record.name, record.msg)
        else:
            key = (record.name, record.getMessage())
        now = time.monotonic()
        last = self._seen.get(key)
        if last is None or now - last[0] >= self.window:
            held = last[1] if last else 0
            if last is None and len(self._seen) >= self.MAX_KINDS:
                self._seen = {
                    k: v for k, v in self._seen.items() if now - v[0] < self.window and v[1]
                }
            self._seen[key] = (now, 0)
            if held:
                record.msg = f"{record.msg} [{held} more like this in the last {self.window:.0f}s]"
            return True
        self._seen[key] = (last[0], last[1] + 1)
        return False


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RepeatFilter())
    handler.addFilter(AiokafkaDenials())  # meter says each denial once, naming the ACL
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if root.level > logging.DEBUG:
        # aiokafka narrates every group join at INFO; its warnings still show.
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
