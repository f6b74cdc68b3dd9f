"""Publishing a close: its outputs staged in the store, copied into the period's folder, and the
manifest written last with a create-if-absent, which is the commit point. Two closes of one
period cannot both publish, and a close killed before the manifest leaves the period open.
Also the small helpers that the other flows which publish (nightly, backfill) share with it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.locks import Fence, Hold, after_commit, warn
from flows.retries import IO_RETRIES
from flows.store import open_store
from flows.testing_seam import fault_point
from transforms.errors import BillrunError
from transforms.layout import MANIFEST, close_runs_prefix, period_prefix, run_prefix, staging_prefix
from transforms.periods import Period


class LostRace(BillrunError):
    """Another close of the same period published first."""


@task(name="publish", cache_policy=NO_CACHE, **IO_RETRIES)
def publish(store_uri: str, period: Period, run_id: str, out_dir: Path, names: list[str],
            manifest: bytes, hold: Hold) -> list[str]:
    """Stage every output in the store, claim the period, copy the outputs into its folder, then
    write the manifest only if none exists: the one atomic step that closes the period. Returns
    the warnings of the tidying after it (the period is closed whatever they say).

    Every write into `billing/period=P/` is fenced (flows/locks.py): a run that lost its lock or
    its claim while paused writes nothing there. Files an earlier, killed attempt left in the
    period (a subscription no longer billed) are deleted before the copies, and anything the
    manifest does not list is swept after it. On a folder store the outputs were written straight
    into the staging folder: they are flushed to disk once, and the invoices folder moves into the
    period in one rename."""
    started = time.perf_counter()
    store = open_store(store_uri)
    staging = staging_prefix(run_id, hold.token)
    prefix = period_prefix(period)
    keys = {prefix + name for name in names}
    if read_if_exists(store, prefix + MANIFEST) != manifest:  # else: a retry after our own commit
        fence = Fence(store, hold, run_id, prefix + MANIFEST, [run_prefix(run_id, hold.token)])
        try:
            fence.clear(fence.claim())
            if in_place(store, run_id, hold.token, out_dir):
                store.sync()
            else:
                fence.guard(store).put_files([(staging + name, out_dir / name) for name in names])
            fault_point("staged")
            for leftover in [o.key for o in store.list(prefix) if o.key not in keys]:
                fence.ensure()  # nothing is final without a manifest: an earlier attempt's file
                store.delete(leftover)
            tables = [n for n in names if "/" not in n]
            documents = [n for n in names if "/" in n]
            fence.ensure()
            store.copy(staging + tables[0], prefix + tables[0])
            fault_point("copied-first")
            store.copy_many([(staging + name, prefix + name) for name in tables[1:]], before=fence.ensure)
            for folder in sorted({n.split("/", 1)[0] + "/" for n in documents}):
                store.move_prefix(staging + folder, prefix + folder,
                                  [staging + n for n in documents if n.startswith(folder)], before=fence.ensure)
            fault_point("copied-all")
            fence.ensure()
            if not store.put_if_absent(prefix + MANIFEST, manifest) and store.read_bytes(prefix + MANIFEST) != manifest:
                other = json.loads(store.read_bytes(prefix + MANIFEST)).get("run_id", "another run")
                raise LostRace(f"{period} was closed by {other} while this run ({run_id}) was publishing; "
                               f"nothing of this run was published as the result")
        except BaseException:
            quietly(fence.release)
            raise
    fault_point("manifest-written")
    warnings = after_commit(store, prefix, keys | {prefix + MANIFEST}, close_runs_prefix(period))
    get_run_logger().info("publish: %d outputs and the manifest to %s/%s in %.2fs", len(names), store.uri.rstrip("/"),
                          prefix, time.perf_counter() - started)
    return warnings


def read_if_exists(store, key: str) -> bytes | None:
    """The object's bytes, or None when the store has no such key."""
    return store.read_bytes(key) if store.exists(key) else None


def quietly(action) -> None:
    """Tidying on the way out of a failure: its own failure must not replace the real error."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - logged; the error being raised is the one to report
        warn(f"could not tidy up after the failure: {exc}")


def output_folder(store_uri: str, run_id: str, token: str, work_dir: Path) -> Path:
    """Where write-outputs writes: straight into the store's staging folder when the store is a
    local folder (no second copy of 100k invoices), else the local work folder."""
    return open_store(store_uri).local_folder(staging_prefix(run_id, token)) or work_dir / "out"


def in_place(store, run_id: str, token: str, out_dir: Path) -> bool:
    folder = store.local_folder(staging_prefix(run_id, token))
    return folder is not None and folder.resolve() == Path(out_dir).resolve()


def closed_manifest(store_uri: str, period: Period) -> dict | None:
    """The period's manifest, or None while the period is open."""
    store = open_store(store_uri)
    key = period_prefix(period) + MANIFEST
    return json.loads(store.read_bytes(key)) if store.exists(key) else None
