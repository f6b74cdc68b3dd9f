"""Time what a close does after settlement, piece by piece, outside Prefect.

The first run on a store settles it (the close's own tasks, called through `.fn`) and pickles
the state right after settlement under `.bench/`; later runs load that state and time each
post-settle piece: replay-credits, rate-invoices and each table of write-outputs, with wall
time, CPU time (all threads) and peak RSS growth over the piece's start (sampled every 5 ms).

    .venv/bin/python bench/post_settle.py --store .bench/store-10m --period 2026-10 --out .bench/post-10m

Each table is written to `--out` as the close writes it; `--baseline REV` also times the
tables of `transforms/{spend,margins,invoices}.py` as they were at git revision REV, in the
same process on the same state, and checks that both write the same Parquet bytes.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

import flows.close as close  # noqa: E402
import flows.shards as shards  # noqa: E402
import flows.report as report  # noqa: E402
from transforms.alerts import alerts_table, credit_alerts, price_change_notices  # noqa: E402
from transforms.credits import credit_meters  # noqa: E402
from transforms.margins import segment_plans  # noqa: E402
from transforms.periods import Period  # noqa: E402
from transforms.plans import load_catalog  # noqa: E402
from transforms.settle import merged_settlement  # noqa: E402

LOG = logging.getLogger("post_settle")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _logger():
    return LOG


for module in (close, shards, report):  # the tasks' bodies log through Prefect's run logger
    module.get_run_logger = _logger


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def trim() -> None:
    """Give freed heap back to the OS, so each piece's RSS growth starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Measured:
    """Wall and CPU seconds and peak RSS growth of a block."""

    def __enter__(self):
        trim()
        self.start_rss = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.start_rss

    def row(self) -> dict:
        return {"wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 2), "rss_growth_mb": round(self.growth / 2**20)}


def settle(store: str, plans: str, period: Period, work: Path) -> dict:
    """fetch-inputs .. settle-usage, as `flows.close._close` runs them (shards one at a time)."""
    catalog = load_catalog(plans)
    inputs = close.fetch_inputs.fn(store, work / "inputs")
    costs = report.fetch_costs.fn(store)
    reference = close.check_reference.fn(inputs, catalog, period)
    scratch = shards.scratch_for(store, work, f"bench-{period}", distributed=False)
    count = shards.shard_count(sum(o.size for o in inputs.usage))
    by_shard: dict[int, list[str]] = {}
    for batch in shards.batches(sorted(inputs.usage, key=lambda o: o.key)):
        done = shards.normalize_batch.fn(store, shards.Opaque(batch), scratch, count)
        for shard, keys in done.shard_keys.items():
            by_shard.setdefault(shard, []).extend(keys)
    context = shards.Opaque((reference, catalog))
    parts = [shards.settle_shard.fn(scratch, shard, sorted(keys), context, period)
             for shard, keys in sorted(by_shard.items())]
    settlement = merged_settlement(parts)
    return {"catalog": catalog, "inputs": inputs, "costs": costs, "reference": reference, "settlement": settlement}


def module_at(rev: str, name: str):
    """`transforms/<name>.py` as it was at git revision `rev`, loaded as its own module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:transforms/{name}.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"baseline_{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    exec(compile(source, f"{rev}:transforms/{name}.py", "exec"), module.__dict__)
    return module


def tables(impl: dict, state: dict, outcome, invoices, lines: pl.DataFrame, period: Period) -> dict:
    """The write-outputs tables this bench times: name -> a function building the frame."""
    reference, settlement = state["reference"], state["settlement"]
    segments = list(reference.segments)
    spend = {inv.subscription_id: sum(l.amount_minor for l in inv.lines if l.kind in ("usage", "overage"))
             for inv in invoices}
    return {
        "invoices": lambda: impl["invoices"].invoices_table(invoices),
        "invoice_lines": lambda: impl["invoices"].lines_table(invoices),
        "margins": lambda: impl["margins"].margins_table(
            lines, settlement.usage_by_day, segment_plans(reference.segments),
            state["costs"][0], period),
        "spend_alerts": lambda: alerts_table(impl["spend"].spend_alerts(
            period, segments, settlement.usage_by_day, settlement.per_event_usage, outcome.billable_by_day,
            credit_meters(segments), spend)),
        "alerts": lambda: alerts_table(
            price_change_notices(period, list(reference.subscriptions), state["catalog"])
            + credit_alerts(outcome, period)
            + impl["spend"].spend_alerts(period, segments, settlement.usage_by_day, settlement.per_event_usage,
                                         outcome.billable_by_day, credit_meters(segments), spend)),
    }


def digest(frame: pl.DataFrame, path: Path) -> str:
    frame.write_parquet(path, **close.PARQUET)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--period", required=True)
    parser.add_argument("--plans", default=str(ROOT / "plans"))
    parser.add_argument("--state", help="pickle of the settled state (default .bench/post-settle-<store>.pkl)")
    parser.add_argument("--out", help="folder for the tables written (default .bench/post-settle-<store>-out)")
    parser.add_argument("--baseline", help="git revision whose transforms to time as well, e.g. HEAD")
    parser.add_argument("--only", nargs="*", help="tables to time (default: invoices invoice_lines margins "
                                                  "spend_alerts; also: alerts, the whole alerts table)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    period = Period.parse(args.period)
    name = Path(args.store).name
    state_path = Path(args.state or ROOT / ".bench" / f"post-settle-{name}.pkl")
    out = Path(args.out or ROOT / ".bench" / f"post-settle-{name}-out")
    out.mkdir(parents=True, exist_ok=True)
    report_rows: list[dict] = []

    if not state_path.exists():
        work = ROOT / ".bench" / f"post-settle-{name}-work"
        with Measured() as m:
            state = settle(args.store, args.plans, period, work)
        report_rows.append({"piece": "settle (once)", **m.row()})
        with state_path.open("wb") as fh:
            pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    with Measured() as m:
        with state_path.open("rb") as fh:
            state = pickle.load(fh)
    report_rows.append({"piece": "load state", **m.row()})
    reference, settlement, catalog = state["reference"], state["settlement"], state["catalog"]

    with Measured() as m:
        outcome = close.replay_credits.fn(settlement, reference, catalog, period)
    report_rows.append({"piece": "replay-credits", **m.row()})
    with Measured() as m:
        invoices = close.rate_invoices.fn(settlement, reference, outcome, period)
    report_rows.append({"piece": "rate-invoices", **m.row()})
    invoices = [replace(inv, run_id="bench") for inv in invoices]

    import transforms.invoices as invoices_now
    import transforms.margins as margins_now
    import transforms.spend as spend_now
    impls = {"now": {"invoices": invoices_now, "margins": margins_now, "spend": spend_now}}
    if args.baseline:
        impls[args.baseline] = {n: module_at(args.baseline, n) for n in ("invoices", "margins", "spend")}
    lines = invoices_now.lines_table(invoices)  # margins' input, built once
    wanted = args.only or ["invoices", "invoice_lines", "margins", "spend_alerts"]
    digests: dict[str, dict[str, str]] = {}
    for table in wanted:
        for label, impl in impls.items():
            build = tables(impl, state, outcome, invoices, lines, period)[table]
            with Measured() as m:
                frame = build()
            digests.setdefault(table, {})[label] = digest(frame, out / f"{table}.{label}.parquet")
            report_rows.append({"piece": f"{table} [{label}]", "rows": frame.height, **m.row()})
            del frame
    for row in report_rows:
        print(json.dumps(row))
    for table, by_label in digests.items():
        same = len(set(by_label.values())) == 1
        print(json.dumps({"table": table, "sha256": by_label, "identical": same}))


if __name__ == "__main__":
    main()
