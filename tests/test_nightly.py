"""A month simulated night by night, through the real command line and a real Prefect server.

One store, three customers on one usage plan (GPU minutes at $0.05, budget $200 with alerts at
50/80/100%, hard cap $300). Each day's usage object is written just before its night, and
`billrun nightly --date 2026-10-DD` runs every night of October in order, then `billrun close`.
Along the way the store gets what real stores get: re-run nights, a duplicate resent days later,
objects rewritten in place, and a late object for an earlier day.

Spend per customer, in event time (every amount is GPU minutes x $0.05; 20 min = $1):
- c-runaway runs a runaway job: 2 events x 100 min = $10/day on days 1-9, then 2 x 400 min =
  $40/day from day 10. Spend through day N: 10N for N <= 9, 90 + 40(N - 9) after:
  day 9 90, day 10 130, day 11 170, day 12 210, day 13 250, day 14 290, day 15 330.
  So 50% of budget (100) on day 10, 80% (160) on day 11, 100% (200) on day 12 and the hard cap
  (300) on day 15, each seen on that same night. Month: 90 + 40 x 22 = 970 used, 300 billed.
- c-steady: 60 min = $3/day, 93 over the month: never an alert on its own. A late object for
  day 5 (400 min = $20) arrives before night 28: through day N >= 5 spend is 3N + 20, so
  day 26 98 < 100 <= 101 day 27. Night 28 fires the 50% alert with occurred_on Oct 27, the day
  the spend really got there, as the close finds too. Month: 31 x 60 + 400 = 2,260 min = 113.00.
- c-quiet: 20 min = $1/day. Day 20's object resends q-04-1 (a client retry: a duplicate). Before
  night 16 the day-2 object is rewritten in place with q-02-1 at 99 min instead of 20 (same
  size, new content); before night 18 the day-3 object is rewritten without q-03-1.
  Month: 31 x 20 + (99 - 20) - 20 = 679 min = 33.95.

The tests after the month are smaller stores for the webhook, and for three ways the nightly
state once went wrong: the same bytes under two keys, a first copy rewritten away, and a
retried publish.
"""
from __future__ import annotations

import io
import json
import shutil
import threading
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.store import open_store

runner = CliRunner()
D = Decimal

PLAN = """\
plan: gpu
version: 1
effective_from: 2026-01-01
currency: USD
charges:
  - name: GPU minutes
    meter: gpu_minutes
    price: {model: standard, unit_price: "0.05"}
spend_controls:
  budget: "200.00"
  alerts: [0.5, 0.8, 1.0]
  hard_cap: "300.00"
"""
CUSTOMERS = ("c-quiet", "c-runaway", "c-steady")
HEADER = "event_id,customer_id,meter,quantity,timestamp\n"
CENTS_PER_MINUTE = 5


def day_rows(day: int, quiet_minutes: int | None = 20) -> list[str]:
    """One day's events: the runaway job (200, then 800 min a day), the steady and quiet customers."""
    runaway = 100 if day <= 9 else 400
    rows = [f"r-{day:02d}-1,c-runaway,gpu_minutes,{runaway},2026-10-{day:02d}T03:00:00Z",
            f"r-{day:02d}-2,c-runaway,gpu_minutes,{runaway},2026-10-{day:02d}T15:00:00Z",
            f"s-{day:02d}-1,c-steady,gpu_minutes,60,2026-10-{day:02d}T09:00:00Z"]
    if quiet_minutes is not None:
        rows.append(f"q-{day:02d}-1,c-quiet,gpu_minutes,{quiet_minutes},2026-10-{day:02d}T12:00:00Z")
    return rows


def day_key(day: int, part: int = 0) -> str:
    return f"usage/date=2026-10-{day:02d}/part-{part}.csv"


def csv(rows: list[str]) -> bytes:
    return (HEADER + "".join(r + "\n" for r in rows)).encode()


