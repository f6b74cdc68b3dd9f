"""The close in shards: any number of shards, and the Dask cluster, give the same bytes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from closeutil import PLANS, close, output_bytes
from flows.demo import write_demo_store
from flows.settings import SHARDS_ENV, Settings
from flows.shards import batches, shard_count
from transforms.errors import InputError

PERIOD = "2026-10"


@dataclass(frozen=True)
class Obj:
    key: str
    size: int


def test_shard_count_follows_input_size_and_the_setting():
    default = Settings.from_environ({})
    assert shard_count(0, default) == 1
    assert shard_count(24 * 1024 * 1024, default) == 1
    assert shard_count(24 * 1024 * 1024 + 1, default) == 2
    assert shard_count(10**15, default) == 1024
    assert shard_count(0, Settings.from_environ({SHARDS_ENV: "7"})) == 7
    for bad in ("0", "-1", "x", "1025"):
        with pytest.raises(InputError, match=SHARDS_ENV):
            Settings.from_environ({SHARDS_ENV: bad})


@pytest.mark.parametrize("sizes,max_bytes,min_batches", [
    ([10] * 10, 25, 1), ([10] * 10, 1000, 4), ([1, 100, 1, 1], 50, 1), ([5], 1, 8), ([], 10, 2),
    ([3, 9, 27, 81, 243], 100, 2)])
def test_batches_keep_order_cover_everything_and_spread(sizes, max_bytes, min_batches):
    objects = [Obj(f"usage/{i:03d}", s) for i, s in enumerate(sizes)]
    out = batches(objects, max_bytes, min_batches)
    assert [o for b in out for o in b] == objects
    assert all(out)
    if objects:
        assert len(out) >= min(min_batches, len(objects))


def with_copies_under_other_customers(folder: str) -> None:
    """A usage object more: copies of 40 events of the store, each under another customer (shards
    follow customers: these copies are in other shards than the events they copy), half of them
    a second earlier, so that the copy under the other customer is the one that counts."""
    import polars as pl

    usage = Path(folder) / "usage" / "date=2026-10-12"
    events = pl.read_parquet(usage / "part-0.parquet").head(40)
    others = events["customer_id"].unique().sort()
    shifted = dict(zip(others, others.shift(-1).fill_null(others[0]), strict=True))
    earlier = pl.int_range(pl.len()) % 2 == 0
    events.with_columns(pl.col("customer_id").replace_strict(shifted),
                        pl.when(earlier).then(pl.col("timestamp") - pl.duration(seconds=1))
                        .otherwise(pl.col("timestamp")).alias("timestamp")).write_parquet(usage / "part-1.parquet")


@pytest.fixture(scope="module")
def demo_written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    stores = []
    for name in ("one", "many"):
        folder = str(root / name)
        write_demo_store(folder, PLANS, PERIOD, 80, 5)
        with_copies_under_other_customers(folder)
        stores.append(folder)
    return stores


def test_shards_never_change_a_byte(prefect_server, demo_written, monkeypatch):
    one, many = demo_written
    monkeypatch.setenv(SHARDS_ENV, "1")
    single = close(one, PLANS, PERIOD)
    monkeypatch.setenv(SHARDS_ENV, "7")
    sharded = close(many, PLANS, PERIOD)
    assert single["rows"] == sharded["rows"] and single["rows"]["duplicates"] > 0
    assert single["rows"]["quarantined"] > 0
    a, b = output_bytes(one, single), output_bytes(many, sharded)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    conflicts = pl.read_parquet(Path(one) / "billing" / f"period={PERIOD}" / "conflicting_duplicates.parquet")
    assert conflicts.filter(pl.col("differs_in").str.contains("customer_id")).height > 0  # gathered across shards


def test_a_shard_far_above_the_mean_is_split_in_parts_of_about_the_mean():
    from flows.shards import oversized_shards

    assert oversized_shards({0: 100, 1: 100, 2: 1_000, 3: 0}, 4) == {2: 4}  # mean 300: 1,000 > 600
    assert oversized_shards({0: 100, 1: 500}, 2) == {}  # mean 300: 500 is not above 600
    assert oversized_shards({0: 5_000}, 1) == {}


def test_shards_split_by_event_id_never_change_a_byte(prefect_server, tmp_path, monkeypatch):
    # every shard above a tenth of the mean cut in parts by event_id hash: a customer's rows in
    # several shards, its units added up by the merge, its copies (and the copies gathered from
    # other customers' shards) kept together
    import flows.shards

    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    for folder in (one, many):
        write_demo_store(folder, PLANS, PERIOD, 80, 5)
        with_copies_under_other_customers(folder)
    monkeypatch.setenv(SHARDS_ENV, "1")
    single = close(one, PLANS, PERIOD)
    splits = []
    oversized = flows.shards.oversized_shards
    monkeypatch.setattr(flows.shards, "oversized_shards", lambda rows, shards: splits.append(oversized(rows, shards))
                        or splits[-1])
    monkeypatch.setattr(flows.shards, "LARGE_SHARD", 0.1)
    monkeypatch.setenv(SHARDS_ENV, "3")
    split = close(many, PLANS, PERIOD)
    assert splits and sum(splits[0].values()) > 3  # at least one shard cut in parts
    assert split["rows"] == single["rows"]
    a, b = output_bytes(one, single), output_bytes(many, split)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_copies_in_two_shards_are_found_by_their_event_id_hashes_and_gathered_into_one(tmp_path):
    from flows.shards import HASHES, Scratch, cross_shard_copies

    scratch = Scratch(str(tmp_path / "scratch"), "")
    hashes = tmp_path / "scratch" / HASHES
    hashes.mkdir(parents=True)
    schema = {"event_hash": pl.UInt64, "shard": pl.Int32}
    pl.DataFrame({"event_hash": [1, 2, 3, 3], "shard": [0, 2, 2, 2]}, schema=schema).write_parquet(hashes / "a.parquet")
    pl.DataFrame({"event_hash": [2, 4, 5, 3], "shard": [1, 4, 3, 2]}, schema=schema).write_parquet(hashes / "b.parquet")
    cross, moving = cross_shard_copies(scratch, [HASHES + "a.parquet", HASHES + "b.parquet"], tmp_path / "work",
                                       Settings.from_environ({}))
    assert cross.rows() == [(2, 1)] and moving == [2]  # event 2: in shards 1 and 2, gathered into shard 1


def test_invoices_rendered_in_worker_processes_are_the_same_bytes(tmp_path, monkeypatch):
    import hashlib
    from dataclasses import replace

    from flows.handoff import invoice_files
    from flows.render_pool import write_invoice_documents
    from renderutil import CUSTOMER, RUN_ID, SELLER, sample_credits, sample_invoice

    base = sample_invoice()
    invoices = [replace(base, invoice_id=f"INV-2026-10-{i:06d}", customer_id=f"c{i % 3}") for i in range(1, 26)]
    customers = {f"c{i}": dict(CUSTOMER, customer_id=f"c{i}", name=f"Customer <{i}>") for i in range(3)}
    wallets = {"c1": sample_credits()}
    jobs = [(inv, customers[inv.customer_id], "half_up", wallets.get(inv.customer_id)) for inv in invoices]
    alone = write_invoice_documents(invoice_files(jobs, tmp_path / "whole"), SELLER, RUN_ID, tmp_path / "one", 1)
    spread = write_invoice_documents(invoice_files(jobs, tmp_path / "chunks", chunk=2), SELLER, RUN_ID,
                                     tmp_path / "two", 2, parallel_from=1)  # many small chunks, as 100k invoices give
    assert alone == spread and len(alone) == 25
    for name, size, digest in spread:
        data = (tmp_path / "two" / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest)
        assert data == (tmp_path / "one" / name).read_bytes()
    assert b"Customer &lt;1&gt;" in (tmp_path / "two" / "invoices/INV-2026-10-000001.html").read_bytes()


def test_a_line_shared_by_invoices_of_two_files_comes_back_as_one_object(tmp_path):
    """Rating shares a line among the invoices that bill the same thing; the invoice files keep
    that sharing across files, so write-outputs formats such a line once (and holds it once)."""
    from dataclasses import replace

    from flows.handoff import invoice_files, read_chunk, read_shared
    from renderutil import CUSTOMER, sample_invoice

    base = sample_invoice()
    invoices = [replace(base, invoice_id=f"INV-2026-10-{i:06d}") for i in range(1, 6)]
    files = invoice_files([(inv, CUSTOMER, "half_up", None) for inv in invoices], tmp_path, chunk=2)
    back = files.read()
    assert len(files.chunks) == 3 and back == invoices
    assert all(inv.lines[n] is back[0].lines[n] for inv in back for n in range(len(base.lines)))
    [(last, customer, rounding, credits)] = read_chunk(files.chunks[-1], read_shared(files.shared))
    assert (last, customer, rounding, credits) == (invoices[-1], CUSTOMER, "half_up", None)


def test_rendering_stops_when_the_close_fails_meanwhile(tmp_path):
    """The close renders its invoices while it writes the tables; a table that fails sets `stop`,
    and the rendering ends before its next chunk instead of finishing 100k documents first."""
    import threading
    from dataclasses import replace

    import pytest

    from flows.handoff import invoice_files
    from flows.render_pool import DocumentsStopped, write_invoice_documents
    from renderutil import CUSTOMER, RUN_ID, SELLER, sample_invoice

    base = sample_invoice()
    invoices = [replace(base, invoice_id=f"INV-2026-10-{i:06d}") for i in range(1, 9)]
    stop = threading.Event()
    stop.set()
    with pytest.raises(DocumentsStopped):
        jobs = [(inv, CUSTOMER, "half_up", None) for inv in invoices]
        write_invoice_documents(invoice_files(jobs, tmp_path / "files", chunk=2), SELLER, RUN_ID, tmp_path, 2,
                                parallel_from=1, stop=stop)
    assert list((tmp_path / "invoices").iterdir()) == []

def test_a_close_on_a_two_worker_dask_cluster_gives_the_same_bytes(prefect_server, tmp_path, monkeypatch):
    """The shard tasks run in two Dask worker processes (they report to the same Prefect API)."""
    import os

    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    from flows.close import close_period

    alone, spread = str(tmp_path / "alone"), str(tmp_path / "spread")
    for folder in (alone, spread):
        write_demo_store(folder, PLANS, PERIOD, 60, 9)
        with_copies_under_other_customers(folder)  # gathered across shards on the workers
    monkeypatch.setenv(SHARDS_ENV, "4")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the workers' processes read it
    single = close(alone, PLANS, PERIOD)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"PREFECT_API_URL": os.environ["PREFECT_API_URL"], SHARDS_ENV: "4"}) as cluster:
        on_dask = close_period(store=spread, plans=PLANS, period=PERIOD, dask_address=cluster.scheduler_address)
        workers = cluster.scheduler_info["workers"]
        assert len(workers) == 2
    assert on_dask["rows"] == single["rows"]
    a, b = output_bytes(alone, single), output_bytes(spread, on_dask)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lineage_files_of_each_customer_range_come_to_the_close_as_that_range(where, request, tmp_path):
    """Shards write their lineage a file per range of customers (`bucket-NNNN`); the close reads
    them in place from its work folder or fetches them from an S3 scratch prefix (a Dask
    cluster's), and either way still knows each file's range."""
    from flows.shards import Scratch
    from flows.statement import with_local_lineage
    from flows.store import open_store
    from transforms.engine.checked_usage import CheckedUsage
    from transforms.engine.lineage import lineage_buckets

    if where == "local":
        scratch = Scratch(str(tmp_path / "scratch"), "")
    else:
        scratch = Scratch(f"s3://{request.getfixturevalue('s3_bucket')}/store", "billing/_state/work/close-x/")
    store = open_store(scratch.uri, create=True)
    keys = [scratch.key(f"lineage/shard={s:04d}/bucket-{b:04d}/data_0.parquet") for s, b in ((0, 0), (1, 0), (0, 2))]
    for n, key in enumerate(keys):
        store.put_bytes(key, f"rows of file {n}".encode())
    checked = CheckedUsage({}, pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), [], lineage=tuple(keys))
    local = with_local_lineage(checked, scratch, tmp_path / "work").lineage
    by_range = lineage_buckets(list(local))
    assert sorted(by_range) == [0, 2] and len(by_range[0]) == 2
    assert [Path(p).read_bytes() for p in by_range[0] + by_range[2]] == [b"rows of file 0", b"rows of file 1",
                                                                        b"rows of file 2"]
