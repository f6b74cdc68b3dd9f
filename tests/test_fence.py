"""Locks that carry a token, the fence that keeps a run which lost its lock out of a period, links
in a folder store, and the local work folder: the store-level rules, without a flow run.
The same rules on real closes and backfills (paused, killed, resumed) are in test_fence_e2e.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import flows.locks as locks
from flows.locks import Fence, Fenced, PeriodLocked, claim_key, lock_key, period_lock, unlock
from flows.status import store_status
from flows.steps import private_work_dir, work_dir_for
from flows.store import LocalStore, StoreError, open_store
from transforms.periods import Period

P = Period.parse("2026-10")
NOW = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)
COMMIT = "billing/period=2026-10/manifest.json"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return open_store(str(tmp_path / "store"), create=True)


def test_a_run_releases_only_its_own_lock(store):
    with period_lock(store, [P], "close 2026-10", NOW) as first:
        unlock(store, P)  # an operator takes the paused run for dead, and a second run takes the period
        second = json.dumps({"command": "close 2026-10", "host": "worker-4", "pid": 7, "token": "t-second"})
        assert store.put_if_absent(lock_key(P), second.encode())
    # the first run's `finally` left the second run's lock in place
    assert json.loads(store.read_bytes(lock_key(P)))["token"] == "t-second" != first.token


class _ReleaseFails(LocalStore):
    """A folder store whose deletes under billing/_state/ fail, as S3 does when it goes down."""

    def delete(self, key: str) -> None:
        if key.startswith("billing/_state/"):
            raise StoreError(f"s3://bucket/{key}: cannot reach the S3 endpoint: connection refused")
        super().delete(key)


def test_a_lock_that_cannot_be_released_never_hides_the_error_of_the_failed_step(tmp_path):
    store = _ReleaseFails(tmp_path)
    with pytest.raises(StoreError, match="usage/part-7.parquet"):
        with period_lock(store, [P], "close 2026-10", NOW):
            raise StoreError("s3://bucket/usage/part-7.parquet: cannot reach the S3 endpoint (fetch-inputs)")

    warnings: list[str] = []
    with period_lock(LocalStore(tmp_path / "other"), [P], "close 2026-10", NOW, warnings):
        pass
    assert warnings == []
    with period_lock(_ReleaseFails(tmp_path / "third"), [P], "close 2026-10", NOW, warnings):
        pass  # the body succeeded: a lock left behind is a warning, not a failure
    assert len(warnings) == 1 and "could not release the lock of 2026-10" in warnings[0]
    assert "billrun unlock --period 2026-10" in warnings[0]


def _killed_after_commit(store: LocalStore, commit_written: bool) -> None:
    """What a run killed right after its manifest leaves: its lock and its claim (same token)."""
    holder = {"command": "close 2026-10", "host": "worker-3", "pid": 4242, "token": "t-dead",
              "started_at": "2026-11-01T02:00:07+00:00"}
    store.put_bytes(lock_key(P), json.dumps(holder).encode())
    store.put_bytes(claim_key(P), json.dumps({"run_id": "close-2026-10-abc", "token": "t-dead", "host": "worker-3",
                                              "pid": 4242, "commit": COMMIT, "scratch": [], "debris": []}).encode())
    if commit_written:
        store.put_bytes(COMMIT, b"{}")


def test_a_lock_whose_run_published_its_manifest_does_not_block_the_next_run(store):
    _killed_after_commit(store, commit_written=True)
    assert locks.lock_state(store, "2026-10") == "stale"
    with period_lock(store, [P], "backfill 2026-10..2026-10", NOW) as hold:
        assert json.loads(store.read_bytes(lock_key(P)))["token"] == hold.token
    assert store.list("billing/_state/locks/") == []


def test_a_lock_whose_run_did_not_publish_still_blocks(store):
    _killed_after_commit(store, commit_written=False)
    assert locks.lock_state(store, "2026-10") == "held"
    with pytest.raises(PeriodLocked, match="worker-3"):
        with period_lock(store, [P], "backfill 2026-10..2026-10", NOW):
            pass


def test_status_shows_a_lock_on_a_period_without_outputs(store):
    store.put_bytes(lock_key("2026-11"), json.dumps({"command": "close 2026-11", "token": "t"}).encode())
    periods = store_status(store.uri)["periods"]
    assert [(p["period"], p["status"], p["locked"]) for p in periods] == [("2026-11", "open", True)]


def test_a_run_that_lost_its_lock_is_fenced_out(store):
    with period_lock(store, [P], "close 2026-10", NOW) as hold:
        fence = Fence(store, hold, "close-2026-10-aaa", COMMIT, ["billing/_state/runs/close-2026-10-aaa/"])
        assert fence.claim() == []
        fence.ensure()
        unlock(store, P)
        fence.ensure()  # a fresh check is trusted for FENCE_SECONDS: no read per write
        with pytest.raises(Fenced, match="lost its lock"):
            fence.ensure(force=True)


def test_a_takeover_fences_the_paused_run_and_inherits_its_folders(store, monkeypatch):
    monkeypatch.setattr(locks, "TAKEOVER_GRACE_SECONDS", 0.0)
    with period_lock(store, [P], "close 2026-10", NOW) as first:
        staging = f"billing/_state/runs/close-2026-10-aaa/{first.token}/"
        paused = Fence(store, first, "close-2026-10-aaa", COMMIT, [staging])
        paused.claim()
        unlock(store, P)
        with period_lock(store, [P], "close 2026-10", NOW) as second:
            rerun = Fence(store, second, "close-2026-10-bbb", COMMIT, ["billing/_state/runs/close-2026-10-bbb/y/"])
            assert rerun.claim() == [staging]  # the paused run's staging, for the rerun to clear
            monkeypatch.setattr(locks, "FENCE_SECONDS", 0.0)  # the paused run resumes: its check is stale
            store.put_bytes(staging + "out/invoices.parquet", b"staged after the rerun cleared it")
            with pytest.raises(Fenced):
                paused.ensure()
            paused.release()  # on its way out it removes its own staging, and nothing of the rerun's
            assert store.list(staging) == []
            assert json.loads(store.read_bytes(claim_key(P)))["token"] == second.token
            rerun.ensure()
            store.put_bytes(COMMIT, b"{}")  # the rerun publishes ...
            with pytest.raises(Fenced, match="written by another run"):
                paused.ensure()
    assert store.list("billing/_state/") == []  # ... and its lock and committed claim are gone


def test_taking_over_the_claim_of_a_live_run_waits_for_its_check_to_expire(store, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(locks.time, "sleep", slept.append)
    store.put_bytes(claim_key(P), json.dumps({"run_id": "close-2026-10-aaa", "token": "t-live", "commit": COMMIT,
                                              "host": socket.gethostname(), "pid": os.getpid(),
                                              "scratch": [], "debris": []}).encode())
    with period_lock(store, [P], "close 2026-10", NOW) as hold:
        Fence(store, hold, "close-2026-10-bbb", COMMIT, []).claim()
    assert slept == [locks.TAKEOVER_GRACE_SECONDS]

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    slept.clear()
    store.put_bytes(claim_key(P), json.dumps({"run_id": "close-2026-10-aaa", "token": "t-dead", "commit": COMMIT,
                                              "host": socket.gethostname(), "pid": gone.pid,
                                              "scratch": [], "debris": []}).encode())
    with period_lock(store, [P], "close 2026-10", NOW) as hold:
        Fence(store, hold, "close-2026-10-bbb", COMMIT, []).claim()
    assert slept == []  # that process is known dead: nothing to wait for


# ---------------------------------------------------------------------------------------------
# Links in a folder store

def test_a_linked_input_is_refused_naming_the_link(store, tmp_path):
    secret = tmp_path / "creds.csv"
    secret.write_text("aws_secret_access_key,AKIASECRET\n")
    store.put_bytes("usage/date=2026-10-01/a.csv", b"event_id\n")
    os.symlink(secret, store.root / "usage" / "creds.csv")
    with pytest.raises(StoreError, match=r"usage/creds\.csv: is a symbolic link") as raised:
        store.list("usage/")
    assert "AKIASECRET" not in str(raised.value)
    with pytest.raises(StoreError, match=r"usage/creds\.csv: is a symbolic link"):
        store.fetch(["usage/creds.csv"], tmp_path / "cache")
    with pytest.raises(StoreError, match="is a symbolic link"):
        store.read_bytes("usage/creds.csv")


def test_a_linked_folder_is_refused_when_listing_and_writing(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "billing").mkdir()
    os.symlink(outside, store.root / "billing" / "period=2026-10")
    with pytest.raises(StoreError, match=r"billing/period=2026-10: is a symbolic link"):
        store.list("billing/")
    writes = [lambda: store.put_bytes("billing/period=2026-10/invoices.parquet", b"x"),
              lambda: store.put_if_absent("billing/period=2026-10/manifest.json", b"{}"),
              lambda: store.local_folder("billing/period=2026-10/invoices/"),
              lambda: store.copy_many([("seller.yaml", "billing/period=2026-10/seller.yaml")]),
              lambda: store.delete("billing/period=2026-10/invoices.parquet")]
    store.put_bytes("seller.yaml", b"name: x\n")
    for write in writes:
        with pytest.raises(StoreError, match=r"billing/period=2026-10: is a symbolic link"):
            write()
    assert list(outside.iterdir()) == []

    linked_billing = LocalStore(tmp_path / "second")
    (tmp_path / "second").mkdir()
    os.symlink(outside, tmp_path / "second" / "billing")
    with pytest.raises(StoreError, match=r"second/billing: is a symbolic link"):
        linked_billing.put_bytes("billing/period=2026-10/manifest.json", b"{}")
    assert list(outside.iterdir()) == []


def test_a_store_reached_through_a_link_is_that_store(tmp_path):
    real = open_store(str(tmp_path / "real"), create=True)
    os.symlink(tmp_path / "real", tmp_path / "alias")
    alias = open_store(str(tmp_path / "alias"))
    alias.put_bytes("usage/a.csv", b"x")  # the root may be a link: only links inside are refused
    assert [o.key for o in real.list("")] == ["usage/a.csv"]


def test_the_work_folder_is_keyed_on_the_resolved_store(tmp_path, monkeypatch):
    for name in ("team-a", "team-b"):
        (tmp_path / name / "billing-data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "team-a")
    first = work_dir_for("./billing-data", "close-2026-10")
    monkeypatch.chdir(tmp_path / "team-b")
    second = work_dir_for("./billing-data", "close-2026-10")
    assert first != second and first.exists() and second.exists()  # neither run empties the other's
    assert work_dir_for(str(tmp_path / "team-b" / "billing-data"), "close-2026-10") == second


def test_two_runs_without_a_period_lock_never_share_a_work_folder(tmp_path):
    # two `impact` (or `simulate`) runs with the same arguments at once: the second must not empty
    # the first's folder under it
    store = str(tmp_path / "billing-data")
    first = private_work_dir(store, "impact-abc")
    (first / "inputs").mkdir()
    second = private_work_dir(store, "impact-abc")
    assert first != second and (first / "inputs").is_dir() and second.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_move_prefix_leaves_nothing_behind_in_the_source(backend, tmp_path, request):
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
        store = open_store(f"s3://{request.getfixturevalue('s3_bucket')}/moved")
    else:
        store = open_store(str(tmp_path / "store"), create=True)
    keys = [f"billing/_state/runs/r/out/invoices/INV-{n}.html" for n in range(3)]
    for key in keys:
        store.put_bytes(key, key.encode())
    store.put_bytes("billing/period=2026-10/invoices/INV-0.html", b"an earlier attempt's copy")  # no one-step rename
    store.move_prefix("billing/_state/runs/r/out/invoices/", "billing/period=2026-10/invoices/", keys)
    assert store.list("billing/_state/") == []
    assert {o.key: store.read_bytes(o.key) for o in store.list("billing/period=2026-10/")} == {
        k.replace("_state/runs/r/out", "period=2026-10"): k.encode() for k in keys}
