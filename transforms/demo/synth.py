"""Sample stores: one seeded, realistic month of customers, subscriptions and usage, in memory.

`synth_store(catalog, period, customers, seed)` returns frames only; writing them, and where, is
the caller's business (`write_bytes` gives an object's exact bytes). Everything is a function of
the arguments: no clock, no environment, no IO.

Randomness is counter based: every random column is splitmix64 of (seed, stream name, row number),
computed as wrapping UInt64 arithmetic in Polars expressions. That keeps the generator vectorized
(a million events take seconds) without adding numpy to billrun's dependencies, and it makes each
column independent of the order the others are drawn in, so adding a column later does not
reshuffle the ones that exist. Money and quantities are drawn as integers and formatted as decimal
strings with integer arithmetic; no float ever touches them.

With `dirty=True` the usage also holds a known number of rows a close must quarantine, drop as
duplicates or ignore as another period's, counted in `SynthStore.expected` (see `EXPECTED_KEYS`).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

import polars as pl

from transforms.inputs.plans import Catalog
from transforms.layout import usage_day_prefix
from transforms.money import minor_exponent
from transforms.periods import Period

# What a close of the period must make of the usage. Rows it reads (its manifest's `read`) are
# rows_in_period_valid_unique + duplicates + the six quarantine counts; `other_period` rows are
# read past (neither billed nor counted) and the corrupt object yields no rows at all.
EXPECTED_KEYS = (
    "rows_in_period_valid_unique",  # distinct event_ids of the period that a close bills
    "duplicates",                   # extra copies of those events (same event_id, same content)
    "negative_quantity",            # quarantined: quantity < 0
    "bad_quantity",                 # quarantined: quantity is not a number ("abc")
    "unknown_customer",             # quarantined: customer_id not in customers (cus_unknown_...)
    "bad_timestamp",                # quarantined: "not-a-time"; belongs to no period, every close counts it
    "missing_field",                # quarantined: event_id is null
    "unknown_meter",                # quarantined: meter no plan prices (unknown_meter)
    "other_period",                 # valid rows of the previous month: neither billed nor counted
    "corrupt_objects",              # unreadable objects (a truncated parquet)
)
UNKNOWN_METER = "unknown_meter"
BAD_TIMESTAMP = "not-a-time"
BAD_QUANTITY = "abc"

DAY_US = 86_400_000_000
EPOCH = date(1970, 1, 1)
OPEN_END = 10**9  # epoch day standing for "no end date"

# Shares of customers whose subscriptions move during the period (the rest bill the whole month).
CHANGE_PCT, CHURN_PCT, MID_START_PCT = 4, 5, 6
FIXED_TERM_PCT = 12      # full-month customers with a contract end after the period
PINNED_PCT = 5           # subscriptions that write their version out (only where that means the same)
BUDGET_PCT, HARD_CAP_PCT = 12, 6
FILTER_MATCH_PCT = 85    # events of a filtered charge that carry the filter's value
BASE_EVENTS, BASE_SPREAD, ZIPF_EVENTS = 15, 31, 20   # per customer: 15..45 + a Zipf share of 20 x customers

FIRST_WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Tyrell", "Cyberdyne",
               "Aperture", "Northwind", "Bright", "Silver", "Quantum", "Lumen", "Cedar", "Harbor",
               "Summit", "Atlas", "Nimbus", "Vertex", "Orbit", "Pixel", "Signal", "Copper", "Granite",
               "Meadow", "Falcon", "Juniper", "Blue Fin", "Red Kite"]
SECOND_WORDS = ["Analytics", "Labs", "Systems", "Robotics", "Health", "Logistics", "Media",
                "Capital", "Software", "Foods", "Energy", "Studios", "AI", "Data", "Networks",
                "Bio", "Security", "Cloud", "Works", "Dynamics"]
SUFFIXES = ["Inc.", "LLC", "Ltd", "GmbH", "SAS", "BV", "Pty Ltd", "Co.", "AB", ""]
# Names that must survive CSV quoting, HTML escaping and UTF-8 end to end.
SPECIAL_NAMES = ["O'Brien & Sons <Ltd>", "Zürich Labs AG", 'Smith, Jones "Analytics" LLC',
                 "Café Ørsted ApS", "Łódź Robotics Sp. z o.o.", "東京データ株式会社"]
SPECIAL_FIRST, SPECIAL_EVERY = 3, 8  # customers 3, 11, 19, ... get the special names
STREETS = ["Market Street", "Main St", "Bahnhofstrasse", "Rue de Rivoli", "King's Road",
           "Keizersgracht", "Calle Mayor", "Elm Avenue", "Harbour Road", "Sveavägen"]
CITIES = [("San Francisco", "94105", "US"), ("New York", "10001", "US"), ("Zürich", "8001", "CH"),
          ("Paris", "75001", "FR"), ("London", "SW1A 1AA", "GB"), ("Amsterdam", "1015", "NL"),
          ("Madrid", "28013", "ES"), ("Austin", "78701", "US"), ("Sydney", "2000", "AU"),
          ("Stockholm", "111 57", "SE")]
US_STATES = {"San Francisco": "CA", "New York": "NY", "Austin": "TX"}
DEMO_VAT_IDS = {"FR": "FR03552081317", "NL": "NL800000018B01", "ES": "ESB00000018", "SE": "SE550000001201"}
"""Valid-looking VAT IDs (format and check digits) of the demo's EU business customers."""
DEMO_TAX_RULES = """\
# The demo seller's tax rules (see docs/tax-and-terms.md). Lumen AI, Inc. is a US company that
# collects New York sales tax and EU VAT under the One-Stop-Shop (non-Union scheme): EU
# businesses with a VAT ID are reverse-charged, EU consumers pay their country's rate, and
# customers elsewhere (California, Texas, the UK, Switzerland, Australia) are not taxed.
seller:
  country: US
  registrations: [US-NY, EU-OSS]
rates:
  - {country: US, region: NY, rate: "8.875", label: Sales tax}   # New York City: state 4 + city 4.5 + MCTD 0.375
  - {country: FR, rate: "20"}
  - {country: NL, rate: "21"}
  - {country: ES, rate: "21"}
  - {country: SE, rate: "25"}
"""
DEMO_TERMS = {"payment_terms_days": 30,
              "payment": {"bank": "First Example Bank", "account_name": "Lumen AI, Inc.",
                          "account_number": "000123456789", "routing_number": "121000248"}}
