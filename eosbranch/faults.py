"""Deterministic fault injection, for tests and fault-injection scripts (never needed in normal use).

A process whose environment has ``EOSBRANCH_FAULT`` acts at a *named point* of the training loop
instead of at a wall-clock moment, so a test that kills a run mid-way does so at the same place on
any machine under any load::

    EOSBRANCH_FAULT="kill@step=137"            SIGKILL itself at the top of iteration 137
    EOSBRANCH_FAULT="int@step=137"             SIGINT itself there (as a Ctrl-C would)
    EOSBRANCH_FAULT="kill@measured=180"        SIGKILL itself right after the measurement of step 180
    EOSBRANCH_FAULT="kill@stopping=180"        ... after a stop rule (--until) decided to end at 180,
                                               before the final checkpoint
    EOSBRANCH_FAULT="pause@step=200:/tmp/flag" write /tmp/flag.<pid> and wait (no timeout) until that
                                               file is removed; then go on

Several actions are separated by commas. The points are (see :mod:`eosbranch.train`):

- ``step``: the top of iteration t (state theta_t, before its checkpoint and measurement),
- ``measured``: just after iteration t's measurement (inside the measurement step: before the
  stop rule, the update and any later write),
- ``stopping``: a stop rule fired at t; the spec is about to say so and the final checkpoint follows.
- ``lock`` (step 0): a new run's directory is made, its lock not yet taken (store.new_locked).

An action fires once per process (a resumed run starts a new process, so it may fire again
if the variable is still set: tests unset it for the resume).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "EOSBRANCH_FAULT"
_fired: set = set()


def _actions():
    raw = os.environ.get(ENV, "")
    for item in filter(None, (s.strip() for s in raw.split(","))):
        action, _, rest = item.partition("@")
        point, _, arg = rest.partition("=")
        step, _, flag = arg.partition(":")
        try:
            yield item, action, point, int(step), flag
        except ValueError:
            continue


def reached(point: str, step: int) -> None:
    """Called by the trainer at each named point; does nothing unless ``EOSBRANCH_FAULT`` says so."""
    if ENV not in os.environ:
        return
    for item, action, where, at, flag in _actions():
        if where != point or at != step or item in _fired:
            continue
        _fired.add(item)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "int":
            os.kill(os.getpid(), signal.SIGINT)
        elif action == "pause" and flag:
            marker = Path(f"{flag}.{os.getpid()}")
            tmp = marker.with_name(marker.name + ".part")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, marker)  # appears whole: a test reading it finds the pid
            while marker.exists():
                time.sleep(0.01)
