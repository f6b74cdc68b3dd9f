"""What an on-call person asks first: which periods are closed, and which closes broke off."""
from __future__ import annotations

import json
import re

from flows.close import MANIFEST
from flows.store import open_store

_PERIOD_KEY = re.compile(r"^billing/period=(\d{4}-\d{2})/(.+)$")


def store_status(store_uri: str) -> dict:
    """One entry per period with outputs: closed (with its manifest's run and totals) or
    incomplete (outputs but no manifest: a close that did not finish)."""
    store = open_store(store_uri)
    seen: dict[str, bool] = {}
    for obj in store.list("billing/"):
        match = _PERIOD_KEY.match(obj.key)
        if match:
            seen[match.group(1)] = seen.get(match.group(1), False) or match.group(2) == MANIFEST
    periods = []
    for period, has_manifest in sorted(seen.items()):
        if has_manifest:
            manifest = json.loads(store.read_bytes(f"billing/period={period}/{MANIFEST}"))
            periods.append({"period": period, "status": "closed", "run_id": manifest["run_id"],
                            "invoices": sum(t["invoices"] for t in manifest["totals"]),
                            "totals": manifest["totals"], "rows": manifest["rows"]})
        else:
            periods.append({"period": period, "status": "incomplete"})
    return {"store": store.uri, "periods": periods}
