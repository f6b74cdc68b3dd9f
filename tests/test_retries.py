"""Which failures an IO task retries: only IO that may pass, never a deterministic error."""
from __future__ import annotations

import errno

import duckdb
import polars as pl
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from flows.retries import IO_RETRIES, transient
from flows.store import StoreError
from transforms.errors import InputError


class FailedState:
    """What Prefect hands the retry condition: a state whose result() raises the task's error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self):
        raise self.error


def raised_from(error: Exception, cause: Exception) -> Exception:
    try:
        raise error from cause
    except Exception as exc:
        return exc


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")


DETERMINISTIC = [
    pytest.param(InputError("customers/customers.csv row 2: bad"), id="a user's mistake"),
    pytest.param(pl.exceptions.ComputeError("invalid utf8"), id="Polars ComputeError"),
    pytest.param(pl.exceptions.InvalidOperationError("casting from Duration('ms') to String not supported"),
                 id="Polars InvalidOperationError"),
    pytest.param(duckdb.OutOfRangeException("Overflow in HUGEINT addition"), id="DuckDB overflow"),
    pytest.param(duckdb.ConversionException("Could not convert"), id="DuckDB conversion"),
    pytest.param(ValueError("not a decimal"), id="a ValueError of pure work"),
    pytest.param(RuntimeError("usage normalization broke its own schema"), id="a bug"),
    pytest.param(FileNotFoundError(errno.ENOENT, "No such file"), id="a missing file"),
    pytest.param(raised_from(StoreError("s3://b/usage/x.csv: not found"), client_error("NoSuchKey")),
                 id="S3 not found"),
    pytest.param(raised_from(StoreError("s3://b/x: access denied"), client_error("AccessDenied")),
                 id="S3 access denied"),
]

PASSING = [
    pytest.param(OSError("connection reset by peer"), id="an OSError without errno"),
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="a full disk"),
    pytest.param(ConnectionResetError(errno.ECONNRESET, "reset"), id="a reset connection"),
    pytest.param(TimeoutError("timed out"), id="a timeout"),
    pytest.param(raised_from(StoreError("cannot reach the S3 endpoint"),
                             EndpointConnectionError(endpoint_url="http://s3")), id="S3 unreachable"),
    pytest.param(raised_from(StoreError("s3://b/x: cannot read: SlowDown"), client_error("SlowDown")),
                 id="S3 throttling"),
    pytest.param(raised_from(StoreError("s3://b/x: cannot read: 503"), client_error("503")), id="S3 503"),
    pytest.param(duckdb.IOException("could not write file"), id="DuckDB IO"),
]


@pytest.mark.parametrize("error", DETERMINISTIC)
def test_a_deterministic_error_is_never_retried(error):
    assert transient(None, None, FailedState(error)) is False


@pytest.mark.parametrize("error", PASSING)
def test_io_that_may_pass_is_retried(error):
    assert transient(None, None, FailedState(error)) is True


def test_io_tasks_retry_through_the_condition():
    assert IO_RETRIES["retry_condition_fn"] is transient and IO_RETRIES["retries"] == 3


# -- which tasks retry: IO only ---------------------------------------------------------------------

def test_pure_work_is_never_retried():
    from flows.nightly import estimate
    from flows.shards import check_shard

    for pure in (check_shard, estimate):  # the same rows fail the same way on every attempt
        assert pure.retries == 0, pure.name


def test_io_tasks_carry_the_io_retry_rule():
    from flows.nightly import publish_night, take_in
    from flows.publish import publish
    from flows.shards import normalize_batch
    from flows.steps import fetch_inputs

    for io_task in (fetch_inputs, publish, take_in, publish_night, normalize_batch):
        assert io_task.retries == IO_RETRIES["retries"] and io_task.retry_condition_fn is transient, io_task.name


def test_the_webhook_is_retried_by_its_task_not_by_a_sleep_loop():
    """Three POSTs in all, 1 s then 2 s apart, by Prefect's task retries; nightly never sleeps itself."""
    import inspect

    import flows.nightly as nightly
    from flows.nightly import WEBHOOK_RETRIES, post_alerts

    assert (post_alerts.retries, post_alerts.retry_delay_seconds) == (2, [1, 2]) == (
        WEBHOOK_RETRIES["retries"], WEBHOOK_RETRIES["retry_delay_seconds"])
    assert "sleep(" not in inspect.getsource(nightly)
