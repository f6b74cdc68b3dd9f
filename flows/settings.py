"""Everything billrun reads from its environment, read in one place.

A command reads its `Settings` once, when it starts (the command line on first need, a flow run
started without them at the flow's start: `Settings.from_environ()`), and hands the object down:
to the flows as a parameter, to their tasks as arguments. A task on a Dask worker therefore runs
with the settings of the close that sent it, not with the worker's own environment.

Every variable is listed in VARIABLES, which docs/configuration.md is generated from (a test holds
the page, the `Settings` fields and the code to it). Besides the settings, the module owns the
environment's other uses: the secrets that logs must never show (read when a record is redacted,
so a secret set later is masked too), the variable a user names for the nightly webhook, and
Prefect's defaults for an offline command line. The test seam's two variables are no settings:
flows/testing_seam.py names them and reads them through `named_variable` and `drop_variable`,
at the moment a point is reached.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping

from transforms.errors import InputError

SHARDS_ENV = "BILLRUN_SHARDS"
WORKERS_ENV = "BILLRUN_WORKERS"
MEMORY_ENV = "BILLRUN_DUCKDB_MEMORY"
MAX_SHARDS = 1024
DEFAULT_SHARD_MEMORY = "1500MB"
"""DuckDB's cap per shard connection: above it a shard spills to disk instead of growing."""
WEBHOOK_ENV = "BILLRUN_WEBHOOK_URL"
"""Where `billrun nightly --webhook URL` puts the URL for the flow to read, by reference."""

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
"""Variables whose values are secrets wherever they turn up."""
URL_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
"""Variables holding URLs whose userinfo and query values are secrets."""


@dataclass(frozen=True)
class Settings:
    """What the environment asks of a run. No secrets: the object may be a flow run's parameter."""

    shards: int | None = None
    """BILLRUN_SHARDS: the number of shards of a close; None: one per 24 MB of usage input."""
    workers: int | None = None
    """BILLRUN_WORKERS: shard tasks and invoice renderers at once on this machine; None: one per core."""
    duckdb_memory: str | None = None
    """BILLRUN_DUCKDB_MEMORY: DuckDB's memory cap per connection (`2GB`); None: 1500MB per shard,
    1GB for the close's sort of billed_events."""
    prefect_home: Path | None = None
    """PREFECT_HOME: Prefect's folder, whose disk is checked when a command fails."""
    ci: bool = False
    """CI set (to anything): never show the live list of steps."""
    dumb_terminal: bool = False
    """TERM=dumb: never show the live list of steps."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings `environ` (default: this process's environment) gives. A malformed
        value is the user's mistake: one line naming the variable and what it takes."""
        environ = os.environ if environ is None else environ
        home = environ.get("PREFECT_HOME")
        return cls(shards=_whole(environ, SHARDS_ENV, 1, MAX_SHARDS),
                   workers=_whole(environ, WORKERS_ENV, 1, None),
                   duckdb_memory=environ.get(MEMORY_ENV) or None,
                   prefect_home=Path(home) if home else None,
                   ci="CI" in environ,
                   dumb_terminal=environ.get("TERM") == "dumb")


def _whole(environ: Mapping[str, str], name: str, least: int, most: int | None) -> int | None:
    configured = environ.get(name, "").strip()
    if not configured:
        return None
    if not configured.isdigit() or not least <= int(configured) <= (most or int(configured)):
        expected = f"from {least} to {most}" if most else f"of at least {least}"
        raise InputError(f"{name}={configured!r}: expected a whole number {expected}")
    return int(configured)


@dataclass(frozen=True)
class Variable:
    """One environment variable billrun reads, as docs/configuration.md lists it."""

    name: str
    default: str
    meaning: str
    field: str | None = None
    """The Settings field it fills; None for a variable read elsewhere (`meaning` says where)."""


VARIABLES = (
    Variable(SHARDS_ENV, "one shard per 24 MB of usage input", f"the number of shards of a close (1-{MAX_SHARDS})",
             "shards"),
    Variable(WORKERS_ENV, "one per core", "shard tasks and invoice renderers running at once on this machine",
             "workers"),
    Variable(MEMORY_ENV, f"`{DEFAULT_SHARD_MEMORY}` per shard, `1GB` for the sort of billed_events",
             "DuckDB's memory cap per shard and for the close's sort of billed_events (on a Dask cluster "
             "too: the close's value travels with its tasks)", "duckdb_memory"),
    Variable("BILLRUN_DASK_ADDRESS", "none", "`billrun close --dask ADDRESS`: run the shard tasks on this Dask "
             "cluster (`tcp://scheduler:8786`)"),
    Variable(WEBHOOK_ENV, "none", "set by `billrun nightly --webhook URL` for the flow to read; name your own "
             "variable with `--webhook-env NAME` instead"),
    Variable("PREFECT_API_URL", "none: an embedded Prefect server", "the Prefect server to record runs on"),
    Variable("PREFECT_HOME", "`./.prefect` without PREFECT_API_URL", "Prefect's folder; its disk is checked "
             "when a command fails", "prefect_home"),
    Variable("CI", "unset", "set: no live list of steps", "ci"),
    Variable("TERM", "the terminal's", "`dumb`: no live list of steps", "dumb_terminal"),
    *(Variable(name, "none", "a secret: masked in every log record") for name in SECRET_ENV),
    *(Variable(name, "none", "an S3 endpoint: its password and credential-like query values are masked in "
               "every log record") for name in URL_ENV),
)


def configuration_table() -> str:
    """The Markdown table of VARIABLES, as docs/configuration.md shows it."""
    rows = [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(["| variable | default | what it does |", "|---|---|---|", *rows]) + "\n"


def secret_values(environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The values of SECRET_ENV and of URL_ENV set now (read at every redaction: a secret set
    after the command started is masked too)."""
    environ = os.environ if environ is None else environ
    return [environ.get(name) or "" for name in SECRET_ENV], [environ.get(name) or "" for name in URL_ENV]


def named_variable(name: str) -> str | None:
    """The value variable `name` has now, for what is read where and when it is needed rather than
    once at the start: the variable a user names for the webhook (`--webhook-env NAME`), read
    when the URL is needed, and the test seam's, read when a point is reached."""
    return os.environ.get(name)


def drop_variable(name: str) -> None:
    """Unset variable `name` in this process (and the processes it starts from now on)."""
    os.environ.pop(name, None)


def hand_over_webhook(url: str) -> str:
    """Put `billrun nightly --webhook URL`'s URL where the flow reads it by reference; the variable's name."""
    os.environ[WEBHOOK_ENV] = url
    return WEBHOOK_ENV


def prefect_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Run Prefect offline and quietly unless the user configured it: no analytics, an embedded
    server whose state lives in ./.prefect, and warnings only on the console. Prefect reads these
    variables itself, so they are set in the environment, before Prefect is imported."""
    environ = os.environ if environ is None else environ
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    environ.setdefault("DO_NOT_TRACK", "1")
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if "PREFECT_API_URL" not in environ:
        environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
