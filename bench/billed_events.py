"""Time the close's billed_events table on its own, outside Prefect, on what a close handed it.

    .venv/bin/python bench/billed_events.py capture --store .bench/store-10m --period 2026-10 --out .bench/be-10m
    .venv/bin/python bench/billed_events.py time --out .bench/be-10m [--repeat 2] [--code DIR]

`capture` runs the close in this process and saves what write-outputs hands the table (the
checked usage's lineage files, the invoice lines, the quarantine and the credit draws) under
`--out` (the close itself finishes as usual). The lineage files are the ones this tree's check
writes: capture again after changing the check. `time` makes the table from them as the close
does (flows.statement.billed_events_table, written with the close's Parquet settings), and
prints wall and CPU seconds (all threads) and peak RSS growth per phase, with the table's
sha256, so that two trees can be compared on one capture (`--code DIR`: the table made by the
billrun code in DIR, another checkout; a tree older than the split lineage files reads the
buckets' files as one list).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

CAPTURED = "captured.pickle"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Peak:
    """Peak RSS of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.start, self.peak, self.done = _rss_mb(), _rss_mb(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def capture(args) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.settings import prefect_defaults
    prefect_defaults()
    import flows.outputs
    from flows.close import close_period
    from transforms.layout import BILLING

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "lineage").mkdir(parents=True)
    original = flows.outputs.billed_events_table

    def saving(checked, lines, quarantine, ledger, memory_limit):
        copied = []
        for i, path in enumerate(checked.lineage):
            folder = Path(path).parent.name  # a bucket's folder (bucket-NNNN) stays one
            to = out / "lineage" / (folder if folder.startswith("bucket-") else "") / f"{i:05d}-{Path(path).name}"
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, to)
            copied.append(str(to))
        lines.write_parquet(out / "lines.parquet")
        quarantine.write_parquet(out / "quarantine.parquet")
        ledger.write_parquet(out / "ledger.parquet")
        with open(out / CAPTURED, "wb") as fh:
            pickle.dump({"checked": replace(checked, lineage=tuple(copied), tables={}),
                         "memory_limit": memory_limit}, fh)
        return original(checked, lines, quarantine, ledger, memory_limit)

    flows.outputs.billed_events_table = saving
    shutil.rmtree(Path(args.store) / BILLING.rstrip("/"), ignore_errors=True)
    close_period(store=str(args.store), plans=str(args.plans), period=args.period)
    print(f"captured {len(list((out / 'lineage').iterdir()))} lineage files in {out}")


def time_table(args) -> None:
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    from flows.outputs import PARQUET
    from flows.statement import billed_events_table

    out = Path(args.out)
    with open(out / CAPTURED, "rb") as fh:
        saved = pickle.load(fh)
    lines = pl.read_parquet(out / "lines.parquet")
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    ledger = pl.read_parquet(out / "ledger.parquet")
    results = []
    for run in range(args.repeat):
        table = out / f"billed_events-{run}.parquet"
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with Peak() as peak:
            with billed_events_table(saved["checked"], lines, quarantine, ledger,
                                     args.memory or saved["memory_limit"]) as frame:
                wall1, cpu1 = time.perf_counter(), time.process_time()
                frame.sink_parquet(table, **PARQUET)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        digest = hashlib.sha256(table.read_bytes()).hexdigest()[:16]
        results.append({"run": run, "prepare_wall_s": round(wall1 - wall0, 2), "prepare_cpu_s": round(cpu1 - cpu0, 2),
                        "write_wall_s": round(wall2 - wall1, 2), "write_cpu_s": round(cpu2 - cpu1, 2),
                        "wall_s": round(wall2 - wall0, 2), "cpu_s": round(cpu2 - cpu0, 2),
                        "peak_rss_growth_mb": round(peak.peak - peak.start, 1), "sha256": digest,
                        "load": [round(x, 1) for x in os.getloadavg()]})
        table.unlink()
        print(json.dumps(results[-1]))
    print(json.dumps({"max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("--store", required=True)
    cap.add_argument("--period", required=True)
    cap.add_argument("--plans", default=str(ROOT / "plans"))
    cap.add_argument("--out", required=True)
    tim = sub.add_parser("time")
    tim.add_argument("--out", required=True)
    tim.add_argument("--repeat", type=int, default=1)
    tim.add_argument("--code", help="another checkout whose code makes the table")
    tim.add_argument("--memory", help="DuckDB's memory cap (default: the close's, as captured)")
    args = ap.parse_args()
    capture(args) if args.command == "capture" else time_table(args)


if __name__ == "__main__":
    main()