def make_store(root: Path) -> tuple[str, str]:
    """A plans folder and a local store with customers and subscriptions; no usage yet."""
    plans = root / "plans"
    plans.mkdir()
    (plans / "gpu-v1.yaml").write_text(PLAN, encoding="utf-8")
    store_uri = str(root / "store")
    store = open_store(store_uri, create=True)
    store.put_bytes("customers/customers.csv", ("customer_id,name,email\n" + "".join(
        f"{c},Customer {c},billing@{c}.example\n" for c in CUSTOMERS)).encode())
    store.put_bytes("subscriptions/subscriptions.csv", (
        "subscription_id,customer_id,plan,plan_version,start_date,end_date,budget,hard_cap\n" + "".join(
            f"sub-{c},{c},gpu,,2026-09-01,,,\n" for c in CUSTOMERS)).encode())
    return store_uri, str(plans)


def snapshot(store_uri: str) -> dict[str, bytes]:
    """Every file of a local store, by relative path."""
    root = Path(store_uri)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def parquet(store_uri: str, key: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(open_store(store_uri).read_bytes(key)))


def night_key(day: int, name: str) -> str:
    return f"billing/nightly/date=2026-10-{day:02d}/{name}"


def billrun(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def nightly(store: str, plans: str, day: int, *extra: str):
    return billrun("nightly", "--date", f"2026-10-{day:02d}", "--store", store, "--plans", plans, *extra)


def alert_rows(frame: pl.DataFrame) -> list[tuple[str, str, Decimal, date]]:
    """(customer, kind, threshold, occurred_on); thresholds as exact decimals ("100" == "100.00")."""
    return sorted((c, k, Decimal(t), d) for c, k, t, d in frame.select(
        "customer_id", "kind", "threshold", "occurred_on").iter_rows())


def estimated_minor(store: str, day: int) -> dict[str, int]:
    """The night's estimated usage charges per customer (before the cap), in cents."""
    usage = parquet(store, night_key(day, "usage.parquet"))
    return dict(usage.group_by("customer_id").agg(pl.col("estimated_minor").sum()).iter_rows())


@pytest.fixture(scope="module", autouse=True)
def prefect_logs_outside_the_runner(prefect_server):
    """Prefect's console handler keeps the stderr of the moment its logging was set up, which may
    be an earlier CliRunner's (since closed) stream: set it up again on the session's own stderr,
    so that a command's stderr here holds what billrun itself printed."""
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)


# --- the month, run once for the module ------------------------------------------------------------

LATE_KEY = day_key(5, part=1)
LATE_ROWS = ["s-05-late,c-steady,gpu_minutes,400,2026-10-05T18:00:00Z"]
REWRITE_SAME_SIZE_BEFORE = 16   # day 2's object: q-02-1 goes from 20 to 99 minutes
REWRITE_SMALLER_BEFORE = 18     # day 3's object: q-03-1 is gone
LATE_BEFORE = 28
DUPLICATE_ON = 20               # day 20's object resends q-04-1 exactly as it was
RERUNS = {13: 12, 25: 20}       # before night 13 (day 13's object already in): re-run night 12; ...


@dataclass
class Month:
    store: str
    plans: str
    nights: dict[int, object] = field(default_factory=dict)            # CliRunner results
    manifests: dict[int, dict] = field(default_factory=dict)
    estimates: dict[int, dict[str, int]] = field(default_factory=dict)
    reruns: dict[int, tuple[object, list[str]]] = field(default_factory=dict)  # result, keys it changed
    same_size_rewrite: tuple[int, int] = (0, 0)                        # byte counts before, after
    alerts: dict[int, list] = field(default_factory=dict)              # per night, read after the month
    drafts_31: pl.DataFrame | None = None
    close: object = None


