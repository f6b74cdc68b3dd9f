"""The test seam: where the crash tests stop a real run. Test-only; nothing here is a setting.

Production code marks the moments where a crash matters with `fault_point("staged")`. The crash
tests (tests/test_killed_close.py, test_resume.py, test_fence_e2e.py, test_tables.py) start a real
`billrun` process with one of two variables set, and it stops at the named point:

- `BILLRUN_FAULT_AT=<point>`: SIGKILL, as a power cut would (no cleanup, no `finally`);
- `BILLRUN_PAUSE_AT=<point>`: SIGSTOP, as a suspended machine would, until the test sends SIGCONT
  (once per process: a resumed run goes on).

Nothing else names these variables, and they are deliberately not in `flows.settings.Settings`:
a point must act in whichever process reaches it (a task thread, a Dask worker), at the moment
it is reached, without a test hook threaded through every production signature. So they are
read when a point is reached, through flows/settings.py's accessor of the environment (the one
module that touches it). With neither variable set, which is every run but a test's, a point
does nothing.
"""
from __future__ import annotations

import os
import signal

from flows.settings import drop_variable, named_variable

FAULT_ENV = "BILLRUN_FAULT_AT"
PAUSE_ENV = "BILLRUN_PAUSE_AT"

CLOSE_FAULT_POINTS = ("locked", "fetched", "checked", "normalized", "settled", "rated", "written", "staged",
                      "copied-first", "copied-all", "manifest-written")
"""Where the resume tests kill a close, in the order a close reaches them."""
BACKFILL_FAULT_POINTS = ("backfill-staged", "backfill-copied", "backfill-committed")
TABLES_FAULT_POINTS = ("table-committed",)
PAUSE_POINTS = ("fence-checked",)
"""Where a run can only be paused: right after a fence check, before the write it allows."""
POINTS = CLOSE_FAULT_POINTS + BACKFILL_FAULT_POINTS + TABLES_FAULT_POINTS + PAUSE_POINTS
"""Every point the code marks (a test holds the code's `fault_point` calls to this list)."""


def fault_point(name: str) -> None:
    """Kill this process here (SIGKILL) when BILLRUN_FAULT_AT names this point; else pause it
    here when BILLRUN_PAUSE_AT does (see pause_point); else nothing."""
    if named_variable(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause_point(name)


def pause_point(name: str) -> None:
    """Stop this process here (SIGSTOP) when BILLRUN_PAUSE_AT names this point, until it gets
    SIGCONT. Once per process: the variable is dropped before the stop."""
    if named_variable(PAUSE_ENV) == name:
        drop_variable(PAUSE_ENV)
        os.kill(os.getpid(), signal.SIGSTOP)
