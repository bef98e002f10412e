"""Stopping on SIGINT/SIGTERM at a step boundary: the first signal sets a flag the loop reads
(it saves a checkpoint and raises :class:`eosbranch.errors.Interrupted`), a second one stops now."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.stop = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.stop:  # a second Ctrl-C means now
                signal.default_int_handler(signum, frame)
            self.stop = True

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