@pytest.fixture(scope="module")
def month(prefect_server, tmp_path_factory) -> Month:
    store, plans = make_store(tmp_path_factory.mktemp("month"))
    the_store = open_store(store)
    m = Month(store, plans)
    for day in range(1, 32):
        rows = day_rows(day)
        if day == DUPLICATE_ON:
            rows.append(day_rows(4)[3])  # q-04-1, byte for byte
        the_store.put_bytes(day_key(day), csv(rows))
        if day == REWRITE_SAME_SIZE_BEFORE:
            before = the_store.read_bytes(day_key(2))
            the_store.put_bytes(day_key(2), csv(day_rows(2, quiet_minutes=99)))
            m.same_size_rewrite = (len(before), len(the_store.read_bytes(day_key(2))))
        if day == REWRITE_SMALLER_BEFORE:
            the_store.put_bytes(day_key(3), csv(day_rows(3, quiet_minutes=None)))
        if day == LATE_BEFORE:
            the_store.put_bytes(LATE_KEY, csv(LATE_ROWS))
        if day in RERUNS:
            before_rerun = snapshot(store)
            result = nightly(store, plans, RERUNS[day])
            after_rerun = snapshot(store)
            m.reruns[RERUNS[day]] = (result, sorted(k for k in before_rerun.keys() | after_rerun.keys()
                                                    if before_rerun.get(k) != after_rerun.get(k)))
        m.nights[day] = nightly(store, plans, day, "--json")
        if the_store.exists(night_key(day, "manifest.json")):
            m.manifests[day] = json.loads(the_store.read_bytes(night_key(day, "manifest.json")))
            m.estimates[day] = estimated_minor(store, day)
    for info in the_store.list("billing/nightly/"):
        if info.key.endswith("/alerts.parquet"):
            m.alerts[int(info.key.split("date=2026-10-")[1][:2])] = alert_rows(parquet(store, info.key))
    m.drafts_31 = parquet(store, night_key(31, "draft_invoice_lines.parquet"))
    m.close = billrun("close", "--period", "2026-10", "--store", store, "--plans", plans, "--json")
    return m


# night -> the alerts it fires: (customer, kind, threshold, occurred_on); see the module docstring.
EXPECTED_ALERTS = {
    10: [("c-runaway", "spend_threshold", D("100.00"), date(2026, 10, 10))],   # 90 + 40 = 130 >= 100
    11: [("c-runaway", "spend_threshold", D("160.00"), date(2026, 10, 11))],   # 130 + 40 = 170 >= 160
    12: [("c-runaway", "spend_threshold", D("200.00"), date(2026, 10, 12))],   # 170 + 40 = 210 >= 200
    15: [("c-runaway", "hard_cap_reached", D("300.00"), date(2026, 10, 15))],  # 290 + 40 = 330 >= 300
    28: [("c-steady", "spend_threshold", D("100.00"), date(2026, 10, 27))],    # 3 x 27 + 20 = 101 >= 100
}


def test_every_night_ran(month):
    for day in range(1, 32):
        result = month.nights[day]
        assert result.exit_code == 0, (day, result.output)
        assert json.loads(result.stdout)["status"] == "ran", day
    assert sorted(month.alerts) == list(range(1, 32))


def test_alerts_fire_on_the_right_nights_and_never_twice(month):
    fired = {day: rows for day, rows in month.alerts.items() if rows}
    assert fired == EXPECTED_ALERTS
    assert {day: m["alerts_fired"] for day, m in month.manifests.items()} == {
        day: len(EXPECTED_ALERTS.get(day, [])) for day in range(1, 32)}
    every = [(c, k, t) for rows in month.alerts.values() for c, k, t, _ in rows]
    assert len(every) == len(set(every)) == 5


def test_re_running_a_night_says_so_and_changes_no_byte(month):
    """Even with the next day's object already waiting (night 12 re-run before night 13)."""
    assert sorted(month.reruns) == [12, 20]
    for night, (result, changed) in month.reruns.items():
        assert result.exit_code == 0, result.output
        assert "already ran" in result.stdout
        assert changed == [], (night, changed)
    assert month.manifests[13]["intake"]["objects"] == 1  # day 13 waited for its own night


def test_each_night_reads_only_the_objects_new_or_rewritten_since_the_last(month):
    extra = {REWRITE_SAME_SIZE_BEFORE: 1, REWRITE_SMALLER_BEFORE: 1, LATE_BEFORE: 1}
    assert {d: m["intake"]["objects"] for d, m in month.manifests.items()} == {
        d: 1 + extra.get(d, 0) for d in range(1, 32)}


def test_a_duplicate_event_id_on_a_later_night_is_a_duplicate(month):
    intake = month.manifests[DUPLICATE_ON]["intake"]
    assert (intake["read"], intake["billed"], intake["duplicates"], intake["quarantined"]) == (5, 4, 1, 0)
    # c-quiet's estimate grows by its own 20 minutes of day 20, not by the resent 20 of day 4
    growth = month.estimates[DUPLICATE_ON]["c-quiet"] - month.estimates[DUPLICATE_ON - 1]["c-quiet"]
    assert growth == 20 * CENTS_PER_MINUTE


