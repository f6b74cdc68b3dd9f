"""Lakehouse tables: the published outputs committed to Delta Lake and Apache Iceberg tables,
exactly once per run.

One table per output (invoices, invoice_lines, ...), partitioned by `period`, with two columns
of its own: `_run_id` (the close or backfill that committed the row) and `_run_kind` (`close` or
`backfill`). The Parquet files a run published (its manifest says which) are the source: a close
commits right after its manifest, and `billrun sync-tables` (or the close of a closed period)
commits whatever a table lacks, from the same files, so there is one path for both.

Exactly once: every commit carries its run id (Delta commit metadata `billrun.run_id`, Iceberg
snapshot summary `billrun.run-id`), and a table whose history holds the run id is skipped. A
commit also replaces what it would duplicate, so even a commit retried behind the history's back
(two syncs at once, history expired) leaves one copy: a close overwrites its period's close rows
(Delta `replaceWhere`, Iceberg overwrite by filter), and a backfill overwrites its own run's rows.

Settings: the `tables:` section of the store's `billrun.yaml`, read once per command; off unless
it names formats. Credentials are never part of it: S3 credentials come from the AWS chain (as
for the store), catalog secrets from pyiceberg's own environment variables.
"""
from __future__ import annotations

import io
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, ValidationError

from flows.retries import IO_RETRIES
from flows.store import LocalStore, Store, StoreError, open_store
from flows.testing_seam import fault_point
from transforms.errors import BillrunError, InputError
from transforms.layout import (
    CONFIG_KEY,
    CORRECTIONS_PREFIX,
    MANIFEST,
    PERIODS_PREFIX,
    TABLES_LOCATION,
    period_of_manifest,
    run_of_correction_manifest,
)

TABLES = ("invoices", "invoice_lines", "credit_ledger", "credit_balances", "revenue", "journal", "alerts",
          "quarantine", "usage_summary", "margins", "adjustments", "conflicting_duplicates", "billed_events")
"""Every output that becomes a table, as its Parquet file is named (`<table>.parquet`)."""
RUN_ID, RUN_KIND = "_run_id", "_run_kind"
DELTA_RUN_KEY = "billrun.run_id"
ICEBERG_RUN_KEY = "billrun.run-id"
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TablesError(BillrunError):
    """A table commit failed: the period stays closed, the tables lag until a sync."""


# ------------------------------------------------------------------------------------------
# Settings


class CatalogSettings(BaseModel):
    """The Iceberg catalog: `sql` (SQLite by default), `rest` or `glue`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["sql", "rest", "glue"] = "sql"
    uri: str | None = None
    warehouse: str | None = None
    properties: dict[str, str] = {}


class TablesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    formats: list[Literal["delta", "iceberg"]] = []
    location: str = TABLES_LOCATION
    namespace: str = "billrun"
    catalog: CatalogSettings = CatalogSettings()

    @property
    def enabled(self) -> bool:
        return bool(self.formats)


def tables_settings(store: Store) -> TablesSettings:
    """The `tables:` section of the store's billrun.yaml (off when the file or section is absent)."""
    if not store.exists(CONFIG_KEY):
        return TablesSettings()
    where = f"{store.uri.rstrip('/')}/{CONFIG_KEY}"
    try:
        loaded = yaml.safe_load(store.read_bytes(CONFIG_KEY)) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{where}: expected a mapping with a `tables:` section")
    try:
        settings = TablesSettings.model_validate(loaded.get("tables") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in ("tables", *first["loc"]))
        raise InputError(f"{where}, {field}: {first['msg']}") from None
    if not _SAFE_VALUE.match(settings.namespace):
        raise InputError(f"{where}, tables.namespace: {settings.namespace!r} is not a plain name")
    return settings


@dataclass(frozen=True)
class Location:
    """Where the tables are: a folder or an S3 prefix, and how to reach it."""

    root: str  # /abs/folder or s3://bucket/prefix, without a trailing slash
    s3: dict[str, str] | None  # endpoint, region and credentials for an S3 root

    def delta_uri(self, table: str) -> str:
        return f"{self.root}/delta/{table}"

    @property
    def warehouse(self) -> str:
        return f"{self.root}/iceberg" if self.s3 else Path(self.root, "iceberg").as_uri()


def location_of(store: Store, settings: TablesSettings) -> Location:
    """`location` as given when it is absolute (a folder or s3://...), else inside the store."""
    loc = settings.location.rstrip("/")
    if not (loc.startswith("s3://") or loc.startswith("/")):
        if isinstance(store, LocalStore):
            loc = str((Path(store.uri) / loc).resolve())
        else:
            loc = f"{store.uri.rstrip('/')}/{loc}"
    if loc.startswith("s3://"):
        return Location(loc, _s3_options(store))
    Path(loc).mkdir(parents=True, exist_ok=True)
    return Location(loc, None)


