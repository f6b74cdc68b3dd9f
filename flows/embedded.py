"""Nothing of a killed billrun outlives it: the embedded Prefect server and the work folders.

Without PREFECT_API_URL, Prefect starts a temporary server (a uvicorn child process) and stops it
at exit; a SIGKILLed billrun never reaches its exit handlers, so the server would run on, holding
its port and Prefect's database. `watch_embedded_server` has the server started with a watchdog:
a tiny process that waits for billrun to go away (normally or not) and then stops the server.
(PR_SET_PDEATHSIG cannot do it: Prefect may start the server from a short-lived thread, and
Linux sends that signal when the starting thread ends, not the process.)

Work folders carry their owner (machine, process and its start time); `reclaim_stale_work` removes
those whose owner is gone, whatever job they were for, when the next work folder is made.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

OWNER_FILE = ".billrun-owner"

# Runs as `python -c WATCHDOG billrun_pid server_pid`: polls twice a second; when billrun is gone
# (we are reparented), stops the server (SIGTERM, then SIGKILL after 5 s); ends when the server does.
WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
while alive(server):
    if os.getppid() != parent:
        try:
            os.kill(server, signal.SIGTERM)
            for _ in range(50):
                time.sleep(0.1)
                if not alive(server):
                    break
            else:
                os.kill(server, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break
    time.sleep(0.5)
"""


def watch_embedded_server() -> None:
    """Have Prefect's temporary server, when it starts, watched so that it stops with billrun.
    Prefect keeps one server object per port (None: any free port) in a registry; ours is put
    there first, and Prefect starts it when a flow first needs the API.

    With an API URL set (a server, Prefect Cloud, a worker's run), Prefect starts no server of its
    own: nothing to watch, and the server's modules (FastAPI, SQLAlchemy, ...: most of a command's
    start-up time) are not imported."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    from prefect.server.api.server import SubprocessASGIServer

    class WatchedServer(SubprocessASGIServer):
        def start(self, timeout: int | None = None) -> None:
            started = self.running
            super().start(timeout)
            if not started and self.server_process is not None:
                _start_watchdog(self.server_process.pid)

    if None not in SubprocessASGIServer._instances:
        SubprocessASGIServer._instances[None] = WatchedServer()


def _start_watchdog(server_pid: int) -> None:
    subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(os.getpid()), str(server_pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True, start_new_session=True)


def _started_at(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid,
    it names one process even after the pid is reused. None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def mark_owner(folder: Path) -> None:
    """Record this process as the owner of a work folder."""
    pid = os.getpid()
    (folder / OWNER_FILE).write_text(f"{socket.gethostname()} {pid} {_started_at(pid) or '-'}\n")


def _owner_gone(folder: Path) -> bool:
    try:
        host, pid, started = (folder / OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        return False  # not marked (made by an older billrun, or being made): left alone
    if host != socket.gethostname():
        return False  # a shared temporary folder: another machine's process cannot be checked
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return started != "-" and _started_at(int(pid)) not in (None, started)  # the pid was reused


def reclaim_stale_work(root: Path) -> list[Path]:
    """Remove the work folders under `root` whose owner process is gone; returns them."""
    gone = [folder for folder in sorted(root.glob("*")) if folder.is_dir() and _owner_gone(folder)]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone
