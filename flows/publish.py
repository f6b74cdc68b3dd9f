"""Publishing: one run's outputs committed into their folder of the store, the manifest last.

One function, `publish_outputs`, commits for every flow that publishes: the close (its period's
folder), backfill (its correction folder) and nightly (its night's folder). The outputs are
staged in the run's private folder, copied into place, and the manifest written last with a
create-if-absent, which is the commit point: two runs of one period cannot both publish, a run
killed before the manifest leaves nothing that looks published, and a rerun of a killed run
publishes what a clean run publishes. What is each flow's own is data: the folder, the manifest's
fields, what else counts only once the manifest exists (a night's state), and whether the outputs
are staged at all (a night's folder without its manifest is a draft its rerun replaces).
Also the manifest's shared parts and the small helpers the flows share around publishing.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.locks import Fence, Hold, after_commit, warn
from flows.retries import IO_RETRIES
from flows.steps import file_sha256
from flows.store import Store, open_store
from flows.testing_seam import fault_point
from transforms.errors import BillrunError
from transforms.layout import MANIFEST, close_runs_prefix, period_prefix, run_prefix, staging_prefix
from transforms.periods import Period


class LostRace(BillrunError):
    """Another run published into the same folder first."""


@dataclass(frozen=True)
class CrashPoints:
    """Where the crash tests stop a publish (flows/testing_seam.py), under each flow's own names:
    after staging, after the first table is copied, after every copy, after the manifest. None:
    no point there."""

    staged: str | None = None
    copied_first: str | None = None
    copied: str | None = None
    committed: str | None = None


CLOSE_POINTS = CrashPoints(staged="staged", copied_first="copied-first", copied="copied-all",
                           committed="manifest-written")


def _reached(point: str | None) -> None:
    if point is not None:
        fault_point(point)


def publish_outputs(store: Store, hold: Hold, run_id: str, prefix: str, out_dir: Path, names: list[str],
                    manifest: bytes, *, scratch: list[str], private: str | None, staged: bool = True,
                    before_manifest: Callable[[Store], None] | None = None,
                    points: CrashPoints = CrashPoints()) -> list[str]:
    """The files `names` of `out_dir` published under `prefix`, then `manifest` at `prefix`
    manifest.json only if none exists: the one atomic step that publishes them. Returns the
    warnings of the tidying after it (the outputs are published whatever they say). A retry
    after our own commit (the same manifest bytes are there) only tidies.

    Every write into `prefix` is fenced (flows/locks.py): a run that lost its lock or its claim
    while paused writes nothing there. `scratch` are the run's private folders its claim names
    (an earlier, killed attempt's are deleted first). Files an earlier attempt left under
    `prefix` are deleted before the copies, and anything the manifest does not list is swept
    after it, with every run folder under `private`.

    `staged`: the outputs go to the run's staging folder first, then are copied into place (the
    tables one by one, each documents folder moved in one step: a rename on a folder store); on a
    folder store where they were written straight into staging they are flushed to disk once.
    Unstaged, they are written straight into `prefix`, for a folder whose files without a
    manifest are a draft the rerun replaces. `before_manifest` gets the fenced store for the
    flow's own writes that count only once the manifest exists."""
    started = time.perf_counter()
    key = prefix + MANIFEST
    keys = {prefix + name for name in names}
    if read_if_exists(store, key) != manifest:  # else: a retry after our own commit
        fence = Fence(store, hold, run_id, key, scratch)
        try:
            fence.clear(fence.claim())
            if staged:
                _stage(store, fence, run_id, out_dir, names)
                _reached(points.staged)
            _delete_leftovers(store, fence, prefix, keys)
            if staged:
                _copy_into_place(store, fence, staging_prefix(run_id, hold.token), prefix, names, points)
            else:
                fence.guard(store).put_files([(prefix + name, out_dir / name) for name in names])
            _reached(points.copied)
            if before_manifest is not None:
                before_manifest(fence.guard(store))
            fence.ensure()
            if not store.put_if_absent(key, manifest) and store.read_bytes(key) != manifest:
                other = json.loads(store.read_bytes(key)).get("run_id", "another run")
                raise LostRace(f"{key} was written by {other} while this run ({run_id}) was publishing; "
                               f"nothing of this run was published as the result")
        except BaseException:
            quietly(fence.release)
            raise
    _reached(points.committed)
    warnings = after_commit(store, prefix, keys | {key}, private)
    get_run_logger().info("publish: %d outputs and the manifest to %s/%s in %.2fs", len(names), store.uri.rstrip("/"),
                          prefix, time.perf_counter() - started)
    return warnings