def _s3_options(store: Store) -> dict[str, str]:
    """Endpoint, region and credentials as boto3 resolves them for the store (the standard AWS
    chain: AWS_ENDPOINT_URL, AWS_PROFILE, ...), for the table libraries' own S3 clients. Kept in
    memory only: never logged, never written."""
    import boto3

    session = boto3.session.Session()
    client = session.client("s3")
    options = {"endpoint": client.meta.endpoint_url, "region": client.meta.region_name or "us-east-1"}
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        options.update(key=frozen.access_key, secret=frozen.secret_key)
        if frozen.token:
            options["token"] = frozen.token
    return options


# ------------------------------------------------------------------------------------------
# What was published, and what each table must hold


@dataclass(frozen=True)
class PublishedRun:
    """A close (its period) or a backfill (its corrections) as its manifest published it."""

    run_id: str
    kind: str  # close | backfill
    period: str | None  # the closed period; None for a backfill
    prefix: str  # billing/period=P/ or billing/corrections/run=R/
    tables: tuple[str, ...]  # which of TABLES it published


def published_runs(store: Store) -> list[PublishedRun]:
    """Every close and backfill with a manifest, closes by period, then backfills by run id."""
    runs = []
    for prefix in (PERIODS_PREFIX, CORRECTIONS_PREFIX):  # not billing/tables/: its files pile up
        runs += [published_run(store, obj.key) for obj in store.list(prefix)
                 if period_of_manifest(obj.key) or run_of_correction_manifest(obj.key)]
    return sorted(runs, key=lambda r: (r.kind != "close", r.period or "", r.run_id))


def published_run(store: Store, manifest_key: str) -> PublishedRun:
    manifest = json.loads(store.read_bytes(manifest_key))
    prefix = manifest_key.rsplit("/", 1)[0] + "/"
    names = {o["key"][len(prefix):] for o in manifest.get("outputs", [])}
    tables = tuple(t for t in TABLES if f"{t}.parquet" in names)
    run_id = manifest["run_id"]
    if not _SAFE_VALUE.match(run_id):
        raise InputError(f"{store.uri.rstrip('/')}/{manifest_key}: run_id {run_id!r} is not a run id")
    if prefix.startswith(PERIODS_PREFIX):
        return PublishedRun(run_id, "close", manifest["period"], prefix, tables)
    return PublishedRun(run_id, "backfill", None, prefix, tables)


def _schema_file_columns(table: str) -> pa.Schema | None:
    """The table's columns from the output schema file, when it documents the table."""
    try:
        from transforms.schema import arrow_schema
    except ImportError:
        return None
    try:
        return arrow_schema(table)
    except KeyError:
        return None


