"""Time what a close does after settlement, piece by piece, outside Prefect.

The first run on a store settles it (the close's own tasks, called through `.fn`) and pickles
the state right after settlement under `.bench/`; later runs load that state and time each
post-settle piece: replay-credits, rate-invoices and each table of write-outputs, with wall
time, CPU time (all threads) and peak RSS growth over the piece's start (sampled every 5 ms).

    .venv/bin/python bench/post_settle.py --store .bench/store-10m --period 2026-10 --out .bench/post-10m

Each table is written to `--out` as the close writes it; `--baseline REV` also runs
replay-credits, rate-invoices and the tables as they were at git revision REV
(`transforms/{invoices,margins,spend,credits,revenue}.py` and those steps of `flows/steps.py`),
in the same process on the same state, and checks that both write the same Parquet bytes.
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
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import polars as pl  # noqa: E402

import flows.report as report  # noqa: E402
import flows.shards as shards  # noqa: E402
import flows.steps as steps  # noqa: E402
from flows.outputs import PARQUET  # noqa: E402
from flows.settings import Settings  # noqa: E402
from transforms.credits.events import credit_meters  # noqa: E402
from transforms.engine.checked_usage import merged_files  # noqa: E402
from transforms.finance.alerts import alerts_table, credit_alerts, price_change_notices  # noqa: E402
from transforms.finance.margins import segment_plans  # noqa: E402
from transforms.inputs.plans import load_catalog  # noqa: E402
from transforms.periods import Period  # noqa: E402

LOG = logging.getLogger("post_settle")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _logger():
    return LOG


for module in (steps, shards, report):  # the tasks' bodies log through Prefect's run logger
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
    """fetch-inputs .. check-usage, as the close runs them (shards one at a time)."""
    catalog = load_catalog(plans)
    inputs = steps.fetch_inputs.fn(store, work / "inputs")
    costs = report.fetch_costs.fn(store)
    reference = steps.check_reference.fn(inputs, catalog, period)
    scratch = shards.scratch_for(store, work, f"bench-{period}", distributed=False)
    settings = Settings.from_environ()
    count = shards.shard_count(sum(o.size for o in inputs.usage), settings)
    by_shard: dict[int, list[str]] = {}
    for batch in shards.batches(sorted(inputs.usage, key=lambda o: o.key)):
        done = shards.normalize_batch.fn(store, batch, scratch, count)
        for shard, keys in done.shard_keys.items():
            by_shard.setdefault(shard, []).extend(keys)
    from flows.billed_index import committed_index
    from transforms.engine.lineage import bucket_bounds
    from transforms.inputs.reference import segments_frame
    bounds = bucket_bounds(reference.customers["customer_id"], len(by_shard))  # as checked_in_shards splits lineage
    context = shards.Opaque((reference, catalog, committed_index(store), segments_frame(reference.segments), bounds))
    memory = settings.duckdb_memory or shards.DEFAULT_SHARD_MEMORY
    parts = []
    for shard, keys in sorted(by_shard.items()):
        part = shards.check_shard.fn(scratch, shard, sorted(keys), context, period, memory, "bench")
        names = sorted(part.tables)
        paths = shards.local_files(scratch, [part.tables[n] for n in names], work / "checked")
        parts.append(replace(part, tables={n: str(p) for n, p in zip(names, paths, strict=True)}))
    con = duckdb.connect(config={"memory_limit": memory, "temp_directory": str(work / "spill")})
    checked = merged_files(con, parts, work / "checked").loaded()  # pickled: its files go with `work`
    con.close()
    return {"catalog": catalog, "inputs": inputs, "costs": costs, "reference": reference, "settlement": checked}


def module_at(rev: str, path: str, uses: dict | None = None):
    """`path` (e.g. `transforms/finance/spend.py`) as it was at git revision `rev`, loaded as its own
    module; `uses` maps module names to the (baseline) modules its imports get instead."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"baseline_{Path(path).stem}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    saved = {name: sys.modules.get(name) for name in uses or {}}
    sys.modules.update(uses or {})
    try:
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    finally:
        for name, was in saved.items():
            if was is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = was
    return module