def _stage(store: Store, fence: Fence, run_id: str, out_dir: Path, names: list[str]) -> None:
    if in_place(store, run_id, fence.hold.token, out_dir):
        store.sync()
    else:
        staging = staging_prefix(run_id, fence.hold.token)
        fence.guard(store).put_files([(staging + name, out_dir / name) for name in names])


def _delete_leftovers(store: Store, fence: Fence, prefix: str, keys: set[str]) -> None:
    """An earlier attempt's files under `prefix` that this run does not publish (a subscription no
    longer billed): nothing there is final without a manifest."""
    for leftover in [o.key for o in store.list(prefix) if o.key not in keys]:
        fence.ensure()
        store.delete(leftover)


def _copy_into_place(store: Store, fence: Fence, staging: str, prefix: str, names: list[str],
                     points: CrashPoints) -> None:
    tables = [n for n in names if "/" not in n]
    documents = [n for n in names if "/" in n]
    if tables:
        fence.ensure()
        store.copy(staging + tables[0], prefix + tables[0])
        _reached(points.copied_first)
        store.copy_many([(staging + name, prefix + name) for name in tables[1:]], before=fence.ensure)
    for folder in sorted({n.split("/", 1)[0] + "/" for n in documents}):
        store.move_prefix(staging + folder, prefix + folder,
                          [staging + n for n in documents if n.startswith(folder)], before=fence.ensure)


def output_entries(prefix: str, out_dir: Path, names: Iterable[str], *, hashed: Iterable[tuple] = (),
                   sizes: bool = True) -> list[dict]:
    """The manifest's `outputs`: one entry per published file, by key, with its size (unless
    `sizes` is off) and sha256. `hashed` are (name, size, sha256) already known (the invoices,
    hashed as they were rendered); the other `names` are hashed here from `out_dir`."""
    known = {name: (size, digest) for name, size, digest in hashed}
    for name in names:
        if name not in known:
            path = out_dir / name
            known[name] = (path.stat().st_size, file_sha256(path))
    return [{"key": prefix + name, **({"size": size} if sizes else {}), "sha256": digest}
            for name, (size, digest) in sorted(known.items())]


def manifest_of(fields: dict) -> dict:
    """A run's manifest: `fields` and the version of billrun that wrote them."""
    return {"billrun_version": package_version("billrun"), **fields}


def manifest_bytes(fields: dict) -> bytes:
    """`manifest_of(fields)` as published: keys sorted, indented, one trailing newline (its bytes
    depend only on its content)."""
    return (json.dumps(manifest_of(fields), indent=2, sort_keys=True) + "\n").encode()


@task(name="publish", cache_policy=NO_CACHE, **IO_RETRIES)
def publish(store_uri: str, period: Period, run_id: str, out_dir: Path, names: list[str],
            manifest: bytes, hold: Hold) -> list[str]:
    """A close's outputs into `billing/period=P/`, the manifest last: it closes the period (see
    publish_outputs). Every close of the period's private folder goes after it."""
    return publish_outputs(open_store(store_uri), hold, run_id, period_prefix(period), out_dir, names, manifest,
                           scratch=[run_prefix(run_id, hold.token)], private=close_runs_prefix(period),
                           points=CLOSE_POINTS)


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