def test_a_rewritten_object_replaces_its_own_contribution(month):
    assert month.same_size_rewrite[0] == month.same_size_rewrite[1]  # "20" -> "99": only content tells
    same_size = month.manifests[REWRITE_SAME_SIZE_BEFORE]["intake"]
    # the day-16 object and day 2 again, 4 rows each: all 8 taken in, none a duplicate of its old self
    assert (same_size["read"], same_size["billed"], same_size["duplicates"]) == (8, 8, 0)
    quiet = {d: e["c-quiet"] for d, e in month.estimates.items()}
    assert quiet[15] == 15 * 20 * CENTS_PER_MINUTE                       # 300 min = $15.00
    assert quiet[16] == (16 * 20 + (99 - 20)) * CENTS_PER_MINUTE         # q-02-1 now 99 min: $19.95
    smaller = month.manifests[REWRITE_SMALLER_BEFORE]["intake"]
    assert (smaller["read"], smaller["billed"], smaller["duplicates"]) == (4 + 3, 7, 0)
    assert quiet[18] == (18 * 20 + 79 - 20) * CENTS_PER_MINUTE           # q-03-1 gone: $20.95
    # the other customers' events in the rewritten objects still count once
    assert month.estimates[16]["c-steady"] == 16 * 60 * CENTS_PER_MINUTE
    assert month.estimates[18]["c-runaway"] == (90 + 40 * 9) * 100       # capped only on the invoice


def test_a_late_object_for_an_earlier_day_is_taken_in_by_the_next_night(month):
    intake = month.manifests[LATE_BEFORE]["intake"]
    assert (intake["objects"], intake["read"], intake["billed"]) == (2, 4 + 1, 4 + 1)
    steady = {d: e["c-steady"] for d, e in month.estimates.items()}
    assert steady[27] == 27 * 60 * CENTS_PER_MINUTE                      # $81.00
    assert steady[28] == (28 * 60 + 400) * CENTS_PER_MINUTE              # $84.00 + the late $20.00


def test_the_close_bills_exactly_the_cap_and_shows_the_waiver(month):
    assert month.close.exit_code == 0, month.close.output
    summary = json.loads(month.close.stdout)
    # 31 days x 4 rows, less q-03-1 (rewritten away), plus the late row and the resent q-04-1
    assert summary["rows"] == {"read": 31 * 4 - 1 + 1 + 1, "billed": 31 * 4 - 1 + 1, "duplicates": 1,
                               "quarantined": 0}
    lines = parquet(month.store, "billing/period=2026-10/invoice_lines.parquet")
    runaway = lines.filter(pl.col("customer_id") == "c-runaway")
    usage = runaway.filter(pl.col("kind") == "usage")["amount_minor"].sum()
    waivers = runaway.filter(pl.col("kind") == "cap_waiver")["amount_minor"].to_list()
    assert usage == (90 + 40 * 22) * 100                                 # $970.00 used
    assert waivers == [-(970 - 300) * 100]                               # one line waives $670.00
    assert usage + sum(waivers) == 300 * 100                             # billed: exactly the cap
    assert lines.filter(pl.col("kind") == "cap_waiver").height == 1
    invoices = parquet(month.store, "billing/period=2026-10/invoices.parquet")
    assert dict(invoices.select("customer_id", "total_minor").iter_rows()) == {
        "c-runaway": 300 * 100,
        "c-steady": (31 * 60 + 400) * CENTS_PER_MINUTE,                  # 2,260 min = $113.00
        "c-quiet": (31 * 20 + 79 - 20) * CENTS_PER_MINUTE}               # 679 min = $33.95


def test_the_close_alerts_are_the_nights_alerts(month):
    assert month.close.exit_code == 0, month.close.output
    close = alert_rows(parquet(month.store, "billing/period=2026-10/alerts.parquet"))
    assert close == sorted(row for rows in month.alerts.values() for row in rows)