def _lake_type(arrow: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_large_string(arrow) else arrow


def table_schema(table: str, published: pa.Schema) -> pa.Schema:
    """The lakehouse schema of one output: the schema file's columns (the published file's when
    the file does not document the table), then any published column the file does not name,
    then `period` (the partition) where the output has none, then `_run_id` and `_run_kind`.
    Every field nullable: a column added later holds nulls for the rows before it."""
    base = _schema_file_columns(table) or published
    fields = [pa.field(f.name, _lake_type(f.type)) for f in base]
    known = {f.name for f in fields}
    fields += [pa.field(f.name, _lake_type(f.type)) for f in published if f.name not in known]
    names = {f.name for f in fields}
    if "period" not in names:
        fields.append(pa.field("period", pa.string()))
    fields += [pa.field(RUN_ID, pa.string()), pa.field(RUN_KIND, pa.string())]
    return pa.schema(fields)


def lake_rows(table: str, published: pa.Table, run: PublishedRun) -> pa.Table:
    """A published output as the table holds it (see `table_schema`); a close's rows without a
    period column get the closed period."""
    schema = table_schema(table, published.schema)
    n = published.num_rows
    columns = []
    for f in schema:
        if f.name in published.column_names:
            columns.append(published.column(f.name).cast(f.type))
        elif f.name == "period" and run.period:
            columns.append(pa.array([run.period] * n, pa.string()))
        elif f.name == RUN_ID:
            columns.append(pa.array([run.run_id] * n, pa.string()))
        elif f.name == RUN_KIND:
            columns.append(pa.array([run.kind] * n, pa.string()))
        else:
            columns.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def replaced_rows(run: PublishedRun) -> tuple[tuple[str, str], ...]:
    """The rows a commit of `run` replaces, as (column, value) pairs that all hold: a close's
    rows of its period, or a backfill's own rows. The one place these filters are built; values
    are checked to be plain ids before any format quotes them."""
    pairs = (("period", run.period), (RUN_KIND, "close")) if run.kind == "close" else ((RUN_ID, run.run_id),)
    for _, value in pairs:
        if not value or not _SAFE_VALUE.match(value):
            raise ValueError(f"not a plain id: {value!r}")
    return pairs


# ------------------------------------------------------------------------------------------
# The two formats, behind one interface: committed run ids, and a commit


class DeltaTables:
    def __init__(self, location: Location):
        self.location = location
        self.options = None
        if location.s3:
            s3 = location.s3
            self.options = {"AWS_ENDPOINT_URL": s3["endpoint"], "AWS_REGION": s3["region"],
                            "AWS_ALLOW_HTTP": "true" if s3["endpoint"].startswith("http://") else "false",
                            # create-if-absent on the commit log: two writers never take one version
                            "conditional_put": "etag"}
            for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                                 ("token", "AWS_SESSION_TOKEN")):
                if ours in s3:
                    self.options[theirs] = s3[ours]

    name = "delta"

    def _open(self, table: str):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.location.delta_uri(table), storage_options=self.options)
        except TableNotFoundError:
            return None

    def committed_runs(self, table: str) -> set[str]:
        dt = self._open(table)
        if dt is None:
            return set()
        return {h[DELTA_RUN_KEY] for h in dt.history() if DELTA_RUN_KEY in h}

    def commit(self, table: str, rows: pa.Table, run: PublishedRun) -> None:
        from deltalake import CommitProperties, write_deltalake

        properties = CommitProperties(custom_metadata={DELTA_RUN_KEY: run.run_id, "billrun.run_kind": run.kind})
        uri = self.location.delta_uri(table)
        if self._open(table) is None:
            write_deltalake(uri, rows, mode="append", partition_by=["period"], storage_options=self.options,
                            commit_properties=properties)
            return
        predicate = " AND ".join(f"{column} = '{value}'" for column, value in replaced_rows(run))
        write_deltalake(uri, rows, mode="overwrite", predicate=predicate, schema_mode="merge",
                        storage_options=self.options, commit_properties=properties)

    def read(self, table: str) -> pa.Table:
        return self._open(table).to_pyarrow_table()


