"""Kill a close at every step, rerun it, and get the bytes of a clean run; two closes at once
publish once. Kills are real SIGKILLs of a real `billrun close` process (BILLRUN_FAULT_AT)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows.cli import app
from flows.publish import closed_manifest
from flows.store import open_store
from flows.testing_seam import CLOSE_FAULT_POINTS
from transforms.periods import Period

GOLDEN = Path(__file__).parent / "golden"
PLANS = str(GOLDEN / "plans")
PERIOD = "2026-10"
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def close_process(store: str, fault: str | None = None) -> subprocess.Popen:
    """`billrun close` in its own process, talking to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "ERROR"}
    env.pop("BILLRUN_FAULT_AT", None)
    if fault:
        env["BILLRUN_FAULT_AT"] = fault
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "close", "--period", PERIOD, "--store", store,
                             "--plans", PLANS], env=env, cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def everything(store: str) -> dict[str, bytes]:
    """Every object under billing/ except locks (state a run may leave, not a result)."""
    s = open_store(store)
    return {o.key: s.read_bytes(o.key) for o in s.list("billing/") if "/_state/locks/" not in o.key}


@pytest.fixture(scope="module")
def clean_run(prefect_server, tmp_path_factory) -> dict[str, bytes]:
    store = str(tmp_path_factory.mktemp("clean") / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    assert cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS).exit_code == 0
    return everything(store)


S3_POINTS = ("normalized", "staged", "copied-first", "copied-all", "manifest-written")
"""On S3 the points around publishing (staging, server-side copies, the conditional manifest)."""


@pytest.mark.parametrize("backend, point", [("folder", p) for p in CLOSE_FAULT_POINTS] + [("s3", p) for p in S3_POINTS])
def test_a_killed_close_reruns_to_the_bytes_of_a_clean_run(clean_run, tmp_path, backend, point, request):
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
        store = f"s3://{request.getfixturevalue('s3_bucket')}/killed"
    else:
        store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    killed = close_process(store, fault=point)
    _, err = killed.communicate(timeout=180)
    assert killed.returncode == -9, err

    if point == "manifest-written":
        # The commit point passed: the period is closed, and closing again changes nothing.
        again = cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS)
        assert again.exit_code == 0 and "already closed" in again.stdout
    else:
        assert closed_manifest(store, Period.parse(PERIOD)) is None  # a killed close never looks closed
        refused = cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS)
        assert refused.exit_code == 1 and "is locked by close 2026-10" in refused.stderr
        assert "billrun unlock --period 2026-10" in refused.stderr
        assert "no longer exists" in refused.stderr  # the dead process is named as dead (same machine)
        unlocked = cli("unlock", "--period", PERIOD, "--store", store)
        assert unlocked.exit_code == 0 and "removed the lock" in unlocked.stdout
        rerun = cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS)
        assert rerun.exit_code == 0, rerun.output
        assert open_store(store).list("billing/_state/locks/") == []
    after = everything(store)
    if point == "manifest-written":  # the staging copy was not yet cleaned up: only that may differ
        after = {k: v for k, v in after.items() if "/_state/runs/" not in k}
    expected = dict(clean_run)
    if backend == "s3":  # an S3 manifest also records each input's ETag
        manifest = "billing/period=2026-10/manifest.json"
        assert without_etags(after.pop(manifest)) == without_etags(expected.pop(manifest))
    assert sorted(after) == sorted(expected)
    assert [k for k in expected if after[k] != expected[k]] == []


def test_damaged_staging_and_half_published_outputs_are_repaired_by_a_rerun(clean_run, tmp_path):
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    killed = close_process(store, fault="copied-first")
    killed.communicate(timeout=180)
    s = open_store(store)
    for obj in s.list("billing/"):
        if obj.key.endswith(".parquet") and "/_state/locks/" not in obj.key:
            s.put_bytes(obj.key, b"garbage: a torn write")
    s.put_bytes("billing/_state/locks/period=2026-10.lock", b"\x00not json")
    assert "removed the lock held by an unknown run" in cli("unlock", "--period", PERIOD, "--store", store).stdout
    assert cli("close", "--period", PERIOD, "--store", store, "--plans", PLANS).exit_code == 0
    after = {k: v for k, v in everything(store).items() if "/_state/runs/" not in k}
    assert after == clean_run


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_two_closes_at_once_publish_once(clean_run, tmp_path, backend, request):
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        store = f"s3://{bucket}/race"
    else:
        store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    runs = [close_process(store) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    outcomes = " ".join(out + err for _, out, err in results)
    assert outcomes.count(" closed (run ") == 1  # exactly one run published
    if codes == [0, 1]:
        assert "is locked by close 2026-10" in outcomes
    else:
        assert "already closed" in outcomes
    published = {k: v for k, v in everything(store).items() if "/_state/" not in k}
    expected = {k: v for k, v in clean_run.items() if "/_state/" not in k}
    manifest = "billing/period=2026-10/manifest.json"
    assert without_etags(published.pop(manifest)) == without_etags(expected.pop(manifest))
    assert published == expected


def without_etags(manifest: bytes) -> dict:
    """S3 manifests also record each input's ETag; everything else is the same on any store."""
    data = json.loads(manifest)
    for entry in data["inputs"]:
        entry.pop("etag", None)
    return data
