"""The fence on real runs: a close paused (SIGSTOP) while publishing, unlocked, overtaken by a
second close and resumed (SIGCONT) leaves the published period exactly as the winner wrote it;
leftovers of earlier attempts never survive a rerun; a backfill interrupted before its manifest and
rerun another day leaves each document number once; a failure after the manifest is a warning."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows.cli import app
from flows.store import LocalStore, StoreError, open_store

GOLDEN = Path(__file__).parent / "golden"
PLANS = str(GOLDEN / "plans")
PERIOD = "2026-10"
MANIFEST = f"billing/period={PERIOD}/manifest.json"
LEFTOVER = f"billing/period={PERIOD}/invoices/INV-2026-10-000052.html"  # an earlier attempt's invoice
LATE_KEY = "usage/date=2026-10-25/late.csv"
LATE_EVENT = ("event_id,customer_id,meter,quantity,timestamp,model,region\n"
              "l1,c1,input_tokens,100000,2026-10-25T00:00:00Z,gpt-4o,eu\n")
runner = CliRunner()

pytestmark = pytest.mark.slow


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def billrun_process(*args: str, pause: str | None = None, fault: str | None = None) -> subprocess.Popen:
    """`billrun ...` in its own process, on the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "ERROR"}
    env.pop("BILLRUN_FAULT_AT", None)
    env.pop("BILLRUN_PAUSE_AT", None)
    env.update({k: v for k, v in (("BILLRUN_PAUSE_AT", pause), ("BILLRUN_FAULT_AT", fault)) if v})
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_stopped(process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited before pausing: {process.communicate()}")
        with open(f"/proc/{process.pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.2)
    process.kill()
    pytest.fail("never paused")


def period_files(store: str) -> dict[str, bytes]:
    s = open_store(store)
    return {o.key: s.read_bytes(o.key) for o in s.list(f"billing/period={PERIOD}/")}


def private_state(store: str) -> list[str]:
    """What runs keep while they run: locks, claims, staging."""
    return [o.key for o in open_store(store).list("billing/_state/")
            if o.key.split("/")[2] in ("locks", "claims", "runs")]


def assert_consistent(files: dict[str, bytes]) -> None:
    """Every output the manifest lists is there with its sha256, and nothing else is."""
    manifest = json.loads(files[MANIFEST])
    assert sorted(files) == sorted([o["key"] for o in manifest["outputs"]] + [MANIFEST])
    assert [o["key"] for o in manifest["outputs"]
            if hashlib.sha256(files[o["key"]]).hexdigest() != o["sha256"]] == []


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_a_paused_close_that_lost_its_lock_never_rewrites_the_published_period(prefect_server, tmp_path, backend,
                                                                                request):
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
        store = f"s3://{request.getfixturevalue('s3_bucket')}/paused"
    else:
        store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    open_store(store).put_bytes(LEFTOVER, b"<html>a subscription an earlier attempt billed</html>")

    paused = billrun_process("close", "--period", PERIOD, "--store", store, "--plans", PLANS, pause="staged")
    request.addfinalizer(paused.kill)  # never leave a stopped process behind, whatever fails
    wait_until_stopped(paused)  # claimed and staged, about to copy into the period
    open_store(store).put_bytes(LATE_KEY, LATE_EVENT.encode())  # the winner bills one event more
    assert cli("unlock", "--period", PERIOD, "--store", store).exit_code == 0
    winner = cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS)
    assert winner.exit_code == 0 and " closed (run " in winner.stdout, winner.output
    published = period_files(store)
    assert_consistent(published)  # the leftover invoice is gone too
    assert LEFTOVER not in published
    assert LATE_KEY in {i["key"] for i in json.loads(published[MANIFEST])["inputs"]}

    os.kill(paused.pid, signal.SIGCONT)
    _, err = paused.communicate(timeout=300)
    assert period_files(store) == published  # not one byte rewritten, nothing added
    assert paused.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("billrun: error: ") and "it writes nothing more" in last, err
    assert "Traceback" not in err
    assert private_state(store) == []  # no lock, claim or staging left behind


@pytest.fixture(scope="module")
def closed_folder(prefect_server, tmp_path_factory) -> str:
    store = str(tmp_path_factory.mktemp("closed") / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    assert cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS).exit_code == 0
    return store


def test_a_backfill_interrupted_before_its_manifest_and_rerun_another_day_issues_each_number_once(
        closed_folder, tmp_path):
    store = str(shutil.copytree(closed_folder, tmp_path / "store"))
    plans = Path(shutil.copytree(GOLDEN / "plans", tmp_path / "plans"))
    tok = plans / "tok-v1.yaml"
    tok.write_text(tok.read_text().replace('unit_price: "2.50", per: 1000000', 'unit_price: "3.00", per: 1000000'))
    args = ("backfill", "--from", PERIOD, "--to", PERIOD, "--reason", "price rise", "--store", store,
            "--plans", str(plans))

    killed = billrun_process(*args, "--as-of", "2026-12-05", fault="backfill-copied")
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -9, err
    written = [o.key for o in open_store(store).list("billing/corrections/")]
    assert any(k.endswith("/documents/DN-2026-10-000001.html") for k in written)  # copied, no manifest yet

    assert cli("unlock", "--period", PERIOD, "--store", store).exit_code == 0
    rerun = cli(*args, "--as-of", "2026-12-06", "--json")
    assert rerun.exit_code == 0, rerun.output
    run_id = json.loads(rerun.stdout)["run_id"]
    everything = [o.key for o in open_store(store).list("")]
    assert [k for k in everything if k.endswith("DN-2026-10-000001.html")] == [
        f"billing/corrections/run={run_id}/documents/DN-2026-10-000001.html"]
    assert {k.split("/")[2] for k in everything if k.startswith("billing/corrections/")} == {f"run={run_id}"}
    assert private_state(store) == []


class _TidyingFails(LocalStore):
    """S3 gone right after the manifest: deletes of private state fail."""

    def delete(self, key: str) -> None:
        if key.startswith("billing/_state/"):
            raise StoreError(f"{self.uri}/{key}: cannot delete: connection refused")
        super().delete(key)

    def delete_prefix(self, prefix: str) -> None:
        raise StoreError(f"{self.uri}/{prefix}: cannot delete: connection refused")


def test_a_failure_after_the_manifest_is_a_warning_and_its_lock_does_not_block_the_next_backfill(
        prefect_server, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    import flows.store

    with monkeypatch.context() as patched:
        patched.setattr(flows.store, "LocalStore", _TidyingFails)
        closed = cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS)
    assert closed.exit_code == 0, closed.output  # the period closed: the command did its job
    assert " closed (run " in closed.stdout
    warnings = [line for line in closed.stderr.splitlines() if line.startswith("billrun: warning: ")]
    assert any("could not release the lock of 2026-10" in w for w in warnings), closed.stderr
    assert any("published, but could not tidy up" in w for w in warnings), closed.stderr
    assert open_store(store).exists(f"billing/_state/locks/period={PERIOD}.lock")  # left behind ...
    assert_consistent(period_files(store))

    backfill = cli("backfill", "--from", PERIOD, "--to", PERIOD, "--as-of", "2026-12-05", "--store", store,
                   "--plans", PLANS)
    assert backfill.exit_code == 0, backfill.output  # ... and known stale: its run had published
    assert "nothing to correct" in backfill.stdout
    assert open_store(store).list("billing/_state/locks/") == []


def test_a_close_refuses_a_linked_usage_file_in_one_line_and_writes_nothing(prefect_server, tmp_path):
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    secret = tmp_path / "credentials.csv"
    secret.write_text("event_id,customer_id,meter,quantity,timestamp\nAKIAEXAMPLESECRET,c1,images,1,x\n")
    os.symlink(secret, Path(store) / "usage" / "creds.csv")
    refused = cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS)
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"billrun: error: {store}/usage/creds.csv: is a symbolic link; billrun neither reads nor writes through "
        f"links inside a store (put the file or folder itself there)")
    assert "Traceback" not in refused.output and "AKIAEXAMPLESECRET" not in refused.output
    assert [o.key for o in open_store(store).list("billing/")] == []
