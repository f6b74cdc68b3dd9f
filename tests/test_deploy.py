"""prefect.yaml as a data team uses it: a real Prefect server, the `billrun` process pool,
`prefect --no-prompt deploy --all`, a process worker, and runs triggered from outside.

Everything runs in subprocesses with an environment of their own (their own PREFECT_HOME and
PREFECT_API_URL), never the session's in-process harness. The repository is copied first, as a
checkout on a billing box would be, so deploying leaves nothing behind in it and the test shows
that the worker runs the code from the folder it was deployed from.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.states import Scheduled

from transforms.periods import Period

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_STARTUP_S = 180  # generous: a loaded 2-core machine answers its first health check late
RUN_TIMEOUT_S = 180

pytestmark = pytest.mark.slow  # a Prefect server, a worker and deployments of its own (subprocesses)


@dataclass
class Deployed:
    api_url: str
    env: dict[str, str]
    code_dir: Path
    logs: Path

    def prefect(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=self.code_dir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.api_url)

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.logs.glob("*.log")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A process in a group of its own, so teardown stops it with whatever it started."""
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            pass
    try:  # the group may outlive its leader (a flow run the worker started)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _wait_healthy(api_url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_STARTUP_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited {server.returncode}:\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"prefect server not healthy after {SERVER_STARTUP_S}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A Prefect server with billrun's deployments and a worker on the `billrun` pool."""
    root = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_WORKER_QUERY_SECONDS="1")  # poll often: the test waits on every pickup
    code_dir = root / "billrun"
    shutil.copytree(REPO, code_dir, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".hypothesis", "__pycache__", "billing-data", ".prefect", ".bench"))
    logs = root / "logs"
    logs.mkdir()
    deployed = Deployed(api_url, env, code_dir, logs)
    procs: list[subprocess.Popen] = []
    try:
        server = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                        env, root, logs / "server.log")
        procs.append(server)
        _wait_healthy(api_url, server, logs / "server.log")
        deployed.prefect("work-pool", "create", "billrun", "--type", "process")
        deployed.prefect("deploy", "--all")
        procs.append(_start([PREFECT, "worker", "start", "--pool", "billrun"], env, root, logs / "worker.log"))
        yield deployed
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _wait_final(client: SyncPrefectClient, run_id: UUID, deployed: Deployed) -> FlowRun:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        # a failed nightly run waits 10 minutes to retry: report its first failure instead
        if run.state is not None and (run.state.is_final() or run.state.name == "AwaitingRetry"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} not finished after {RUN_TIMEOUT_S}s "
                         f"(state {run.state}):\n{deployed.log_tails()}")


def _manifest(store: Path, period: str) -> dict:
    return json.loads((store / "billing" / f"period={period}" / "manifest.json").read_text())


def test_deploy_all_registers_the_deployments_with_pull_step_schedule_and_limits(deployed: Deployed) -> None:
    with deployed.client() as client:
        monthly = client.read_deployment_by_name("monthly-close/monthly-close")
        close = client.read_deployment_by_name("close-period/close")
        backfill = client.read_deployment_by_name("backfill-range/backfill")
        nightly = client.read_deployment_by_name("nightly-run/nightly")

    [schedule] = monthly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 1 * *", "UTC", True)
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 0 * * *", "UTC", True)
    assert close.schedules == [] and backfill.schedules == []
    for deployment in (monthly, close, backfill, nightly):
        assert deployment.work_pool_name == "billrun"
        [step] = deployment.pull_steps
        directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
        assert Path(directory).resolve() == deployed.code_dir.resolve()  # /tmp may be a symlink (macOS)
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.parameters == {"store": "./billing-data", "plans": "./plans"}
    assert set(monthly.tags) == {"billrun", "close"}
    assert set(nightly.tags) == {"billrun", "nightly"}


def test_worker_runs_a_close_triggered_from_the_cli_and_late_scheduled_monthly_close_and_nightly(
        deployed: Deployed, tmp_path: Path) -> None:
    close_store, monthly_store, nightly_store = (tmp_path / "close-store", tmp_path / "monthly-store",
                                                 tmp_path / "nightly-store")
    for store in (close_store, monthly_store, nightly_store):
        shutil.copytree(GOLDEN / "store", store)
    plans = str(GOLDEN / "plans")

    # The person's way: trigger the close deployment from the command line.
    out = deployed.prefect("deployment", "run", "close-period/close", "--param", "period=2026-10",
                           "--param", f"store={close_store}", "--param", f"plans={plans}")
    close_run_id = UUID(out.split("UUID:")[1].split()[0])

    # The scheduler's way: a monthly-close run scheduled for 02:00 on the 1st of last month that the
    # worker only picks up now. It must close the month before its *scheduled* start, two months
    # before today's, not the month before today.
    this_month = Period.containing(datetime.now(timezone.utc).date())
    scheduled_at = this_month.previous().start_at + timedelta(hours=2)
    expected = this_month.previous().previous()
    with deployed.client() as client:
        monthly = client.read_deployment_by_name("monthly-close/monthly-close")
        monthly_run = client.create_flow_run_from_deployment(
            monthly.id, parameters={"store": str(monthly_store), "plans": plans},
            state=Scheduled(scheduled_time=scheduled_at))
        # A nightly run scheduled for 00:30 on 2026-10-16 (long past) brings the day before to date.
        nightly = client.read_deployment_by_name("nightly-run/nightly")
        nightly_run = client.create_flow_run_from_deployment(
            nightly.id, parameters={"store": str(nightly_store), "plans": plans},
            state=Scheduled(scheduled_time=datetime(2026, 10, 16, 0, 30, tzinfo=timezone.utc)))
        close_run = _wait_final(client, close_run_id, deployed)
        monthly_run = _wait_final(client, monthly_run.id, deployed)
        nightly_run = _wait_final(client, nightly_run.id, deployed)

    assert close_run.state.is_completed(), f"{close_run.state}\n{deployed.log_tails()}"
    assert monthly_run.state.is_completed(), f"{monthly_run.state}\n{deployed.log_tails()}"
    assert _manifest(close_store, "2026-10")["period"] == "2026-10"
    assert _manifest(monthly_store, str(expected))["period"] == str(expected)
    assert sorted(p.name for p in (monthly_store / "billing").glob("period=*")) == [f"period={expected}"]
    assert nightly_run.state.is_completed(), f"{nightly_run.state}\n{deployed.log_tails()}"
    night = json.loads((nightly_store / "billing" / "nightly" / "date=2026-10-15" / "manifest.json").read_text())
    assert (night["date"], night["period"]) == ("2026-10-15", "2026-10")
    assert [p.name for p in (nightly_store / "billing" / "nightly").iterdir()] == ["date=2026-10-15"]