"""Payment terms and instructions merged into the demo's seller.yaml."""
DIMENSION_VALUES = {
    "model": ["gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-3-70b"],
    "region": ["us-east-1", "eu-west-1", "ap-southeast-1"],
    "tier": ["standard", "priority"],
}


@dataclass(frozen=True)
class UsageObject:
    """One usage object of the store: a frame to serialize as `fmt`, or `raw` bytes (corrupt)."""

    key: str
    fmt: Literal["parquet", "csv", "jsonl"]
    frame: pl.DataFrame | None = None
    raw: bytes | None = None


@dataclass(frozen=True)
class SynthStore:
    """A month of sample inputs. Every frame column is a string (usage timestamps in parquet
    objects are UTC datetimes); `expected` counts usage rows by what a close must do with them."""

    customers: pl.DataFrame
    subscriptions: pl.DataFrame
    usage_objects: list[UsageObject]
    expected: dict[str, int]


def write_bytes(obj: UsageObject) -> bytes:
    """The object's bytes, identical on every call: fixed compression, nothing time-dependent."""
    if obj.raw is not None:
        return obj.raw
    if obj.frame is None:
        raise ValueError(f"{obj.key}: usage object has neither a frame nor raw bytes")
    buf = io.BytesIO()
    if obj.fmt == "parquet":
        obj.frame.write_parquet(buf, compression="zstd", compression_level=3, statistics=True,
                                row_group_size=1_000_000)
    elif obj.fmt == "csv":
        obj.frame.write_csv(buf, line_terminator="\n")
    elif obj.fmt == "jsonl":
        obj.frame.write_ndjson(buf)
    else:
        raise ValueError(f"{obj.key}: unknown usage format {obj.fmt!r}")
    return buf.getvalue()


# --- randomness ------------------------------------------------------------------------------