BASELINE_MODULES = ("invoices", "margins", "spend", "credits", "revenue")
# The layer folder each of them moved into; a revision before that move has them flat in transforms/.
LAYERS = {"invoices": "engine", "margins": "finance", "spend": "finance", "revenue": "finance"}


def git_paths(rev: str, folder: str) -> list[str]:
    """The files under `folder` at `rev` (empty when it is not a folder there)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{folder}"],
                            capture_output=True, text=True)
    return [f"{folder}/{name}" for name in listed.stdout.split()] if listed.returncode == 0 else []


def package_at(rev: str, name: str, uses: dict) -> dict:
    """The modules of package `transforms.<name>` at `rev`, each loaded once the package's
    modules it imports are: module name -> module (added to `uses` as they load)."""
    package = f"transforms.{name}"
    sources = {f"{package}.{Path(path).stem}": path for path in git_paths(rev, f"transforms/{name}")
               if path.endswith(".py") and not path.endswith("__init__.py")}
    needs = {module: set(re.findall(rf"^from ({re.escape(package)}\.\w+) import", subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout,
        re.M)) for module, path in sources.items()}
    loaded: dict = {}
    while len(loaded) < len(sources):
        ready = sorted(m for m in sources if m not in loaded and needs[m] <= set(loaded))
        if not ready:
            raise RuntimeError(f"{rev}: the modules of {package} import each other in a circle")
        for module in ready:
            loaded[module] = module_at(rev, sources[module], {**uses, **loaded})
    return loaded


def modules_at(rev: str) -> dict:
    """The transforms this bench times and the shared steps (`flows/steps.py`), as they were at
    `rev`, each importing the others' baseline versions. `rev` must have `flows/steps.py` (commit
    2cac018 on): before it the steps were in `flows/close.py`, whose imports have moved since.
    `credits` is a module before the wallet's split into a package, then its `ledger` module (the
    tables this bench builds from it)."""
    out: dict = {}
    uses: dict = {}
    for name in BASELINE_MODULES:
        if name == "credits" and git_paths(rev, "transforms/credits"):
            uses.update(package_at(rev, name, uses))
            out[name] = uses["transforms.credits.ledger"]
            continue
        path = f"transforms/{LAYERS[name]}/{name}.py"
        if path not in git_paths(rev, f"transforms/{LAYERS[name]}"):
            path = f"transforms/{name}.py"
        out[name] = uses[path.removesuffix(".py").replace("/", ".")] = module_at(rev, path, uses)
    out["steps"] = module_at(rev, "flows/steps.py", uses)
    out["steps"].get_run_logger = _logger
    return out


def tables(impl: dict, state: dict, replay, invoices, lines: pl.DataFrame, period: Period,
           revenue: dict) -> dict:
    """The write-outputs tables this bench times: name -> a function building the frame.
    `revenue` keeps the revenue frame built, as journal's input."""
    reference, checked = state["reference"], state["settlement"]
    segments = list(reference.segments)
    spend = {inv.subscription_id: sum(line.amount_minor for line in inv.lines if line.kind in ("usage", "overage"))
             for inv in invoices}
    plan_of_sub = {s.subscription.subscription_id: s.plan.plan for s in reference.segments}

    def revenue_table():
        revenue["frame"] = impl["revenue"].revenue_rows(
            period, invoices, replay, impl["revenue"].proportional_rates(replay, plan_of_sub))
        return revenue["frame"]

    return {
        "invoices": lambda: impl["invoices"].invoices_table(invoices),
        "invoice_lines": lambda: impl["invoices"].lines_table(invoices),
        "margins": lambda: impl["margins"].margins_table(
            lines, checked.usage_by_day, segment_plans(reference.segments),
            state["costs"][0], period),
        "spend_alerts": lambda: alerts_table(impl["spend"].spend_alerts(
            period, segments, checked.usage_by_day, checked.per_event_usage, replay.billable_by_day,
            credit_meters(segments), spend)),
        "alerts": lambda: alerts_table(
            price_change_notices(period, list(reference.subscriptions), state["catalog"])
            + credit_alerts(replay, period)
            + impl["spend"].spend_alerts(period, segments, checked.usage_by_day, checked.per_event_usage,
                                         replay.billable_by_day, credit_meters(segments), spend)),
        "credit_ledger": lambda: impl["credits"].ledger_table(replay, period),
        "credit_balances": lambda: impl["credits"].balances_table(replay, period),
        "revenue": revenue_table,
        "journal": lambda: impl["revenue"].journal(revenue["frame"] if "frame" in revenue else revenue_table()),
    }


