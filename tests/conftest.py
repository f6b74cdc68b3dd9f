# Fixtures: Prefect offline with one embedded server per session; S3 through one moto server
# process per session and a fresh bucket per test.
from __future__ import annotations

import os
import tempfile

# Prefect reads its settings when first imported: keep it offline, quiet and out of ~/.prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="billrun-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from s3server import moto_server_process  # tests/ is on sys.path: pytest puts a conftest's folder there


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto server that boto3 uses for the whole session, via the environment."""
    with moto_server_process() as endpoint_url, pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint_url)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # A developer's own AWS setup must not leak in: a service-specific endpoint would win over
        # AWS_ENDPOINT_URL, and a profile or session token would sign for the wrong account.
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            env.delenv(name, raising=False)
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/billrun-tests/config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/billrun-tests/credentials")
        yield endpoint_url


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """The name of a new, empty bucket on the session's moto server."""
    name = f"billrun-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real Prefect server for the session's flow runs (started once: it costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


DEMO_PERIOD = "2026-10"


@pytest.fixture(scope="session")
def demo_story(prefect_server, tmp_path_factory) -> Path:
    """One small demo store (40 customers with the demo's dirt and showcase, lakehouse tables on)
    that has lived a month: a night, the close of 2026-10, a price cut on the api plan and the
    backfill that corrects it (credit notes), and a simulation of the credit customers on a usage
    plan. Built once per session for the tests that only read it (test_lineage, test_dbt,
    test_output_schema): a demo close costs tens of seconds, the reads a few. A test that writes
    into it must put back what it changed."""
    from flows.backfill import backfill
    from flows.close import close_period
    from flows.demo import write_demo_store
    from flows.nightly import nightly
    from flows.simulate import simulate

    repo = Path(__file__).resolve().parent.parent
    tmp = tmp_path_factory.mktemp("demo-story")
    store, plans = tmp / "store", tmp / "plans"
    shutil.copytree(repo / "plans", plans, ignore=shutil.ignore_patterns("candidates", "README.md"))
    write_demo_store(str(store), str(plans), DEMO_PERIOD, 40, 7)
    (store / "billrun.yaml").write_text("tables:\n  formats: [delta, iceberg]\n")
    nightly(store=str(store), plans=str(plans), day=f"{DEMO_PERIOD}-15")
    close_period(store=str(store), plans=str(plans), period=DEMO_PERIOD)
    api = plans / "api-v1.yaml"
    text = api.read_text()
    assert 'unit_price: "2.50"' in text
    api.write_text(text.replace('unit_price: "2.50"', 'unit_price: "2.00"', 1))
    result = backfill(store=str(store), plans=str(plans), first=DEMO_PERIOD, last=DEMO_PERIOD, reason="price cut",
                      as_of="2026-11-20")
    assert result["status"] == "corrected" and result["documents"], result
    simulate(store=str(store), plans=str(plans), period=DEMO_PERIOD, plan_map=["images=images-usage"],
             candidates=str(repo / "plans" / "candidates"))
    return store


# The fast lane (`pytest -m "not slow"`): a test that needs the Prefect server or the S3 server,
# itself or through a fixture it uses, is slow without having to say so, and so is a test's S3 case
# (a parameter "s3": such cases take the S3 server with request.getfixturevalue, which the fixture
# names do not show); tests that start other processes (a subprocess CLI, Chromium) carry
# @pytest.mark.slow themselves.
SLOW_FIXTURES = frozenset({"prefect_server", "s3_endpoint", "s3_bucket"})


# The suite runs on workers (pytest-xdist: `-n 3 --dist loadfile --no-loadscope-reorder` in
# pyproject.toml), each with a session of its own: its own Prefect server, S3 server and, where
# needed, demo_story. A file's tests stay on one worker, so its module-scoped fixtures (a close, a
# month of nights) are built once.
# (Not loadgroup: under pytest 9.2 it groups nothing, since it renames the item's `_nodeid`, which
# pytest no longer reads; pytest-xdist issue #1386.)
@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    slow_tests: dict[Path, int] = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or "s3" in params.values():
            item.add_marker(pytest.mark.slow)
        slow_tests[item.path] = slow_tests.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    if hasattr(config, "workerinput"):
        # Workers are handed files in this order (`--no-loadscope-reorder`): the files with the most
        # slow tests first, so that a long file does not start last while the other workers sit idle.
        # Every worker sorts the same collection the same way, as xdist requires; a file's tests keep
        # their order, and a run without workers keeps the files' order.
        items.sort(key=lambda item: -slow_tests[item.path])
