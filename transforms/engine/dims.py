"""An event's dimensions as the usage boundary encodes them (`dims`: canonical JSON text, keys
sorted, see transforms.inputs.usage), parsed once per distinct text for the code that reads them row by
row: rating (a charge's filter and groups) and the wallet (a money wallet's price, a per-dimension
credit rate)."""
from __future__ import annotations

import json
from functools import lru_cache


@lru_cache(maxsize=65536)
def parsed_dims(dims_json: str) -> dict[str, str]:
    """An event's dims, parsed once per distinct text (a few per meter, read once per row or
    event); shared, so read only, never changed."""
    return json.loads(dims_json)