def digest(frame: pl.DataFrame, path: Path) -> str:
    frame.write_parquet(path, **PARQUET)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _loaded(path: Path):
    """The settled state pickled at `path`, or None when there is none or it was pickled by older code
    (a class it holds moved or was renamed since): then the store is settled again."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as fh:
            return pickle.load(fh)
    except (AttributeError, ImportError, pickle.UnpicklingError, EOFError) as e:
        print(f"{path}: pickled by older code ({e}); settling again", file=sys.stderr)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--period", required=True)
    parser.add_argument("--plans", default=str(ROOT / "plans"))
    parser.add_argument("--state", help="pickle of the settled state (default .bench/post-settle-<store>.pkl)")
    parser.add_argument("--out", help="folder for the tables written (default .bench/post-settle-<store>-out)")
    parser.add_argument("--baseline", help="git revision whose transforms to time as well, e.g. HEAD")
    parser.add_argument("--only", nargs="*", help="tables to time (default: invoices invoice_lines margins "
                                                  "spend_alerts alerts credit_ledger credit_balances revenue "
                                                  "journal; alerts is the whole alerts table)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    period = Period.parse(args.period)
    name = Path(args.store).name
    state_path = Path(args.state or ROOT / ".bench" / f"post-settle-{name}.pkl")
    out = Path(args.out or ROOT / ".bench" / f"post-settle-{name}-out")
    out.mkdir(parents=True, exist_ok=True)
    report_rows: list[dict] = []

    with Measured() as m:
        state = _loaded(state_path)
    if state is None:
        work = ROOT / ".bench" / f"post-settle-{name}-work"
        with Measured() as m:
            state = settle(args.store, args.plans, period, work)
        report_rows.append({"piece": "settle (once)", **m.row()})
        with state_path.open("wb") as fh:
            pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    else:
        report_rows.append({"piece": "load state", **m.row()})
    reference, checked, catalog = state["reference"], state["settlement"], state["catalog"]

    import transforms.credits.ledger as credits_now
    import transforms.engine.invoices as invoices_now
    import transforms.finance.margins as margins_now
    import transforms.finance.revenue as revenue_now
    import transforms.finance.spend as spend_now
    impls = {"now": {"invoices": invoices_now, "margins": margins_now, "spend": spend_now, "credits": credits_now,
                     "revenue": revenue_now, "steps": steps}}
    if args.baseline:
        impls[args.baseline] = modules_at(args.baseline)
    wanted = args.only or ["invoices", "invoice_lines", "margins", "spend_alerts", "alerts", "credit_ledger",
                           "credit_balances", "revenue", "journal"]
    digests: dict[str, dict[str, str]] = {}
    for label, impl in impls.items():
        with Measured() as m:
            replay = impl["steps"].replay_credits.fn(checked, reference, catalog, period)
        report_rows.append({"piece": f"replay-credits [{label}]", **m.row()})
        with Measured() as m:
            invoices = impl["steps"].rate_invoices.fn(checked, reference, replay, period)
        report_rows.append({"piece": f"rate-invoices [{label}]", **m.row()})
        invoices = [replace(inv, run_id="bench") for inv in invoices]
        lines = invoices_now.lines_table(invoices)  # margins' input, built once
        revenue: dict = {}
        built = tables(impl, state, replay, invoices, lines, period, revenue)
        digests.setdefault("invoices (rated)", {})[label] = digest(invoices_now.invoices_table(invoices),
                                                                   out / f"rated.{label}.parquet")
        for table in wanted:
            with Measured() as m:
                frame = built[table]()
            digests.setdefault(table, {})[label] = digest(frame, out / f"{table}.{label}.parquet")
            report_rows.append({"piece": f"{table} [{label}]", "rows": frame.height, **m.row()})
            del frame
        del replay, invoices, lines, revenue, built
    for row in report_rows:
        print(json.dumps(row))
    for table, by_label in digests.items():
        same = len(set(by_label.values())) == 1
        print(json.dumps({"table": table, "sha256": by_label, "identical": same}))


if __name__ == "__main__":
    main()
