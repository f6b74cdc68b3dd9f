"""Time the close's HTML invoices per document, in one process, outside Prefect.

The first run on a store settles, replays and rates it (bench/post_settle.py's steps) and
pickles what the render pool is given (invoices, customers, seller, roundings, credit
summaries) under `.bench/`; later runs load that and time, over the first `--count` invoices:

- `render`: invoice_html alone (the template and its views);
- `write`: what a worker does per invoice (flows/render_pool.py's chunk: render, encode,
  write the file, sha256), into `--out`;
- `pickle`: a chunk pickled by the close and unpickled by a worker, per invoice.

Each as CPU ms per document (process_time, best of `--repeat`), with the sha256 over every
document's bytes, so two revisions can be compared on the same invoices: `--code DIR` imports
billrun from DIR (e.g. a checkout of main) instead of this tree.
`--profile` prints cProfile's top functions of the `write` pass.

    .venv/bin/python bench/render_docs.py --store /tmp/store-1m --period 2026-10 --count 20000
    .venv/bin/python bench/render_docs.py --store /tmp/store-1m --period 2026-10 --code /path/to/main
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import logging
import os
import pickle
import pstats
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--period", required=True)
    parser.add_argument("--plans", default=str(HERE.parent / "plans"))
    parser.add_argument("--state", help="pickle of the render inputs (default .bench/render-docs-<store>.pkl)")
    parser.add_argument("--out", help="folder for the documents written (default .bench/render-docs-out)")
    parser.add_argument("--count", type=int, default=20000, help="invoices rendered per pass")
    parser.add_argument("--repeat", type=int, default=3, help="passes per measure; the best is reported")
    parser.add_argument("--code", help="the billrun tree to import (default: this one)")
    parser.add_argument("--profile", action="store_true", help="cProfile of one write pass")
    parser.add_argument("--pool", type=int, default=0,
                        help="also run the close's pool (flows/render_pool.py) with this many workers")
    return parser.parse_args()


ARGS = _arguments()
ROOT = Path(ARGS.code).resolve() if ARGS.code else HERE.parent
sys.path.insert(0, str(ROOT))


def render_inputs(store: str, period_text: str, plans: str) -> dict:
    """What flows/outputs.py gives the render pool, for a store settled, replayed and rated."""
    sys.path.insert(1, str(HERE))
    import post_settle

    from flows import steps
    from transforms.credits.reports import credit_summaries
    from transforms.inputs.reference import subscription_plans
    from transforms.periods import Period

    period = Period.parse(period_text)
    work = Path(ARGS.out or HERE.parent / ".bench" / "render-docs-work")
    state = post_settle.settle(store, plans, period, work)
    shutil.rmtree(work, ignore_errors=True)
    reference, checked = state["reference"], state["settlement"]
    replay = steps.replay_credits.fn(checked, reference, state["catalog"], period)
    invoices = [replace(inv, run_id="close-bench") for inv in steps.rate_invoices.fn(checked, reference, replay,
                                                                                   period)]
    return {"invoices": invoices,
            "customers": {row["customer_id"]: row for row in reference.customers.iter_rows(named=True)},
            "seller": reference.seller, "roundings": subscription_plans(reference.segments).rounding,
            "wallets": credit_summaries(replay, period), "run_id": "close-bench"}


def best_cpu(repeat: int, work) -> tuple[float, object]:
    """The least CPU seconds of `repeat` calls of `work`, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.process_time()
        result = work()
        best = min(best, time.process_time() - started)
    return best, result


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from flows import render_pool
    from flows.handoff import invoice_files
    from transforms.collector import cycle_collector_paused
    from transforms.documents.render import invoice_html

    state_path = Path(ARGS.state or HERE.parent / ".bench" / f"render-docs-{Path(ARGS.store).name}.pkl")
    if not state_path.exists():
        state_path.parent.mkdir(parents=True, exist_ok=True)
        with state_path.open("wb") as fh:
            pickle.dump(render_inputs(ARGS.store, ARGS.period, ARGS.plans), fh, protocol=pickle.HIGHEST_PROTOCOL)
    with state_path.open("rb") as fh, cycle_collector_paused():
        state = pickle.load(fh)
    invoices = state["invoices"][:ARGS.count]
    seller, run_id = state["seller"], state["run_id"]
    jobs = [(inv, state["customers"][inv.customer_id], state["roundings"][inv.subscription_id],
             state["wallets"].get(inv.customer_id)) for inv in invoices]
    out = Path(ARGS.out or HERE.parent / ".bench" / "render-docs-out")
    shutil.rmtree(out, ignore_errors=True)
    (out / "invoices").mkdir(parents=True)
    n = len(jobs)
    invoice_html(*jobs[0][:2], seller, jobs[0][2], run_id, credits=jobs[0][3])  # templates compiled

    def render():
        return [invoice_html(inv, customer, seller, rounding, run_id, credits=wallet)
                for inv, customer, rounding, wallet in jobs]

    def write():
        return render_pool.render_chunk(jobs, seller, run_id, str(out))

    def packed():
        blobs = [pickle.dumps(jobs[i:i + 1000], protocol=pickle.HIGHEST_PROTOCOL) for i in range(0, n, 1000)]
        with cycle_collector_paused():
            return sum(len(pickle.loads(b)) for b in blobs), sum(len(b) for b in blobs)

    rendered_s, documents = best_cpu(ARGS.repeat, render)
    written_s, written = best_cpu(ARGS.repeat, write)
    pickled_s, (_, pickled_bytes) = best_cpu(ARGS.repeat, packed)
    digest = hashlib.sha256()
    for text in documents:
        digest.update(text.encode("utf-8"))
    result = {"code": str(ROOT), "invoices": n, "lines": sum(len(inv.lines) for inv in invoices),
              "render_cpu_ms_per_doc": round(rendered_s * 1000 / n, 4),
              "write_cpu_ms_per_doc": round(written_s * 1000 / n, 4),
              "pickle_cpu_ms_per_doc": round(pickled_s * 1000 / n, 4),
              "pickled_bytes_per_doc": round(pickled_bytes / n),
              "html_bytes_per_doc": round(sum(size for _, size, _ in written) / n),
              "documents_sha256": digest.hexdigest(), "load": os.getloadavg()[0]}
    if ARGS.pool:
        shutil.rmtree(out, ignore_errors=True)
        files = invoice_files(jobs, out.parent / "render-docs-files")  # as the close's rating leaves them
        wall, cpu, children = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        render_pool.write_invoice_documents(files, seller, run_id, out, ARGS.pool)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        workers_s = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        result.update({"pool_workers": ARGS.pool,
                       "pool_wall_ms_per_doc": round((time.perf_counter() - wall) * 1000 / n, 4),
                       "pool_feeder_cpu_ms_per_doc": round((time.process_time() - cpu) * 1000 / n, 4),
                       "pool_workers_cpu_ms_per_doc": round(workers_s * 1000 / n, 4)})
    print(json.dumps(result))
    if ARGS.profile:
        profile = cProfile.Profile()
        profile.runcall(write)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())


if __name__ == "__main__":
    main()
