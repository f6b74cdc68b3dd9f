"""A SIGKILLed `billrun close` leaves nothing running and nothing in the temporary folder.

The close runs as a real command with Prefect embedded (no PREFECT_API_URL: billrun starts
Prefect's temporary server) and kills itself with SIGKILL after normalizing (BILLRUN_FAULT_AT),
as a lost machine or an OOM killer would: no exit handler runs. Prefect's server process must
go away with it, and the work folder it left is reclaimed when the next work folder is made.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from closeutil import copy_tree_to_store

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"


def servers_of(prefect_home: Path) -> list[int]:
    """Pids of Prefect server processes started for this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"prefect.server.api.server:create_app" not in cmdline:
                continue
            if f"PREFECT_HOME={prefect_home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads processes from /proc")
def test_a_sigkilled_close_leaves_no_server_and_no_work_folder(tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    home, tmp = tmp_path / "prefect-home", tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # the session's patience with a starting server (conftest.py): on a machine busy with the suite's
    # other workers the command's own 60 s can run out before the close even begins
    env.update(PREFECT_HOME=str(home), TMPDIR=str(tmp), BILLRUN_FAULT_AT="normalized",
               PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=os.environ[
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    try:
        # output to a file, not a pipe: a server left behind would hold a pipe open for ever
        with (tmp_path / "close.log").open("wb") as log:
            killed = subprocess.run([sys.executable, "-m", "flows.cli", "--no-progress", "close", "--period",
                                     "2026-10", "--store", store, "--plans", str(GOLDEN / "plans")],
                                    env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, timeout=600)
        assert killed.returncode == -signal.SIGKILL, (tmp_path / "close.log").read_text()[-2000:]
        deadline = time.monotonic() + 20
        while servers_of(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert servers_of(home) == []
    finally:
        for pid in servers_of(home):  # without the watchdog: do not leave it to the machine
            os.kill(pid, signal.SIGKILL)
    [left] = list((tmp / "billrun-work").iterdir())          # the killed run's folder, as it was
    assert left.name.endswith("close-2026-10")

    from flows.steps import work_dir_for

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    mine = work_dir_for(store, "nightly-2026-11-01")          # the next run, of another job
    assert sorted(p.name for p in (tmp / "billrun-work").iterdir()) == [mine.name]
    assert work_dir_for(store, "close-2026-09").exists() and mine.exists()   # a live owner's folder stays


@pytest.mark.slow
def test_a_command_with_a_server_to_talk_to_loads_no_server_of_its_own(tmp_path):
    """With PREFECT_API_URL set no temporary server can start, so none is watched, and Prefect's
    server modules (most of a command's start-up time) stay unimported."""
    program = ("import sys; from flows.cli import _quiet_user_errors; _quiet_user_errors(); "
               "print('prefect.server.api.server' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    served = subprocess.run([sys.executable, "-c", program], env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
                            capture_output=True, text=True, timeout=300)
    embedded = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert (served.stdout.strip(), embedded.stdout.strip()) == ("False", "True"), served.stderr + embedded.stderr