class IcebergTables:
    name = "iceberg"

    def __init__(self, location: Location, settings: TablesSettings):
        from pyiceberg.catalog import load_catalog

        cat = settings.catalog
        props: dict[str, str] = {"type": cat.type, "warehouse": cat.warehouse or location.warehouse}
        if cat.type == "sql":
            if cat.uri is None and location.s3:
                raise InputError("billrun.yaml, tables.catalog: Iceberg tables on S3 need a catalog: a sql "
                                 "`uri` on a shared database, or `type: rest` / `type: glue`")
            props["uri"] = cat.uri or f"sqlite:///{Path(location.root, 'iceberg', 'catalog.db')}"
            if props["uri"].startswith("sqlite:///"):
                Path(props["uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        elif cat.uri:
            props["uri"] = cat.uri
        if location.s3:
            s3 = location.s3
            props.update({"s3.endpoint": s3["endpoint"], "s3.region": s3["region"]})
            for ours, theirs in (("key", "s3.access-key-id"), ("secret", "s3.secret-access-key"),
                                 ("token", "s3.session-token")):
                if ours in s3:
                    props[theirs] = s3[ours]
        props.update(cat.properties)
        self.namespace = settings.namespace
        self.catalog = load_catalog("billrun", **props)
        self.catalog.create_namespace_if_not_exists(self.namespace)

    def _open(self, table: str):
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog.load_table((self.namespace, table))
        except NoSuchTableError:
            return None

    def committed_runs(self, table: str) -> set[str]:
        tbl = self._open(table)
        if tbl is None:
            return set()
        return {s.summary[ICEBERG_RUN_KEY] for s in tbl.snapshots()
                if s.summary is not None and ICEBERG_RUN_KEY in s.summary.additional_properties}

    def commit(self, table: str, rows: pa.Table, run: PublishedRun) -> None:
        from pyiceberg.expressions import And, EqualTo

        tbl = self._open(table)
        if tbl is None:
            with self.catalog.create_table_transaction((self.namespace, table), schema=rows.schema) as txn:
                with txn.update_spec() as spec:
                    spec.add_identity("period")
            tbl = self.catalog.load_table((self.namespace, table))
        missing = [f.name for f in rows.schema if f.name not in tbl.schema().column_names]
        if missing:  # a column added to the output: the table gains it, old rows read null
            with tbl.update_schema() as update:
                update.union_by_name(rows.schema)
        target = tbl.schema().as_arrow()
        rows = pa.Table.from_arrays(
            [rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
             for f in target], schema=target)
        filters = [EqualTo(column, value) for column, value in replaced_rows(run)]
        with warnings.catch_warnings():  # "Delete operation did not match any records": a first commit
            warnings.simplefilter("ignore", UserWarning)
            tbl.overwrite(rows, overwrite_filter=filters[0] if len(filters) == 1 else And(*filters),
                          snapshot_properties={ICEBERG_RUN_KEY: run.run_id, "billrun.run-kind": run.kind})

    def read(self, table: str) -> pa.Table:
        return self._open(table).scan().to_arrow()


def open_formats(store: Store, settings: TablesSettings) -> list:
    location = location_of(store, settings)
    out = []
    for fmt in settings.formats:
        out.append(DeltaTables(location) if fmt == "delta" else IcebergTables(location, settings))
    return out


# ------------------------------------------------------------------------------------------
# Commit and catch up


def published_rows(store: Store, run: PublishedRun, table: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(f"{run.prefix}{table}.parquet")))


def lagging(formats: list, runs: list[PublishedRun]) -> dict[str, list[str]]:
    """Per run id, the `format/table` names that do not hold it yet."""
    behind: dict[str, list[str]] = {}
    for fmt in formats:
        for table in TABLES:
            wanted = [r for r in runs if table in r.tables]
            if not wanted:
                continue
            have = fmt.committed_runs(table)
            for run in wanted:
                if run.run_id not in have:
                    behind.setdefault(run.run_id, []).append(f"{fmt.name}/{table}")
    return behind


def commit_runs(store: Store, settings: TablesSettings, runs: list[PublishedRun]) -> list[str]:
    """Commit every table of `runs` that does not hold its run yet; returns `format/table@run`
    for each commit made. Idempotent: a rerun commits nothing."""
    if not settings.enabled or not runs:
        return []
    done = []
    for fmt in open_formats(store, settings):
        for table in TABLES:
            wanted = [r for r in runs if table in r.tables]
            if not wanted:
                continue
            have = fmt.committed_runs(table)
            for run in wanted:
                if run.run_id in have:
                    continue
                fmt.commit(table, lake_rows(table, published_rows(store, run, table), run), run)
                done.append(f"{fmt.name}/{table}@{run.run_id}")
                fault_point("table-committed")
    return done


@task(name="commit-tables", cache_policy=NO_CACHE, **IO_RETRIES)
def commit_tables(store_uri: str, settings: TablesSettings, manifest_keys: list[str]) -> list[str]:
    """The published runs behind `manifest_keys`, committed to every configured table."""
    started = time.perf_counter()
    store = open_store(store_uri)
    done = commit_runs(store, settings, [published_run(store, key) for key in manifest_keys])
    get_run_logger().info("commit-tables: %d commits (%s) in %.2fs", len(done), ", ".join(settings.formats),
                          time.perf_counter() - started)
    return done


def _one_line(exc: Exception) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return text if isinstance(exc, (BillrunError, StoreError)) else f"{type(exc).__name__}: {text}"


def commit_published(store_uri: str, settings: TablesSettings, manifest_keys: list[str], what: str) -> list[str]:
    """Commit runs that are published already (after their manifest): a failure leaves them
    published and says so in one line, naming the command that catches up."""
    if not settings.enabled:
        return []
    try:
        return commit_tables(store_uri, settings, manifest_keys)
    except Exception as exc:
        raise TablesError(f"{what}, but its tables were not committed ({_one_line(exc)}); "
                          f"run `billrun sync-tables --store {store_uri}` to catch up") from exc


def sync_tables(store_uri: str) -> dict:
    """`billrun sync-tables`: commit every published run that a table lacks."""
    store = open_store(store_uri)
    settings = tables_settings(store)
    if not settings.enabled:
        return {"store": store.uri, "enabled": False, "commits": []}
    keys = [r.prefix + MANIFEST for r in published_runs(store)]
    try:
        commits = commit_runs(store, settings, [published_run(store, key) for key in keys])
    except Exception as exc:
        raise TablesError(f"tables not brought up to date: {_one_line(exc)}") from exc
    return {"store": store.uri, "enabled": True, "formats": list(settings.formats),
            "location": location_of(store, settings).root, "commits": commits}


def tables_lag(store: Store) -> dict | None:
    """For `billrun status`: where the tables are and, per run, those that lag its manifest
    (None when tables are off)."""
    settings = tables_settings(store)
    if not settings.enabled:
        return None
    runs = published_runs(store)
    try:
        behind = lagging(open_formats(store, settings), runs)
    except (BillrunError, StoreError):
        raise
    except Exception as exc:
        raise TablesError(f"cannot read the tables: {_one_line(exc)}") from exc
    return {"formats": list(settings.formats), "location": location_of(store, settings).root,
            "lagging": [{"run_id": r.run_id, "kind": r.kind, "period": r.period, "tables": behind[r.run_id]}
                        for r in runs if r.run_id in behind]}
