"""The store layout (docs/store-layout.md): every key and prefix billrun reads or writes in a
store, spelled out here and nowhere else. Other modules build keys with these constants and
functions, and read periods, run ids and nights back out of keys with the parsers at the end of
each section; tests/test_store_keys.py fails on a key typed anywhere else.

It sits in transforms/ rather than flows/ because both need it and transforms never imports
flows: the flows read and write the store, and a few pure modules name its keys too (the demo
and test-store generators write inputs under `usage/`, the checks of the cost, tax and seller
files name their key in errors, the dbt sources read the published folders). It is pure:
strings in, strings out; no Prefect, no store, nothing heavy to import, so the commands that
only read a store (status, explain, pdf, the checks before Prefect) can use it cheaply.

Keys are relative to the store root and `/`-separated; a prefix ends with `/` unless it is the
start of a folder name to list by (`billing/period=`). Periods, days and run ids are formatted
with `str()`: a `Period` gives `YYYY-MM`, a `date` gives `YYYY-MM-DD`.
"""
from __future__ import annotations

import re

# --- inputs: what the user writes -----------------------------------------------------------

USAGE_PREFIX = "usage/"
"""Usage events: every object under it with a usage suffix, in any folders."""
CUSTOMERS_PREFIX = "customers/"
SUBSCRIPTIONS_PREFIX = "subscriptions/"
PURCHASES_PREFIX = "credit_purchases/"
ADJUSTMENTS_PREFIX = "adjustments/"
CUSTOMERS_KEYS = (CUSTOMERS_PREFIX + "customers.csv", CUSTOMERS_PREFIX + "customers.parquet")
"""Exactly one of the two."""
SUBSCRIPTIONS_KEYS = (SUBSCRIPTIONS_PREFIX + "subscriptions.csv", SUBSCRIPTIONS_PREFIX + "subscriptions.parquet")
COSTS_KEY = "costs/costs.csv"
SELLER_KEY = "seller.yaml"
RULES_KEY = "tax/rules.yaml"
CONFIG_KEY = "billrun.yaml"
"""The store's own settings (its `tables:` section turns the lakehouse tables on)."""


def usage_day_prefix(day) -> str:
    """The folder billrun's own generators (the demo, test stores, benchmarks) write a UTC day's
    usage in. A convention of theirs, not a rule: billrun reads usage from any folder under `usage/`."""
    return f"{USAGE_PREFIX}date={day}/"


# --- outputs: what billrun publishes --------------------------------------------------------

BILLING = "billing/"
MANIFEST = "manifest.json"
"""Written last in a published folder: its presence means the period (correction, night) is final."""

PERIODS_PREFIX = BILLING + "period="
"""Lists every closed (or half-written) period's folder."""


def period_prefix(period) -> str:
    return f"{PERIODS_PREFIX}{period}/"


def manifest_key(period) -> str:
    return period_prefix(period) + MANIFEST


INVOICES_FOLDER = "invoices/"


def invoice_html_name(invoice_id: str) -> str:
    """An invoice's HTML, in its period's folder."""
    return f"{INVOICES_FOLDER}{invoice_id}.html"


def invoice_html_key(period, invoice_id: str) -> str:
    return period_prefix(period) + invoice_html_name(invoice_id)


CORRECTIONS_PREFIX = BILLING + "corrections/"


def correction_prefix(run_id: str) -> str:
    """One backfill run's folder: its credit and debit notes and the changes they make."""
    return f"{CORRECTIONS_PREFIX}run={run_id}/"


DOCUMENTS_FOLDER = "documents/"


def document_html_name(document_id: str) -> str:
    """A credit or debit note's HTML, in its correction's folder."""
    return f"{DOCUMENTS_FOLDER}{document_id}.html"


NIGHTLY_PREFIX = BILLING + "nightly/"


def night_prefix(day) -> str:
    """One night's drafts and estimates."""
    return f"{NIGHTLY_PREFIX}date={day}/"


def simulation_prefix(simulation_id: str) -> str:
    return f"{BILLING}simulations/{simulation_id}/"


def report_key(period) -> str:
    return f"{BILLING}reports/period={period}/report.html"


TABLES_LOCATION = BILLING + "tables"
"""The Delta and Iceberg tables' default location (billrun.yaml's `tables: location:`)."""

_PERIOD_FILE = re.compile(rf"^{re.escape(PERIODS_PREFIX)}(\d{{4}}-\d{{2}})/(.+)$")
_CORRECTION_MANIFEST = re.compile(rf"^{re.escape(CORRECTIONS_PREFIX)}run=([^/]+)/{re.escape(MANIFEST)}$")
_NIGHT_MANIFEST = re.compile(rf"^{re.escape(NIGHTLY_PREFIX)}date=(\d{{4}}-\d{{2}}-\d{{2}})/{re.escape(MANIFEST)}$")


def period_file(key: str) -> tuple[str, str] | None:
    """(period, name in its folder) of a key under a period's folder; None for any other key."""
    match = _PERIOD_FILE.match(key)
    return (match.group(1), match.group(2)) if match else None


def period_of_manifest(key: str) -> str | None:
    """The period whose manifest `key` is; None for any other key."""
    found = period_file(key)
    return found[0] if found and found[1] == MANIFEST else None


def run_of_correction_manifest(key: str) -> str | None:
    """The backfill run whose manifest `key` is; None for any other key."""
    match = _CORRECTION_MANIFEST.match(key)
    return match.group(1) if match else None