def test_the_last_night_drafts_what_the_close_bills(month):
    assert month.close.exit_code == 0, month.close.output
    close = parquet(month.store, "billing/period=2026-10/invoice_lines.parquet")
    columns = ["customer_id", "line_no", "kind", "quantity", "amount_minor"]
    assert month.drafts_31.select(columns).sort(columns).equals(close.select(columns).sort(columns))


# --- the webhook --------------------------------------------------------------------------------------

class Hook:
    """A webhook on 127.0.0.1 that answers 500 to its first `failures` POSTs, then 204."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.posts = 0
        self.accepted: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts += 1
                if hook.posts <= hook.failures:
                    self.send_response(500)
                else:
                    hook.accepted.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/billing"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hook":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[list[tuple[str, str, Decimal, str]]]:
        """Per accepted POST: its alerts as (customer, kind, threshold, occurred_on)."""
        return [sorted((a["customer_id"], a["kind"], Decimal(a["threshold"]), a["occurred_on"])
                       for a in payload["alerts"]) for payload in self.accepted]


FIFTY = ("c-runaway", "spend_threshold", D("100.00"), "2026-10-10")
EIGHTY = ("c-runaway", "spend_threshold", D("160.00"), "2026-10-11")
HUNDRED = ("c-runaway", "spend_threshold", D("200.00"), "2026-10-12")
ATTEMPTS = 3  # flows.nightly.post_alerts: one try and two retries before giving up


def store_through(tmp_path: Path, last_day: int) -> tuple[str, str]:
    store, plans = make_store(tmp_path)
    for day in range(1, last_day + 1):
        open_store(store).put_bytes(day_key(day), csv(day_rows(day)))
    return store, plans


@pytest.mark.parametrize("next_run", ["next night", "same night again"])
def test_a_failing_webhook_keeps_alerts_pending_until_delivered_once(prefect_server, tmp_path, next_run):
    store, plans = store_through(tmp_path, 10)
    the_store = open_store(store)
    with Hook(failures=ATTEMPTS) as hook:
        failed = nightly(store, plans, 10, "--webhook", hook.url)        # 90 + 40 = 130 >= 100: 50%
        assert failed.exit_code == 1, failed.output
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("billrun: error: "), failed.stderr
        assert "webhook did not take them" in lines[0]
        assert hook.posts == ATTEMPTS and hook.accepted == []
        assert the_store.exists(night_key(10, "manifest.json"))           # the night itself is done
        assert alert_rows(parquet(store, night_key(10, "alerts.parquet"))) == [
            ("c-runaway", "spend_threshold", D("100"), date(2026, 10, 10))]

        if next_run == "same night again":
            again = nightly(store, plans, 10, "--webhook", hook.url)
            assert again.exit_code == 0 and "already ran" in again.stdout, again.output
            assert hook.delivered() == [[FIFTY]]
            expected = [[FIFTY], [EIGHTY]]
        else:
            expected = [[FIFTY, EIGHTY]]                                   # the pending one rides along
        the_store.put_bytes(day_key(11), csv(day_rows(11)))
        eleven = nightly(store, plans, 11, "--webhook", hook.url)          # 170 >= 160: 80%
        assert eleven.exit_code == 0, eleven.output
        assert hook.delivered() == expected

        if next_run == "next night":
            rerun = nightly(store, plans, 11, "--webhook", hook.url)       # nothing pending: no POST
            assert rerun.exit_code == 0 and "already ran" in rerun.stdout
        the_store.put_bytes(day_key(12), csv(day_rows(12)))
        twelve = nightly(store, plans, 12, "--webhook", hook.url)          # 210 >= 200: 100%
        assert twelve.exit_code == 0, twelve.output
        assert hook.delivered() == expected + [[HUNDRED]]
        assert hook.posts == ATTEMPTS + len(expected) + 1
        every = [a for payload in hook.delivered() for a in payload]
        assert sorted(every) == sorted([FIFTY, EIGHTY, HUNDRED])           # each alert exactly once


# --- nightly state: what must hold (each of these found a bug) -----------------------------------

def test_an_object_delivered_twice_under_two_keys_counts_once(prefect_server, tmp_path):
    """A producer that retries a whole upload under a new key: the same bytes twice, one night."""
    store, plans = make_store(tmp_path)
    the_store = open_store(store)
    the_store.put_bytes(day_key(1), csv(day_rows(1)))
    the_store.put_bytes("usage/date=2026-10-01/part-0-retry.csv", csv(day_rows(1)))
    result = nightly(store, plans, 1, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["intake"]["duplicates"] == 4
    assert estimated_minor(store, 1) == {"c-runaway": 2 * 100 * CENTS_PER_MINUTE,   # $10.00
                                         "c-steady": 60 * CENTS_PER_MINUTE,         # $3.00
                                         "c-quiet": 20 * CENTS_PER_MINUTE}          # $1.00


def test_an_event_still_counts_when_its_first_copy_is_rewritten_away(prefect_server, tmp_path):
    store, plans = store_through(tmp_path, 1)
    the_store = open_store(store)
    assert nightly(store, plans, 1).exit_code == 0
    the_store.put_bytes(day_key(2), csv(day_rows(2) + [day_rows(1)[3]]))   # day 2 resends q-01-1
    assert nightly(store, plans, 2).exit_code == 0
    the_store.put_bytes(day_key(1), csv(day_rows(1, quiet_minutes=None)))  # day 1 re-exported without it
    the_store.put_bytes(day_key(3), csv(day_rows(3)))
    assert nightly(store, plans, 3).exit_code == 0
    # q-01-1 now lives only in day 2's object: it counts once, as the close would count it
    assert estimated_minor(store, 3)["c-quiet"] == 3 * 20 * CENTS_PER_MINUTE


def test_a_retried_publish_publishes_the_same_night(prefect_server, tmp_path, monkeypatch):
    """The store fails once, on the write that queues tonight's alerts; Prefect retries the task."""
    from flows.store import LocalStore

    store, plans = store_through(tmp_path, 10)
    put_bytes, failures = LocalStore.put_bytes, []

    def once_unreachable(self, key: str, data: bytes) -> None:
        if key.endswith("/pending_delivery.json") and not failures:
            failures.append(key)
            raise OSError("connection reset by peer")
        put_bytes(self, key, data)

    monkeypatch.setattr(LocalStore, "put_bytes", once_unreachable)
    with Hook() as hook:
        result = nightly(store, plans, 10, "--json", "--webhook", hook.url)
        assert result.exit_code == 0, result.output
        assert failures  # the fault did happen, and the task's retry got past it
        assert json.loads(result.stdout)["alerts_fired"] == 1
        assert alert_rows(parquet(store, night_key(10, "alerts.parquet"))) == [
            ("c-runaway", "spend_threshold", D("100"), date(2026, 10, 10))]
        assert hook.delivered() == [[FIFTY]]


