"""Peak RSS, wall and CPU time per close step, measured inside the close's own process.

    python bench/memory_profile.py --store .bench/store-10m --period 2026-10 [--out figures.json]

Runs `close_period` in this process (after removing the store's billing/ folder, as bench/run.py
does) while a thread samples every 0.1 s: the RSS of this process and of its children (the
spawned render workers), and which step the close is in (the step entered last; each
step is timed around its task's body, without Prefect). After settlement it also prints the
checked usage's tables (rows, and MB as files).
The code measured is whatever `flows` and `transforms` import: set PYTHONPATH to a copy of the
repository to measure another version.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import polars as pl

STEPS = {  # module: (task or function, step)
    "flows.steps": (("fetch_inputs", "fetch-inputs"), ("check_reference", "check-reference"),
                    ("replay_credits", "replay-credits"), ("rate_invoices", "rate-invoices"),
                    # the close's: the same step, its invoices handed over as files
                    ("rate_invoices_to_files", "rate-invoices")),
    "flows.outputs": (("write_outputs", "write-outputs"),),
    "flows.publish": (("publish", "publish"),),
    "flows.shards": (("normalize_batch", "normalize-usage"), ("check_shard", "check-usage"),
                     ("merged_files", "merge-usage")),
}
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def children(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
                out += kids
                frontier += kids
        except OSError:
            continue
    return out


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Sampler(threading.Thread):
    """Samples RSS every `interval` seconds and adds it to the step the close is in: the step
    entered last among those running (shard tasks run several at once)."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval = interval
        self.steps: dict[str, dict] = {}
        self.active: list[str] = []
        self.peak = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def enter(self, step: str) -> None:
        with self._lock:
            self.active.append(step)
            entry = self.steps.setdefault(step, {"wall": 0.0, "cpu": 0.0, "peak": 0, "tree_peak": 0, "open": 0})
            if entry["open"] == 0:
                entry["since"], entry["cpu_since"] = time.perf_counter(), cpu_seconds()
            entry["open"] += 1

    def leave(self, step: str) -> None:
        with self._lock:
            self.active.remove(step)
            entry = self.steps[step]
            entry["open"] -= 1
            if entry["open"] == 0:
                entry["wall"] += time.perf_counter() - entry["since"]
                entry["cpu"] += cpu_seconds() - entry["cpu_since"]

    def wrap(self, step: str, fn):
        def measured(*a, **k):
            self.enter(step)
            try:
                return fn(*a, **k)
            finally:
                self.leave(step)
        measured.__name__, measured.__qualname__, measured.__wrapped__ = fn.__name__, fn.__qualname__, fn
        return measured

    def run(self) -> None:
        pid = os.getpid()
        while not self._halt.wait(self.interval):
            rss = rss_bytes(pid)
            tree = rss + sum(rss_bytes(k) for k in children(pid))
            self.peak = max(self.peak, tree)
            with self._lock:
                step = self.active[-1] if self.active else "(between steps)"
                entry = self.steps.setdefault(step, {"wall": 0.0, "cpu": 0.0, "peak": 0, "tree_peak": 0, "open": 0})
                entry["peak"] = max(entry["peak"], rss)
                entry["tree_peak"] = max(entry["tree_peak"], tree)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def frame_sizes(checked) -> dict[str, float]:
    """The checked usage's tables: rows and file MB (from the files' metadata: nothing is loaded,
    so the measure does not move the close's peak)."""
    sizes = {}
    for name in ("quarantine", "usage_by_dims", "usage_by_day", "per_event_usage", "credit_history"):
        sizes[f"{name}_file_mb"] = os.path.getsize(checked.tables[name]) / MB
        sizes[f"{name}_rows"] = checked.scan(name).select(pl.len()).collect().item()
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--period", required=True)
    ap.add_argument("--plans", type=Path, default=Path(__file__).resolve().parent.parent / "plans")
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args()
    from transforms.layout import BILLING

    shutil.rmtree(args.store / BILLING, ignore_errors=True)

    import importlib

    import flows.shards as shards
    from flows.close import close_period

    sampler = Sampler()
    for module_name, steps in STEPS.items():
        module = importlib.import_module(module_name)
        for attr, step in steps:
            target = getattr(module, attr)
            if hasattr(target, "fn"):  # a Prefect task: time its body, not Prefect around it
                target.fn = sampler.wrap(step, target.fn)
            else:
                setattr(module, attr, sampler.wrap(step, target))

    settled = {}
    merge = shards.merged_files  # checked_in_shards returns the merge of its shards

    def measured_merge(*a, **k):
        checked = merge(*a, **k)
        settled.update(frame_sizes(checked))
        return checked

    shards.merged_files = measured_merge
    started, cpu0 = time.perf_counter(), cpu_seconds()
    sampler.start()
    result = close_period(store=str(args.store.resolve()), plans=str(args.plans.resolve()), period=args.period)
    sampler.stop()
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu0

    print(f"\nclose {result['status']} {result['run_id']}: {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"peak RSS (with workers) {sampler.peak / MB:,.0f} MB, ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    print(f"{'step':18s} {'wall s':>8s} {'CPU s':>8s} {'peak MB':>9s} {'w/ workers':>11s}")
    rows = []
    for step, e in sampler.steps.items():
        row = {"step": step, "wall_s": round(e["wall"], 1), "cpu_s": round(e["cpu"], 1),
               "peak_mb": round(e["peak"] / MB), "tree_peak_mb": round(e["tree_peak"] / MB)}
        rows.append(row)
        print(f"{step:18s} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} {row['peak_mb']:9,} {row['tree_peak_mb']:11,}")
    print("settlement frames (MB, rows):", json.dumps({k: round(v, 1) for k, v in settled.items()}))
    if args.out:
        args.out.write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_mb": sampler.peak / MB, "steps": rows,
                                        "settlement": settled, "run_id": result["run_id"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