def night_of_manifest(key: str) -> str | None:
    """The night (YYYY-MM-DD) whose manifest `key` is; None for any other key."""
    match = _NIGHT_MANIFEST.match(key)
    return match.group(1) if match else None


# --- billing/_state/: billrun's bookkeeping -------------------------------------------------

STATE_PREFIX = BILLING + "_state/"
LOCKS_PREFIX = STATE_PREFIX + "locks/"
_LOCK_KEY = re.compile(rf"^{re.escape(LOCKS_PREFIX)}period=(\d{{4}}-\d{{2}})\.lock$")


def lock_key(period) -> str:
    return f"{LOCKS_PREFIX}period={period}.lock"


def period_of_lock(key: str) -> str | None:
    """The period whose lock `key` is; None for any other key."""
    match = _LOCK_KEY.match(key)
    return match.group(1) if match else None


def claim_key(period) -> str:
    return f"{STATE_PREFIX}claims/period={period}.json"


def checked_key(period) -> str:
    """Where a backfill records the inputs and plans a closed period was last rated with."""
    return f"{STATE_PREFIX}checked/period={period}.json"


RUNS_PREFIX = STATE_PREFIX + "runs/"
"""Runs' private folders: `<run id>/<token>/`, one per attempt."""


def run_folder(run_id: str) -> str:
    """Every attempt's private folder of a run."""
    return f"{RUNS_PREFIX}{run_id}/"


def run_prefix(run_id: str, token: str) -> str:
    """A run attempt's private folder: attempts of one run id never share files."""
    return f"{run_folder(run_id)}{token}/"


def staging_prefix(run_id: str, token: str) -> str:
    """Where a run attempt stages its outputs before copying them into place."""
    return run_prefix(run_id, token) + "out/"


def close_run_id(period, fingerprint: str) -> str:
    """A close's run id: `close-<period>-<fingerprint>`, the fingerprint a hash of the close's
    inputs and plans (flows/close.py `run_id_for`)."""
    return f"close-{period}-{fingerprint}"


def close_runs_prefix(period) -> str:
    """The private folders of every close of `period`, whatever its fingerprint."""
    return RUNS_PREFIX + close_run_id(period, "")


def run_folder_of(key: str) -> str:
    """The run folder (`run_folder`) a key under `RUNS_PREFIX` is in."""
    return run_folder(key[len(RUNS_PREFIX):].split("/", 1)[0])


BILLED_INDEX_PREFIX = STATE_PREFIX + "billed_events/"
_BILLED_INDEX_KEY = re.compile(rf"^{re.escape(BILLED_INDEX_PREFIX)}period=(\d{{4}}-\d{{2}})/([A-Za-z0-9._-]+)"
                               r"\.parquet$")


def billed_index_key(period, run_id: str) -> str:
    """The event ids a run's documents bill (or stop billing) in `period`."""
    return f"{BILLED_INDEX_PREFIX}period={period}/{run_id}.parquet"


def billed_index_file(key: str) -> tuple[str, str] | None:
    """(period, run id) of a billed-index file; None for any other key."""
    match = _BILLED_INDEX_KEY.match(key)
    return (match.group(1), match.group(2)) if match else None


WORK_PREFIX = STATE_PREFIX + "work/"


def work_prefix(label: str) -> str:
    """Scratch space of a close whose shard steps run on a cluster, with the store on S3."""
    return f"{WORK_PREFIX}{label}/"


NIGHTLY_STATE_PREFIX = STATE_PREFIX + "nightly/"
USAGE_INDEX_KEY = NIGHTLY_STATE_PREFIX + "usage_index.json"
"""Store-wide: each usage object read by a night (fingerprint, event-time range)."""
NIGHTLY_STATE_FOLDERS = ("objects/", "ids/", "to_date/", "nights/")
"""The folders of a period's nightly state (under `nightly_state_prefix`) that nights write and clear."""


def nightly_state_prefix(period) -> str:
    """What the nights of `period` have taken in so far."""
    return f"{NIGHTLY_STATE_PREFIX}period={period}/"


def nightly_object_key(period, name: str) -> str:
    """A usage object's accepted events, as a night took them in."""
    return f"{nightly_state_prefix(period)}objects/{name}.parquet"


def nightly_ids_key(period, name: str) -> str:
    """A usage object's event ids and hashes, what later nights deduplicate against."""
    return f"{nightly_state_prefix(period)}ids/{name}.parquet"


def night_commits_prefix(period) -> str:
    return nightly_state_prefix(period) + "nights/"


def night_commit_key(period, night) -> str:
    """The commit of a night: which state files make up the period after it."""
    return f"{night_commits_prefix(period)}night={night}.json"


def night_of_commit(period, key: str) -> str:
    """The night (YYYY-MM-DD) whose commit `key` is, for a key `night_commit_key` made."""
    return key[len(night_commits_prefix(period)) + len("night="):-len(".json")]


def to_date_key(period, night, name: str) -> str:
    """The period so far after night `night`: one of its tables or the credit wallets."""
    return f"{nightly_state_prefix(period)}to_date/night={night}/{name}"


def fired_alerts_key(period) -> str:
    return nightly_state_prefix(period) + "fired_alerts.parquet"


def pending_delivery_key(period) -> str:
    """Alerts a failed webhook delivery still has to deliver."""
    return nightly_state_prefix(period) + "pending_delivery.json"

