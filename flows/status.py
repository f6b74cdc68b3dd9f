"""What an on-call person asks first: which periods are closed, which closes broke off, and which
closed periods no longer match their inputs or plans (and the backfill that would fix them)."""
from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from flows.ingest import is_adjustments_key, is_purchases_key, is_usage_key, normalized_object
from flows.locks import lock_state
from flows.store import ObjectInfo, Store, open_store
from flows.tables import tables_lag
from transforms.inputs.plans import Catalog, load_catalog
from transforms.layout import (
    CUSTOMERS_KEYS,
    LOCKS_PREFIX,
    MANIFEST,
    PERIODS_PREFIX,
    RULES_KEY,
    SELLER_KEY,
    SUBSCRIPTIONS_KEYS,
    checked_key,
    manifest_key,
    period_file,
    period_of_lock,
)
from transforms.periods import Period

_EVERY_PERIOD = datetime.min.replace(tzinfo=timezone.utc)


def _is_input(key: str) -> bool:
    return (is_usage_key(key) or is_purchases_key(key) or is_adjustments_key(key) or key in CUSTOMERS_KEYS
            or key in SUBSCRIPTIONS_KEYS or key in (SELLER_KEY, RULES_KEY))


class _Fingerprints:
    """Content of current input objects, compared by ETag where both sides have one, else by
    size then sha256 (computed once per object, never from modification times)."""

    def __init__(self, store: Store):
        self.store = store
        self.current: dict[str, ObjectInfo] = {o.key: o for o in store.list("") if _is_input(o.key)}
        self._sha: dict[str, str] = {}
        self._earliest: dict[str, datetime] = {}

    def differs(self, recorded: dict) -> bool:
        now = self.current[recorded["key"]]
        if recorded.get("etag") and now.etag:
            return recorded["etag"] != now.etag
        if recorded["size"] != now.size:
            return True
        if recorded["key"] not in self._sha:
            self._sha[recorded["key"]] = self.store.sha256(recorded["key"])
        return self._sha[recorded["key"]] != recorded["sha256"]

    def earliest(self, key: str) -> datetime:
        """The earliest event time in a usage object, read as a close reads it; the dawn of time
        when a row belongs to no period (a bad or missing timestamp, a malformed line) or the
        object cannot be read: every close counts those. Read once per object, and only for the
        new or rewritten ones."""
        if key not in self._earliest:
            with tempfile.TemporaryDirectory(prefix="billrun-status-") as folder:
                path = self.store.fetch([key], Path(folder))[key]
                frame, _ = normalized_object(path, key)
            if frame is None or frame["event_at"].null_count():
                self._earliest[key] = _EVERY_PERIOD
            else:
                self._earliest[key] = frame["event_at"].min() or datetime.max.replace(tzinfo=timezone.utc)
        return self._earliest[key]

    def reaches(self, key: str, period: Period) -> bool:
        """Whether a new or rewritten object can change `period`: any input but usage can; a usage
        object can when it holds rows of the period or earlier (an earlier copy of an event_id
        makes the period's copy a duplicate) or rows of no period. Later events cannot."""
        return not is_usage_key(key) or self.earliest(key) < period.end_at


def drift(basis: dict, prints: _Fingerprints, catalog: Catalog | None, period: Period) -> list[str]:
    """What changed since `basis` (a close manifest or a backfill's record) rated `period`:
    inputs new, rewritten or deleted (new and rewritten usage objects only when they hold rows
    that can change the period), plan versions changed, added or removed."""
    recorded = {i["key"]: i for i in basis["inputs"]}
    changes = []
    new = sorted(k for k in set(prints.current) - set(recorded) if prints.reaches(k, period))
    gone = sorted(set(recorded) - set(prints.current))
    rewritten = sorted(k for k in set(recorded) & set(prints.current)
                       if prints.differs(recorded[k]) and prints.reaches(k, period))
    for what, keys in (("new", new), ("rewritten", rewritten), ("deleted", gone)):
        if keys:
            changes.append(f"{len(keys)} input object(s) {what} "
                           f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if catalog is None:
        return changes
    used = {e["plan"] for e in basis.get("plans", [])}
    recorded_plans = {(e["plan"], e["version"]): e for e in basis.get("catalog", basis.get("plans", []))}
    for key in sorted(set(recorded_plans) | {k for k in catalog.files if k[0] in used}):
        if key[0] not in used:
            continue  # a plan no subscription of the period was on
        entry, now = recorded_plans.get(key), catalog.get(*key)
        if now is None:
            changes.append(f"plan {key[0]} v{key[1]} removed")
        elif entry is None:
            changes.append(f"plan {key[0]} v{key[1]} added ({now.plan.effective_from}): it may re-bind subscriptions")
        elif now.sha256 != entry["sha256"]:
            changes.append(f"plan {key[0]} v{key[1]} changed")
    return changes


def store_status(store_uri: str, plans_dir: str | None = None) -> dict:
    """One entry per period with outputs or a lock: closed (run, totals, drift since it was last
    rated), incomplete (outputs but no manifest: a close that did not finish) or open (locked,
    nothing written yet); `lock` says whether a lock is held or stale (its run had published)."""
    store = open_store(store_uri)
    catalog = load_catalog(plans_dir) if plans_dir else None
    seen: dict[str, bool] = {}
    for obj in store.list(PERIODS_PREFIX):
        if found := period_file(obj.key):
            seen[found[0]] = seen.get(found[0], False) or found[1] == MANIFEST
    locked = {p for o in store.list(LOCKS_PREFIX) if (p := period_of_lock(o.key))}
    prints = _Fingerprints(store)
    periods = []
    for period in sorted(set(seen) | locked):
        entry = {"period": period, "locked": period in locked,
                 "lock": lock_state(store, period) if period in locked else None}
        if period not in seen:  # a run holds it and has not written any output yet
            periods.append({**entry, "status": "open"})
            continue
        if not seen[period]:
            periods.append({**entry, "status": "incomplete"})
            continue
        manifest = json.loads(store.read_bytes(manifest_key(period)))
        basis = json.loads(store.read_bytes(checked_key(period))) if store.exists(checked_key(period)) else manifest
        periods.append({**entry, "status": "closed", "run_id": manifest["run_id"],
                        "invoices": sum(t["invoices"] for t in manifest["totals"]), "totals": manifest["totals"],
                        "rows": manifest["rows"], "last_rated_by": basis["run_id"],
                        "changes": drift(basis, prints, catalog, Period.parse(period))})
    drifted = [p["period"] for p in periods if p.get("changes")]
    advice = (f"billrun backfill --from {drifted[0]} --to {drifted[-1]}" if drifted else None)
    return {"store": store.uri, "periods": periods, "backfill": advice, "tables": tables_lag(store),
            "gaps": gaps([Period.parse(p) for p, closed in seen.items() if closed], set(map(Period.parse, seen)))}


def gaps(closed: list[Period], listed: set[Period]) -> list[str]:
    """Months between the first and the last closed period with no outputs at all: never
    closed, although later months are (an incomplete close is listed as such, not here)."""
    if not closed:
        return []
    out, month = [], min(closed)
    while month < max(closed):
        if month not in listed:
            out.append(str(month))
        month = month.next()
    return out