# --- the incremental state ------------------------------------------------------------------------

def outputs(store: str) -> dict[str, bytes]:
    """What nights publish (everything under billing/nightly/), by key."""
    return {k: v for k, v in snapshot(store).items() if k.startswith("billing/nightly/")}


@pytest.mark.parametrize("killed_after", ["state files", "commit"])
def test_a_night_killed_midway_reruns_to_what_a_clean_night_gives(prefect_server, tmp_path, killed_after):
    """Night 3 brings a rewritten first copy and a late duplicate. A copy of the store has night 3
    killed just before its manifest (after its commit), or before its commit (its state files
    written, nothing pointing to them): re-run, it and night 4 publish the same bytes."""
    (tmp_path / "clean").mkdir()
    clean, plans = store_through(tmp_path / "clean", 2)
    assert nightly(clean, plans, 1).exit_code == 0
    assert nightly(clean, plans, 2).exit_code == 0
    the_store = open_store(clean)
    the_store.put_bytes(day_key(1), csv(day_rows(1, quiet_minutes=None)))           # q-01-1 rewritten away
    the_store.put_bytes(day_key(3), csv(day_rows(3) + [day_rows(2)[0], day_rows(1)[3]]))
    killed = str(tmp_path / "killed")
    shutil.copytree(clean, killed)
    assert nightly(clean, plans, 3).exit_code == 0
    assert nightly(killed, plans, 3).exit_code == 0
    Path(killed, night_key(3, "manifest.json")).unlink()
    if killed_after == "state files":
        Path(killed, "billing/_state/nightly/period=2026-10/nights/night=2026-10-03.json").unlink()
    for store in (clean, killed):
        open_store(store).put_bytes(day_key(4), csv(day_rows(4)))
    assert nightly(killed, plans, 3).exit_code == 0
    for store in (clean, killed):
        assert nightly(store, plans, 4).exit_code == 0
    assert outputs(killed) == outputs(clean)
    assert estimated_minor(clean, 4)["c-quiet"] == 4 * 20 * CENTS_PER_MINUTE       # q-01-1 lives on in day 3