_U64 = pl.UInt64
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def stream_key(seed: int, stream: str) -> int:
    """The splitmix64 starting state of one named stream."""
    digest = hashlib.sha256(f"billrun.synth/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def random_bits(seed: int, stream: str, n: int) -> pl.Series:
    """n uniform UInt64 values: splitmix64 outputs 1..n of `stream`, as Polars wrapping arithmetic
    (`x // 2**k` is the logical shift `x >> k` on unsigned integers)."""
    def u64(value: int) -> pl.Expr:
        return pl.lit(value, dtype=_U64)

    x = pl.int_range(1, n + 1, dtype=_U64) * u64(_GAMMA) + u64(stream_key(seed, stream))
    x = x.xor(x // u64(1 << 30)) * u64(_MIX1)
    x = x.xor(x // u64(1 << 27)) * u64(_MIX2)
    x = x.xor(x // u64(1 << 31))
    return pl.select(x.alias(stream)).to_series()


def _below(seed: int, stream: str, n: int, bound: int | pl.Series) -> pl.Series:
    """n integers in [0, bound) (bound per row when a Series; it must be >= 1)."""
    bits = random_bits(seed, stream, n)
    if isinstance(bound, pl.Series):
        bound = bound.cast(_U64)
    return (bits % bound).cast(pl.Int64).alias(stream)


def _rank(seed: int, stream: str, n: int) -> pl.Series:
    """A random permutation of 0..n-1."""
    return (random_bits(seed, stream, n).rank("ordinal") - 1).cast(pl.Int64)


# --- calendar --------------------------------------------------------------------------------

def _epoch_day(day: date) -> int:
    return (day - EPOCH).days


def _iso_day(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.Int32).cast(pl.Date).dt.strftime("%Y-%m-%d")


def _decimal_text(minor: pl.Expr, exponent: pl.Expr) -> pl.Expr:
    """Integer minor units -> decimal string: (4999, 2) -> "49.99", (500, 0) -> "500"."""
    scale = pl.lit(10, dtype=pl.Int64).pow(exponent)
    whole = (minor // scale).cast(pl.Utf8)
    frac = (minor % scale).cast(pl.Utf8).str.zfill(exponent)
    return pl.when(exponent == 0).then(whole).otherwise(pl.concat_str(whole, pl.lit("."), frac))


# --- the catalog, as tables ------------------------------------------------------------------

def meter_kind(meter: str) -> str:
    """How big a meter's events are: `tokens` (thousands to hundreds of thousands), `money`
    (a decimal amount in major units), `size` (GB, hours: 1-200) or `count` (calls, images: 1-5)."""
    name = meter.lower()
    if "token" in name:
        return "tokens"
    if any(word in name for word in ("payment", "amount", "revenue", "gmv", "spend", "sales")):
        return "money"
    if any(word in name for word in ("gb", "byte", "storage", "hour", "minute", "second")):
        return "size"
    return "count"


def _dimensions(catalog: Catalog) -> dict[str, list[str]]:
    """Every dimension a plan filters or groups by, with the few values events take."""
    values: dict[str, set[str]] = {}
    for f in catalog.files.values():
        for charge in f.plan.charges:
            for dim in charge.group_by:
                values.setdefault(dim, set())
            for dim, value in charge.filter.items():
                values.setdefault(dim, set()).add(value)
    return {dim: sorted(found | set(DIMENSION_VALUES.get(dim, [f"{dim}-a", f"{dim}-b", f"{dim}-c"])))
            for dim, found in sorted(values.items())}


def _version_table(catalog: Catalog) -> pl.DataFrame:
    """One row per plan version: when it binds, its currency's digits, how many charges it has."""
    rows = [{"plan": f.plan.plan, "version": f.plan.version, "eff_day": _epoch_day(f.plan.effective_from),
             "exponent": minor_exponent(f.plan.currency), "n_charges": len(f.plan.charges),
             "plan_migrates": any(v.plan.migrate_existing_on for v in catalog.versions(f.plan.plan))}
            for plan in sorted({k[0] for k in catalog.files}) for f in catalog.versions(plan)]
    return pl.DataFrame(rows, schema={"plan": pl.Utf8, "version": pl.Int64, "eff_day": pl.Int64,
                                      "exponent": pl.Int64, "n_charges": pl.Int64,
                                      "plan_migrates": pl.Boolean})


def _schedule_table(catalog: Catalog) -> pl.DataFrame:
    """One row per (plan, bound version, span of days): the version actually in force.

    A subscription keeps the version it bound to (grandfathering) until a later version's
    `migrate_existing_on`, when it moves there; with several migrations the newest reached wins.
    """
    rows = []
    for plan in sorted({k[0] for k in catalog.files}):
        versions = catalog.versions(plan)
        for bound in versions:
            moves = sorted((_epoch_day(v.plan.migrate_existing_on), v.plan.version) for v in versions
                           if v.plan.version > bound.plan.version and v.plan.migrate_existing_on)
            spans = [(-OPEN_END, bound.plan.version)]
            for day, version in moves:
                current = max(spans[-1][1], version)
                if day == spans[-1][0]:
                    spans[-1] = (day, current)
                elif current != spans[-1][1]:
                    spans.append((day, current))
            for i, (from_day, version) in enumerate(spans):
                to_day = spans[i + 1][0] if i + 1 < len(spans) else OPEN_END
                rows.append({"plan": plan, "bound_version": bound.plan.version, "from_day": from_day,
                             "to_day": to_day, "version": version})
    return pl.DataFrame(rows, schema={"plan": pl.Utf8, "bound_version": pl.Int64, "from_day": pl.Int64,
                                      "to_day": pl.Int64, "version": pl.Int64})


def _charge_table(catalog: Catalog, dims: dict[str, list[str]]) -> pl.DataFrame:
    """One row per (plan, version, charge): its meter, how big its events are, and per dimension
    the value its filter wants (`f:<dim>`), whether it groups by it (`g:<dim>`) and whether any
    charge of its meter uses the dimension (`u:<dim>`: real payloads carry the field either way)."""
    used = {(c.meter, dim) for f in catalog.files.values() for c in f.plan.charges
            for dim in (*c.filter, *c.group_by)}
    rows = []
    for (plan, version), f in sorted(catalog.files.items()):
        for i, charge in enumerate(f.plan.charges):
            row = {"plan": plan, "version": version, "charge_idx": i, "meter": charge.meter,
                   "kind": meter_kind(charge.meter)}
            for dim in dims:
                row[f"f:{dim}"] = charge.filter.get(dim)
                row[f"g:{dim}"] = dim in charge.group_by
                row[f"u:{dim}"] = (charge.meter, dim) in used
            rows.append(row)
    schema = {"plan": pl.Utf8, "version": pl.Int64, "charge_idx": pl.Int64, "meter": pl.Utf8, "kind": pl.Utf8}
    for dim in dims:
        schema[f"f:{dim}"] = pl.Utf8
        schema[f"g:{dim}"] = pl.Boolean
        schema[f"u:{dim}"] = pl.Boolean
    return pl.DataFrame(rows, schema=schema)


# --- customers -------------------------------------------------------------------------------

def _customer_id(idx: pl.Expr) -> pl.Expr:
    return pl.format("cus_{}", idx.cast(pl.Utf8).str.zfill(6))


def _customers(n: int, seed: int) -> pl.DataFrame:
    """One row per customer: a company name (a few that need escaping), billing email, address."""
    idx = pl.Series("idx", range(n), dtype=pl.Int64)

    def pick(words: list, stream: str) -> pl.Series:
        return pl.Series(words).gather(_below(seed, stream, n, len(words)))

    city = _below(seed, "customer.city", n, len(CITIES))
    frame = pl.DataFrame({
        "idx": idx,
        "first": pick(FIRST_WORDS, "customer.first"),
        "second": pick(SECOND_WORDS, "customer.second"),
        "suffix": pick(SUFFIXES, "customer.suffix"),
        "number": _below(seed, "customer.street_no", n, 400) + 1,
        "street": pick(STREETS, "customer.street"),
        "city": pl.Series([c[0] for c in CITIES]).gather(city),
        "postcode": pl.Series([c[1] for c in CITIES]).gather(city),
        "country": pl.Series([c[2] for c in CITIES]).gather(city),
    })
    special = (idx - SPECIAL_FIRST) // SPECIAL_EVERY
    is_special = ((idx - SPECIAL_FIRST) % SPECIAL_EVERY == 0) & (idx >= SPECIAL_FIRST) & (special < len(SPECIAL_NAMES))
    specials = pl.Series(SPECIAL_NAMES).gather(special.clip(0, len(SPECIAL_NAMES) - 1))
    generic = pl.concat_str(pl.col("first"), pl.lit(" "), pl.col("second"),
                            pl.when(pl.col("suffix") == "").then(pl.lit("")).otherwise(pl.lit(" ") + pl.col("suffix")))
    frame = frame.with_columns(
        name=pl.when(pl.lit(is_special)).then(pl.lit(specials)).otherwise(generic),
    )
    # "Zürich Labs AG" -> zurich-labs-ag: accents dropped, anything else non-alphanumeric a dash
    slug = (pl.col("name").str.normalize("NFKD").str.replace_all(r"\p{M}", "").str.to_lowercase()
            .str.replace_all(r"[^a-z0-9]+", "-").str.strip_chars("-"))
    # Tax: the city's country (and US state); every other EU customer is a business with a VAT
    # ID of its country (reverse charge), the rest are consumers taxed at their country's rate.
    business = (idx % 2 == 0) & pl.col("country").is_in(list(DEMO_VAT_IDS))
    return frame.select(
        customer_id=_customer_id(pl.col("idx")),
        name=pl.col("name"),
        email=pl.format("billing@{}.example", pl.when(slug == "").then(pl.lit("customer")).otherwise(slug)),
        address=pl.format("{} {}, {} {}, {}", "number", "street", "postcode", "city", "country"),
        tax_id=pl.when(business).then(pl.col("country").replace_strict(DEMO_VAT_IDS, default=None)),
        country=pl.col("country"),
        region=pl.col("city").replace_strict(US_STATES, default=None),
    )


# --- subscriptions ---------------------------------------------------------------------------

def _subscriptions(n: int, seed: int, p0: int, p1: int,
                   versions: pl.DataFrame) -> pl.DataFrame:
    """One row per subscription segment, internal form (epoch days, bound version).

    Every customer has one subscription; some start mid-period, some end mid-period, and some
    change plan mid-period (the old row ends the day the new one, with a new id, starts).
    """
    first_eff = versions.group_by("plan").agg(first_eff=pl.col("eff_day").min()).sort("plan")
    plans = first_eff.filter(pl.col("first_eff") < p1)
    if plans.height == 0:
        raise ValueError("no plan in the catalog has a version in force during the period")
    n_plans = plans.height

    # Which customers move: exact counts, so even a small store has one of each.
    remaining = max(n - 1, 0)  # at least one customer bills the whole month
    counts = []
    for pct in (CHANGE_PCT, CHURN_PCT, MID_START_PCT):
        k = min(-(-n * pct // 100), remaining)
        counts.append(k)
        remaining -= k
    k_change, k_churn, k_mid = counts
    rank = _rank(seed, "sub.category", n)
    category = (pl.when(pl.lit(rank) < k_change).then(pl.lit("change"))
                .when(pl.lit(rank) < k_change + k_churn).then(pl.lit("churn"))
                .when(pl.lit(rank) < k_change + k_churn + k_mid).then(pl.lit("mid"))
                .otherwise(pl.lit("full")))
    idx = pl.Series("idx", range(n), dtype=pl.Int64)
    # The first customers take one plan each, so every plan has customers; the rest are random.
    plan_idx = pl.select(pl.when(pl.lit(idx) < n_plans).then(pl.lit(idx))
                         .otherwise(pl.lit(_below(seed, "sub.plan", n, n_plans)))).to_series()
    subs = pl.DataFrame({"idx": idx, "plan": plans["plan"].gather(plan_idx),
                         "first_eff": plans["first_eff"].gather(plan_idx)}).with_columns(category=category)

    def draw(lo: pl.Expr, hi: pl.Expr, stream: str) -> pl.Expr:
        """A day in [lo, hi] (lo when the span is empty; callers check)."""
        span = pl.max_horizontal(hi - lo + 1, pl.lit(1))
        return lo + (pl.lit(random_bits(seed, stream, n)) % span.cast(_U64)).cast(pl.Int64)

    # Established customers started up to ~18 months ago (or when their plan launched).
    before_lo = pl.max_horizontal(pl.col("first_eff"), pl.lit(p0 - 540))
    inside_lo = pl.max_horizontal(pl.col("first_eff"), pl.lit(p0 + 1))
    subs = subs.with_columns(
        start_day=pl.when(pl.col("category") == "mid").then(draw(inside_lo, pl.lit(p1 - 1), "sub.start_mid"))
        .when(before_lo <= p0).then(draw(before_lo, pl.lit(p0), "sub.start"))
        .otherwise(draw(pl.col("first_eff"), pl.lit(p1 - 1), "sub.start_late")).cast(pl.Int64),
    )
    move_lo = pl.max_horizontal(pl.col("start_day") + 1, pl.lit(p0 + 1))
    can_move = move_lo <= p1 - 1
    subs = subs.with_columns(
        end_day=pl.when(pl.col("category").is_in(["churn", "change"]) & can_move)
        .then(draw(move_lo, pl.lit(p1 - 1), "sub.end"))
        .when((pl.col("category") == "full") & (pl.lit(_below(seed, "sub.fixed_term", n, 100)) < FIXED_TERM_PCT))
        .then(pl.lit(p1) + pl.lit(_below(seed, "sub.term_end", n, 365)))
        .otherwise(pl.lit(None)).cast(pl.Int64),
    )

    # Plan changes: the new plan is another plan already launched on the change day.
    changers = subs.filter((pl.col("category") == "change") & pl.col("end_day").is_not_null())
    candidates = (changers.select("idx", old_plan="plan", change_day="end_day")
                  .join(plans.rename({"plan": "new_plan"}), how="cross")
                  .filter((pl.col("new_plan") != pl.col("old_plan")) & (pl.col("first_eff") <= pl.col("change_day")))
                  .sort("idx", "new_plan"))
    candidates = candidates.with_columns(_r=random_bits(seed, "sub.new_plan", candidates.height))
    chosen = candidates.sort("idx", "_r").group_by("idx", maintain_order=True).first()
    successors = chosen.select("idx", plan="new_plan", start_day="change_day",
                               end_day=pl.lit(None, dtype=pl.Int64))
    # A changer with nowhere to go simply stays.
    subs = subs.with_columns(
        end_day=pl.when((pl.col("category") == "change") & ~pl.col("idx").is_in(chosen["idx"].implode()))
        .then(pl.lit(None, dtype=pl.Int64)).otherwise(pl.col("end_day")))
    rows = pl.concat([subs.select("idx", "plan", "start_day", "end_day"), successors], how="vertical")

    # Blank plan_version binds the version in force on start_date (`Catalog.in_force_on`).
    bound = (rows.sort("start_day")
             .join_asof(versions.select("plan", bound_version="version", eff_day="eff_day", exponent="exponent",
                                        plan_migrates="plan_migrates").sort("eff_day"),
                        left_on="start_day", right_on="eff_day", by="plan", strategy="backward",
                        check_sortedness=False)  # both sides are sorted on the day just above
             .sort("idx", "start_day"))
    if bound["bound_version"].null_count():
        raise AssertionError("a subscription starts before its plan has a version in force")
    m = bound.height
    return bound.with_columns(
        subscription_id=pl.format("sub_{}", pl.int_range(1, m + 1).cast(pl.Utf8).str.zfill(6)),
        customer_id=_customer_id(pl.col("idx")),
        # Writing the version out means the same as blank only where the plan never migrates.
        plan_version=pl.when(~pl.col("plan_migrates") & (pl.lit(_below(seed, "sub.pinned", m, 100)) < PINNED_PCT))
        .then(pl.col("bound_version").cast(pl.Utf8)).otherwise(pl.lit(None, dtype=pl.Utf8)),
        budget_major=pl.when(pl.lit(_below(seed, "sub.budget", m, 100)) < BUDGET_PCT)
        .then(100 * (1 + pl.lit(_below(seed, "sub.budget_amount", m, 20)))),
        cap_pct=pl.lit(_below(seed, "sub.hard_cap", m, 100)),
    ).with_columns(
        hard_cap_major=pl.when(pl.col("cap_pct") < HARD_CAP_PCT)
        .then(pl.coalesce(pl.col("budget_major") * 2, 500 * (1 + pl.col("cap_pct"))))
    )


def _subscriptions_frame(subs: pl.DataFrame) -> pl.DataFrame:
    """The contract's subscriptions table: every column a string, dates ISO, money decimal."""
    def money(col: str) -> pl.Expr:
        return _decimal_text(pl.col(col) * pl.lit(10, dtype=pl.Int64).pow(pl.col("exponent")), pl.col("exponent"))

    return subs.select(
        "subscription_id", "customer_id", "plan", "plan_version",
        start_date=_iso_day(pl.col("start_day")),
        end_date=_iso_day(pl.col("end_day")),
        budget=money("budget_major"),
        hard_cap=money("hard_cap_major"),
    )


# --- usage -----------------------------------------------------------------------------------

def _segments(subs: pl.DataFrame, schedule: pl.DataFrame, versions: pl.DataFrame,
              lo: int, hi: int) -> pl.DataFrame:
    """One row per (subscription, span of days in [lo, hi)) with one plan version in force."""
    return (subs.select("idx", "customer_id", "plan", "bound_version", "start_day", "end_day")
            .join(schedule, on=["plan", "bound_version"], maintain_order="left_right")
            .join(versions.select("plan", "version", "exponent", "n_charges"), on=["plan", "version"],
                  maintain_order="left")
            .with_columns(
                seg_start=pl.max_horizontal("start_day", "from_day", pl.lit(lo)),
                seg_end=pl.min_horizontal(pl.col("end_day").fill_null(OPEN_END), "to_day", pl.lit(hi)))
            .filter((pl.col("seg_start") < pl.col("seg_end")) & (pl.col("n_charges") > 0))
            .sort("idx", "seg_start"))


def _events(segments: pl.DataFrame, charges: pl.DataFrame, dims: dict[str, list[str]],
            seed: int, stream: str) -> pl.DataFrame:
    """`n` events per segment, at random instants inside it, each of a charge its version prices.

    Filtered charges get their filter's value most of the time; grouped dimensions take a few
    values; a dimension some other charge of the meter uses is filled most of the time, and a
    dimension no charge of the meter uses is absent (null).
    """
    rows = (segments.filter(pl.col("n") > 0)
            .with_columns(_k=pl.int_ranges(0, "n")).explode("_k").drop("_k"))
    n = rows.height
    rows = rows.with_columns(charge_idx=_below(seed, f"{stream}.charge", n, rows["n_charges"]))
    rows = rows.join(charges, on=["plan", "version", "charge_idx"], how="left", maintain_order="left")
    span_ms = (rows["seg_end"] - rows["seg_start"]) * (DAY_US // 1000)
    tokens = (1 + _below(seed, f"{stream}.tokens_a", n, 50)) * (1000 + _below(seed, f"{stream}.tokens_b", n, 5000))
    # money: 1.00 .. 499.99 in the plan currency's major unit, drawn as integer minor units
    scale = rows.select(pl.lit(10, dtype=pl.Int64).pow(pl.col("exponent"))).to_series()
    money_minor = scale + _below(seed, f"{stream}.money", n, 499 * scale)
    kind = pl.col("kind")
    rows = rows.with_columns(
        ts_us=pl.col("seg_start") * DAY_US + pl.lit(_below(seed, f"{stream}.time", n, span_ms)) * 1000,
        quantity=pl.when(kind == "tokens").then(pl.lit(tokens).cast(pl.Utf8))
        .when(kind == "money").then(_decimal_text(pl.lit(money_minor), pl.col("exponent")))
        .when(kind == "size").then((1 + pl.lit(_below(seed, f"{stream}.size", n, 200))).cast(pl.Utf8))
        .otherwise((1 + pl.lit(_below(seed, f"{stream}.count", n, 5))).cast(pl.Utf8)),
    )
    dim_columns = []
    for dim, pool in dims.items():
        pick = pl.Series(pool).gather(_below(seed, f"{stream}.dim.{dim}", n, len(pool)))
        roll = pl.lit(_below(seed, f"{stream}.dim_roll.{dim}", n, 100))
        wanted, grouped = pl.col(f"f:{dim}"), pl.col(f"g:{dim}")
        dim_columns.append(
            pl.when(wanted.is_not_null() & (roll < FILTER_MATCH_PCT)).then(wanted)
            .when(wanted.is_not_null() | grouped | (pl.col(f"u:{dim}") & (roll < 70))).then(pl.lit(pick))
            .otherwise(pl.lit(None, dtype=pl.Utf8)).alias(dim))
    return rows.select("customer_id", "meter", "quantity", "ts_us", *dim_columns)


def _event_counts(n: int, seed: int) -> pl.Series:
    """Events per customer for a whole month: 15-45 each plus a Zipf share (a few heavy users)."""
    rank = _rank(seed, "activity.rank", n)
    weight = 1_000_000 // (rank + 1)
    total = weight.sum()
    return BASE_EVENTS + _below(seed, "activity.base", n, BASE_SPREAD) + (ZIPF_EVENTS * n * weight) // total


def _objects(rows: pl.DataFrame, dims: list[str], period_start: date,
             text_days: dict[int, str]) -> list[UsageObject]:
    """One object per day that has rows, `usage/date=YYYY-MM-DD/part-0.<fmt>`, rows in time order."""
    objects = []
    columns = ["event_id", "customer_id", "meter", "quantity"]
    for (day,), part in sorted(rows.partition_by("_day", as_dict=True, maintain_order=True).items()):
        fmt = text_days.get(day, "parquet")
        part = part.sort("ts_us", "_seq", nulls_last=True)
        stamp = pl.from_epoch(pl.col("ts_us"), time_unit="us").dt.replace_time_zone("UTC")
        if fmt == "parquet":
            if part["_bad_ts"].any():
                raise AssertionError("an unparseable timestamp cannot be stored in a parquet timestamp column")
            timestamp = stamp
        else:
            timestamp = (pl.when(pl.col("_bad_ts")).then(pl.lit(BAD_TIMESTAMP))
                         .otherwise(stamp.dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")))
        frame = part.select(*columns, timestamp.alias("timestamp"), *dims)
        key = f"{usage_day_prefix(period_start + timedelta(days=day))}part-0.{fmt}"
        objects.append(UsageObject(key=key, fmt=fmt, frame=frame))
    return objects


def _dirty_rows(clean: pl.DataFrame, subs: pl.DataFrame, schedule: pl.DataFrame, versions: pl.DataFrame,
                charges: pl.DataFrame, dims: dict[str, list[str]], seed: int, p0: int, days: int,
                text_days: list[int]) -> dict[str, pl.DataFrame]:
    """Rows a close must quarantine (each with exactly one defect, copied from a clean event) and
    valid rows of the previous month that arrived late (in the first day's object)."""
    n = clean.height
    few = max(2, min(20, n // 2000))  # "a few" of each kind: 2 in a small store, at most 20
    sources = clean.with_columns(_r=random_bits(seed, "dirty.sources", n)).sort("_r").drop("_r")
    kinds = ["negative_quantity", "bad_quantity", "unknown_customer", "bad_timestamp", "missing_field",
             "unknown_meter"]
    few = min(few, n // len(kinds))
    out: dict[str, pl.DataFrame] = {}
    for i, kind in enumerate(kinds):
        out[kind] = sources.slice(i * few, few)
    out["negative_quantity"] = out["negative_quantity"].with_columns(quantity=pl.lit("-") + pl.col("quantity"))
    out["bad_quantity"] = out["bad_quantity"].with_columns(quantity=pl.lit(BAD_QUANTITY))
    out["unknown_customer"] = out["unknown_customer"].with_columns(
        customer_id=pl.format("cus_unknown_{}", pl.int_range(1, pl.len() + 1).cast(pl.Utf8).str.zfill(3)))
    out["unknown_meter"] = out["unknown_meter"].with_columns(meter=pl.lit(UNKNOWN_METER))
    bad_ts = out["bad_timestamp"]
    out["bad_timestamp"] = bad_ts.with_columns(
        ts_us=pl.lit(None, dtype=pl.Int64), _bad_ts=pl.lit(True),
        _day=pl.Series(text_days).gather(_below(seed, "dirty.bad_ts_day", bad_ts.height, len(text_days))))

    # Late arrivals from the last day of the previous month, for customers subscribed then.
    late_segments = _segments(subs, schedule, versions, p0 - 1, p0)
    if late_segments.height:
        pick = _below(seed, "late.segment", few, late_segments.height)
        per_segment = pick.value_counts().rename({pick.name: "_i", "count": "n"})
        late_segments = (late_segments.with_row_index("_i").with_columns(pl.col("_i").cast(pl.Int64))
                         .join(per_segment.with_columns(pl.col("_i").cast(pl.Int64), pl.col("n").cast(pl.Int64)),
                               on="_i", how="inner", maintain_order="left"))
        late = _events(late_segments, charges, dims, seed, "late")
        out["other_period"] = late.sort("ts_us", "customer_id").with_columns(_day=pl.lit(0, dtype=pl.Int64),
                                                                             _bad_ts=pl.lit(False))
    return out


def _duplicates(clean: pl.DataFrame, seed: int, days: int) -> pl.DataFrame:
    """~1% of clean events again, same event_id and content: in the same object or a later day's."""
    n = clean.height
    k = max(1, n // 100) if n else 0
    dup = clean.with_columns(_r=random_bits(seed, "dup.sources", n)).sort("_r").head(k).drop("_r")
    later = pl.col("_day") + 1 + pl.lit(_below(seed, "dup.later", k, 1 << 30)) % (days - 1 - pl.col("_day")).clip(1)
    same = (pl.col("_day") == days - 1) | (pl.lit(_below(seed, "dup.same", k, 100)) < 30)
    return dup.with_columns(_day=pl.when(same).then(pl.col("_day")).otherwise(later))


def _corrupt_object(objects: list[UsageObject], day: date) -> UsageObject:
    """A parquet object cut off mid-write: the head of a real file, no footer."""
    if not objects:
        return UsageObject(key=usage_day_prefix(day) + "part-1.parquet", fmt="parquet", raw=b"PAR1\x15\x04")
    sample = objects[0].frame.head(50)
    data = write_bytes(UsageObject(key=objects[0].key, fmt="parquet", frame=sample))
    return UsageObject(key=usage_day_prefix(day) + "part-1.parquet", fmt="parquet", raw=data[: len(data) // 2])


def synth_store(catalog: Catalog, period: str, customers: int, seed: int, dirty: bool = True) -> SynthStore:
    """A realistic month of inputs for `period`, a function of the arguments only.

    Customers spread over every plan with a version in force during the period; usage is
    ~30-80 events per customer (Zipf-skewed), one object per day, mostly parquet with a few csv
    and jsonl days. With `dirty`, `expected` counts the bad rows mixed in (see `EXPECTED_KEYS`).
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    month = Period.parse(period)
    start = month.start
    p0, p1 = _epoch_day(month.start), _epoch_day(month.end)
    days = p1 - p0
    dims = _dimensions(catalog)
    versions = _version_table(catalog)
    schedule = _schedule_table(catalog)
    charges = _charge_table(catalog, dims)

    customer_frame = _customers(customers, seed)
    subs = _subscriptions(customers, seed, p0, p1, versions)

    # Clean events: a customer's monthly count, shared by its segments in proportion to their days.
    monthly = pl.DataFrame({"idx": pl.Series(range(customers), dtype=pl.Int64),
                            "monthly": _event_counts(customers, seed)})
    segments = (_segments(subs, schedule, versions, p0, p1).join(monthly, on="idx", maintain_order="left")
                .with_columns(n=pl.col("monthly") * (pl.col("seg_end") - pl.col("seg_start")) // days))
    clean = _events(segments, charges, dims, seed, "event")
    clean = (clean.with_row_index("_gen").sort("ts_us", "customer_id", "_gen").drop("_gen")
             .with_columns(_day=pl.col("ts_us") // DAY_US - p0, _bad_ts=pl.lit(False)))

    # Day formats: a few csv and jsonl days among the parquet ones.
    day_order = _rank(seed, "objects.days", days).to_list()
    order_of = sorted(range(days), key=lambda d: day_order[d])
    text_days = {order_of[0]: "csv", order_of[1]: "csv", order_of[2]: "jsonl", order_of[3]: "jsonl"}
    corrupt_day = order_of[4]

    pieces = {"clean": clean}
    if dirty:
        pieces.update(_dirty_rows(clean, subs, schedule, versions, charges, dims, seed, p0, days,
                                  sorted(text_days)))
    counted = {name: frame.height for name, frame in pieces.items()}

    # Ids: one sequence over every row that has one; missing_field rows have none.
    rows = pl.concat([frame.with_columns(_piece=pl.lit(name)) for name, frame in pieces.items()],
                     how="diagonal_relaxed")
    width = max(7, len(str(rows.height)))
    rows = rows.with_columns(
        event_id=pl.when(pl.col("_piece") == "missing_field").then(pl.lit(None, dtype=pl.Utf8))
        .otherwise(pl.format("evt_{}_{}", pl.lit(period),
                             pl.int_range(1, pl.len() + 1).cast(pl.Utf8).str.zfill(width))))
    if dirty:
        duplicates = _duplicates(rows.filter(pl.col("_piece") == "clean"), seed, days)
        counted["duplicates"] = duplicates.height
        rows = pl.concat([rows, duplicates.with_columns(_piece=pl.lit("duplicates"))], how="vertical")
    rows = rows.with_columns(_seq=pl.int_range(0, pl.len()))

    objects = _objects(rows, list(dims), start, text_days)
    expected = {key: counted.get(key, 0) for key in EXPECTED_KEYS}
    expected["rows_in_period_valid_unique"] = counted["clean"]
    if dirty:
        objects.append(_corrupt_object(objects, start + timedelta(days=corrupt_day)))
        objects.sort(key=lambda o: o.key)
        expected["corrupt_objects"] = 1
    return SynthStore(customers=customer_frame, subscriptions=_subscriptions_frame(subs),
                      usage_objects=objects, expected=expected)
