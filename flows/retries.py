"""The one retry rule of billrun's IO tasks: retry what may pass, never what is deterministic."""
from __future__ import annotations

import errno

import duckdb
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from transforms.errors import BillrunError

_LASTING_OS_ERRORS = frozenset({
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EINVAL,
    errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS, errno.EBADF,
})
"""OS errors that the next attempt meets again: a path that is not there or not allowed. Any other
(a reset connection, a full disk, an IO error of a device) may pass."""

_PASSING_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "500", "502", "503", "504",
})
"""S3 answers that say "not now" rather than "no" (botocore already retried them a few times)."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, or the error it was raised from, is IO that may pass: a network, S3 or file
    system failure. A parsing, validation, Polars or DuckDB error in pure work is deterministic:
    the same bytes fail the same way 40 seconds later, so it fails (or is quarantined) at once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BillrunError):
            return False
        if isinstance(current, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError,
                                duckdb.IOException, duckdb.HTTPException)):
            return True
        if isinstance(current, ClientError):
            return str(current.response.get("Error", {}).get("Code", "")) in _PASSING_S3_CODES
        if isinstance(current, OSError) and current.errno not in _LASTING_OS_ERRORS:
            return True
        current = current.__cause__
    return False


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition for IO tasks: retry only a transient failure (see is_transient).
    A user's mistake (a missing customers file, a bad cost row) or a deterministic error of the
    work (a Polars or DuckDB error on the same bytes) is still wrong on the next attempt."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": transient}