def stale_format(store: str, night: int) -> None:
    """Mark a night's committed state as written in an older state format: the next night
    rebuilds the period's tables from every kept object's rows."""
    path = Path(store, f"billing/_state/nightly/period=2026-10/nights/night=2026-10-{night:02d}.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 0}))


def test_the_state_moves_by_the_difference_and_equals_a_rebuild(prefect_server, tmp_path):
    """After rewrites, a removed object and resent events, the period-to-date tables a night
    moves to are the ones a rebuild from every object's rows gives."""
    from flows.nightly import base_snapshot
    from transforms.periods import Period

    (tmp_path / "moved").mkdir()
    store, plans = store_through(tmp_path / "moved", 3)
    the_store = open_store(store)
    for day in (1, 2, 3):
        assert nightly(store, plans, day).exit_code == 0
    the_store.put_bytes(day_key(4), csv(day_rows(4) + [day_rows(1)[0], day_rows(2)[3]]))
    the_store.put_bytes(day_key(2), csv(day_rows(2, quiet_minutes=55)))               # rewritten
    the_store.delete(day_key(1))                                                         # removed: r-01-1 lives on
    assert nightly(store, plans, 4).exit_code == 0
    rebuilt = str(tmp_path / "rebuilt")
    shutil.copytree(store, rebuilt)
    shutil.rmtree(Path(rebuilt, "billing/nightly/date=2026-10-04"))
    Path(rebuilt, "billing/_state/nightly/period=2026-10/nights/night=2026-10-04.json").unlink()
    stale_format(rebuilt, 3)                                 # night 4 starts from a state it cannot move
    assert nightly(rebuilt, plans, 4).exit_code == 0
    period = Period.containing(date(2026, 10, 4))
    tables = [{name: {day: pl.read_parquet(Path(s, key)) for day, key in days.items()}  # a file per day
               for name, days in base_snapshot(open_store(s), period, date(2026, 10, 5)).items()
               if name in ("by_day", "events")} for s in (store, rebuilt)]
    assert list(tables[0]["by_day"]) == list(tables[1]["by_day"]) == ["2026-10-01", "2026-10-02", "2026-10-03",
                                                                      "2026-10-04"]
    assert list(tables[0]["events"]) == list(tables[1]["events"])
    for name in ("by_day", "events"):
        assert all(rows.equals(tables[1][name][day]) for day, rows in tables[0][name].items()), name
    assert estimated_minor(store, 4) == estimated_minor(rebuilt, 4) == {
        "c-runaway": (4 * 200 - 100) * CENTS_PER_MINUTE,                                 # r-01-2 gone with day 1
        "c-steady": 3 * 60 * CENTS_PER_MINUTE,                                          # s-01-1 gone with day 1
        "c-quiet": 3 * 20 * CENTS_PER_MINUTE}   # q-01-1 gone; of q-02-1's two copies tonight day 4's (20) bills


def test_a_night_takes_in_its_own_days_and_leaves_later_ones_for_their_night(prefect_server, tmp_path):
    """An object holding days 5 and 6 arrives before night 5: night 5 bills day 5, night 6 day 6."""
    store, plans = store_through(tmp_path, 4)
    for day in range(1, 5):
        assert nightly(store, plans, day).exit_code == 0
    open_store(store).put_bytes(day_key(5), csv(day_rows(5) + day_rows(6)))
    five = nightly(store, plans, 5, "--json")
    assert five.exit_code == 0, five.output
    assert json.loads(five.stdout)["intake"]["read"] == 4
    assert estimated_minor(store, 5)["c-steady"] == 5 * 60 * CENTS_PER_MINUTE
    six = nightly(store, plans, 6, "--json")
    assert six.exit_code == 0, six.output
    assert json.loads(six.stdout)["intake"]["objects"] == 1                          # day 5's object again
    assert estimated_minor(store, 6)["c-steady"] == 6 * 60 * CENTS_PER_MINUTE


def test_the_first_night_of_a_month_leaves_the_last_months_objects_unread(prefect_server, tmp_path):
    store, plans = store_through(tmp_path, 2)
    for day in (1, 2):
        assert nightly(store, plans, day).exit_code == 0
    open_store(store).put_bytes("usage/date=2026-11-01/part-0.csv", csv(
        [r.replace("2026-10-01", "2026-11-01").replace("-01-", "-n01-") for r in day_rows(1)]))
    result = billrun("nightly", "--date", "2026-11-01", "--store", store, "--plans", plans, "--json")
    assert result.exit_code == 0, result.output
    intake = json.loads(result.stdout)["intake"]
    assert (intake["objects"], intake["read"], intake["billed"]) == (1, 4, 4)


def test_spend_resumed_from_an_earlier_night_fires_what_a_full_replay_fires(tmp_path):
    """transforms.finance.spend: spend through days no usage changed is reused, every other day re-rated."""
    from transforms.finance.spend import spend_alerts, spend_alerts_resumed
    from transforms.inputs.plans import load_catalog
    from transforms.inputs.reference import checked_subscriptions, segments_in
    from transforms.periods import Period

    period = Period.containing(date(2026, 10, 1))
    (tmp_path / "gpu-v1.yaml").write_text(PLAN, encoding="utf-8")
    catalog = load_catalog(str(tmp_path))
    customers = pl.DataFrame({"customer_id": list(CUSTOMERS)})
    subs = checked_subscriptions(pl.DataFrame({
        "subscription_id": [f"sub-{c}" for c in CUSTOMERS], "customer_id": list(CUSTOMERS), "plan": ["gpu"] * 3,
        "plan_version": [""] * 3, "start_date": ["2026-09-01"] * 3, "end_date": [""] * 3, "budget": [""] * 3,
        "hard_cap": [""] * 3}), "subscriptions.csv", customers, catalog)
    segments = segments_in(period, subs, catalog)

    def by_day(last: int) -> pl.DataFrame:
        rows = [(f"sub-{c}", 1, "gpu_minutes", "{}", date(2026, 10, d), D(m), n)
                for d in range(1, last + 1)
                for c, m, n in (("c-runaway", 200 if d <= 9 else 800, 2), ("c-steady", 60, 1))]
        return pl.DataFrame(rows, orient="row", schema={
            "subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String, "dims": pl.String,
            "day": pl.Date, "units": pl.Decimal(38, 9), "events": pl.Int64})

    no_events = pl.DataFrame(schema={"subscription_id": pl.String, "segment_no": pl.Int32, "meter": pl.String,
                                     "dims": pl.String, "quantity": pl.Decimal(38, 9),
                                     "event_at": pl.Datetime("us", "UTC")})
    final = {"sub-c-runaway": 100_000, "sub-c-steady": 100_000}
    full = spend_alerts(period, segments, by_day(14), no_events, {}, set(), final)
    _, known = spend_alerts_resumed(period, segments, by_day(11), no_events, {}, set(), final, {}, None)
    poisoned = {k: (0 if k[1] >= date(2026, 10, 10) else v) for k, v in known.items()}   # stale from day 10
    resumed, spend = spend_alerts_resumed(period, segments, by_day(14), no_events, {}, set(), final, poisoned,
                                          {"c-runaway": date(2026, 10, 10), "c-steady": date(2026, 10, 10)})
    assert resumed == full
    assert [(a.threshold, a.occurred_on.day) for a in full] == [("100", 10), ("160", 11), ("200", 12)]  # 130, 170, 210
    assert spend[("sub-c-runaway", date(2026, 10, 9))] == known[("sub-c-runaway", date(2026, 10, 9))] == 9000
    assert spend[("sub-c-runaway", date(2026, 10, 12))] == 21000
