"""A large, seeded store for benchmarking the monthly close: customers, subscriptions and one
month of usage as day-partitioned Parquet, written chunk by chunk so memory stays bounded.

    python bench/generate.py --events 10000000 --customers 100000 --out .bench/store-10m \
        --period 2026-10 --seed 1

`--events` is the number of usage rows written (what a close reads): 1% of them (`--dup-pct`)
are extra copies of earlier events (same event_id and content, in the same day's file or a
later one), the rest are distinct events. Nothing else is dirty: every customer has one
subscription that starts before the period, and every event uses a meter and dimension values
that its customer's plan prices, so a close bills `events - duplicates` rows and quarantines none.

Every event is a pure function of (seed, its index): splitmix64 of a counter, as wrapping UInt64
arithmetic in Polars expressions (the approach of transforms/demo/synth.py, re-implemented here so the
benchmark does not move when that module does). A duplicate re-derives its source event from the
source's index, so no earlier chunk has to be kept in memory. No float touches a quantity.

Who uses what:
- Customers' activity is Zipf-distributed (weight 1/rank); the top `--enterprise-top-pct` of
  customers by activity are on the enterprise plan (heavy users sign contracts), the others are
  spread over the remaining plans by `--mix` weights.
- Each plan has a table of event templates (meter x model x region) with weights; a template
  never names a meter or model the plan does not price (checked against plans/*.yaml at start).
"""
from __future__ import annotations

import argparse
import calendar
import hashlib
import json
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transforms.layout import CUSTOMERS_KEYS, SELLER_KEY, SUBSCRIPTIONS_KEYS, USAGE_PREFIX, usage_day_prefix  # noqa: E402

U64 = pl.UInt64
GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
DAY_US = 86_400_000_000
ZIPF_SCALE = 10**12  # integer Zipf weights: ZIPF_SCALE // rank

MODELS = {"gpt-4o": 35, "gpt-4o-mini": 35, "claude-sonnet": 20, "llama-3-70b": 10}
REGIONS = {"us-east-1": 50, "eu-west-1": 30, "ap-southeast-1": 20}

# Per plan: (meter, weight, uses model?) -- each template is crossed with the regions, and with
# the models when the meter is priced per model.
PLAN_METERS = {
    "api": [("input_tokens", 45, True), ("output_tokens", 40, True), ("api_calls", 15, False)],
    "enterprise": [("input_tokens", 50, True), ("output_tokens", 50, True)],
    "pro": [("premium_requests", 40, False), ("api_calls", 60, False)],
    "images": [("images", 80, False), ("upscales", 20, False)],
    "payments": [("payments", 100, False)],
}
# How big one event of a meter is: (kind, a, b); see `_quantity`.
METER_SIZE = {
    "input_tokens": ("tokens", 40, 400),     # (1..40) x (100..499) tokens
    "output_tokens": ("tokens", 20, 200),    # (1..20) x (100..299) tokens
    "api_calls": ("count", 3, 0),            # 1..3 calls
    "premium_requests": ("count", 1, 0),     # 1 request
    "images": ("count", 4, 0),               # 1..4 images
    "upscales": ("count", 1, 0),             # 1 upscale
    "payments": ("money", 49_900, 100),      # 1.00 .. 499.99 (major units, 2 decimals)
}
DEFAULT_MIX = "api=60,pro=20,images=12,payments=8"

SELLER = {"name": "Bench Corp", "address": "1 Benchmark Way, Springfield", "email": "billing@bench.example",
          "tax_id": "XX 00-0000000"}


# --- randomness ------------------------------------------------------------------------------

def stream_key(seed: int, stream: str) -> int:
    return int.from_bytes(hashlib.sha256(f"billrun.bench/{seed}/{stream}".encode()).digest()[:8], "little")


def bits(index: pl.Expr, seed: int, stream: str) -> pl.Expr:
    """Uniform UInt64 per row: splitmix64 output number `index` of `stream` (x // 2**k is x >> k)."""
    def lit(v: int) -> pl.Expr:
        return pl.lit(v, dtype=U64)

    x = (index.cast(U64) + lit(1)) * lit(GAMMA) + lit(stream_key(seed, stream))
    x = x.xor(x // lit(1 << 30)) * lit(MIX1)
    x = x.xor(x // lit(1 << 27)) * lit(MIX2)
    return x.xor(x // lit(1 << 31))


def below(index: pl.Expr, seed: int, stream: str, bound: int | pl.Expr) -> pl.Expr:
    bound = pl.lit(bound, dtype=U64) if isinstance(bound, int) else bound.cast(U64)
    return (bits(index, seed, stream) % bound).cast(pl.Int64)


# --- the plan catalog -------------------------------------------------------------------------

def load_plans(plans_dir: Path) -> dict[str, list[dict]]:
    """plan id -> its versions (parsed YAML), oldest first."""
    plans: dict[str, list[dict]] = {}
    for path in sorted(plans_dir.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        plans.setdefault(doc["plan"], []).append(doc)
    for versions in plans.values():
        versions.sort(key=lambda d: d["version"])
    return plans


def templates(plans: dict[str, list[dict]], plan_ids: list[str]) -> pl.DataFrame:
    """One row per (plan, meter, model, region) an event may take, with an integer weight and
    the cumulative weight over the whole table (plans contiguous, in `plan_ids` order). Fails
    if a template is not priced by every version of its plan."""
    rows = []
    for plan in plan_ids:
        for meter, weight, by_model in PLAN_METERS[plan]:
            for model, mw in (MODELS.items() if by_model else [(None, 1)]):
                for region, rw in REGIONS.items():
                    dims = {"region": region} | ({"model": model} if model else {})
                    for doc in plans[plan]:
                        if not any(c["meter"] == meter
                                   and all(dims.get(k) == v for k, v in (c.get("filter") or {}).items())
                                   for c in doc.get("charges", [])):
                            sys.exit(f"generate: plan {plan} v{doc['version']} prices no {meter} event with {dims}")
                    rows.append({"plan": plan, "meter": meter, "model": model, "region": region,
                                 "weight": weight * mw * rw * (1 if by_model else 100)})
    frame = pl.DataFrame(rows, schema={"plan": pl.String, "meter": pl.String, "model": pl.String,
                                       "region": pl.String, "weight": pl.Int64})
    frame = frame.with_columns(cum=pl.col("weight").cum_sum())
    bounds = frame.group_by("plan", maintain_order=True).agg(lo=(pl.col("cum") - pl.col("weight")).min(),
                                                             total=pl.col("weight").sum())
    return frame, bounds


# --- customers and subscriptions ---------------------------------------------------------------

def customers_table(n: int, seed: int, mix: dict[str, int], enterprise_top_pct: float) -> pl.DataFrame:
    """One row per customer: id, activity rank (0 = heaviest), plan."""
    width = max(6, len(str(n)))
    idx = pl.int_range(0, n, dtype=pl.Int64)
    frame = pl.select(idx.alias("idx"), bits(idx, seed, "customer.rank").alias("_r")).with_columns(
        rank=pl.col("_r").rank("ordinal").cast(pl.Int64) - 1).drop("_r")
    names, weights = list(mix), list(mix.values())
    cum = [sum(weights[: i + 1]) for i in range(len(weights))]
    roll = below(pl.col("idx"), seed, "customer.plan", cum[-1])
    plan = pl.lit(names[-1])
    for name, bound in reversed(list(zip(names, cum, strict=True))):
        plan = pl.when(roll < bound).then(pl.lit(name)).otherwise(plan)
    top = int(n * enterprise_top_pct / 100)
    return frame.with_columns(
        customer_id=pl.format("cus_{}", pl.col("idx").cast(pl.String).str.zfill(width)),
        plan=pl.when(pl.col("rank") < top).then(pl.lit("enterprise")).otherwise(plan),
    )


def subscriptions_frame(customers: pl.DataFrame, seed: int, period_start: date,
                        plans: dict[str, list[dict]]) -> pl.DataFrame:
    """One subscription per customer, blank plan_version, starting on a day between its plan's
    first effective_from and the day before the period (so the whole month bills)."""
    first = {p: min(_as_date(d["effective_from"]) for d in docs) for p, docs in plans.items()}
    epoch = date(1970, 1, 1)
    lo = pl.col("plan").replace_strict({p: (d - epoch).days for p, d in first.items()}, return_dtype=pl.Int64)
    hi = (period_start - epoch).days - 1
    if any((d - epoch).days > hi for p, d in first.items() if p in set(customers["plan"].unique())):
        sys.exit(f"generate: a plan in the mix starts after {period_start}; choose a later --period")
    start = lo + below(pl.col("idx"), seed, "sub.start", (pl.lit(hi) - lo + 1))
    budget = below(pl.col("idx"), seed, "sub.budget", 100)
    width = max(6, len(str(customers.height)))
    return customers.select(
        subscription_id=pl.format("sub_{}", pl.col("idx").cast(pl.String).str.zfill(width)),
        customer_id="customer_id",
        plan="plan",
        plan_version=pl.lit(None, dtype=pl.String),
        start_date=start.cast(pl.Int32).cast(pl.Date).dt.strftime("%Y-%m-%d"),
        end_date=pl.lit(None, dtype=pl.String),
        budget=pl.when(budget < 10).then(pl.lit("500.00")).otherwise(pl.lit(None, dtype=pl.String)),
        hard_cap=pl.lit(None, dtype=pl.String),
    )


def customers_frame(customers: pl.DataFrame) -> pl.DataFrame:
    return customers.select(
        "customer_id",
        name=pl.format("Customer {} Ltd", pl.col("customer_id").str.slice(4)),
        email=pl.format("billing+{}@customers.example", pl.col("customer_id")),
    )


def _as_date(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


# --- usage ---------------------------------------------------------------------------------------

def day_counts(total: int, period_start: date, days: int) -> list[int]:
    """Rows per day: weekdays weigh 10, weekend days 7; exact total."""
    weights = [7 if (period_start + timedelta(days=d)).weekday() >= 5 else 10 for d in range(days)]
    counts = [total * w // sum(weights) for w in weights]
    for d in range(total - sum(counts)):
        counts[d % days] += 1
    return counts


class EventModel:
    """Everything an event is derived from, small and in memory."""

    def __init__(self, seed: int, customers: pl.DataFrame, templ: pl.DataFrame, bounds: pl.DataFrame,
                 period_start: date, unique_offsets: list[int], quantity_type: str):
        self.seed = seed
        by_rank = customers.sort("rank")
        self.customer_of_rank = by_rank["customer_id"]
        plan_bounds = dict(zip(bounds["plan"], zip(bounds["lo"], bounds["total"], strict=True), strict=True))
        self.plan_lo = by_rank["plan"].replace_strict({p: lo for p, (lo, _) in plan_bounds.items()},
                                                      return_dtype=pl.Int64)
        self.plan_total = by_rank["plan"].replace_strict({p: t for p, (_, t) in plan_bounds.items()},
                                                         return_dtype=pl.Int64)
        weights = pl.int_range(1, customers.height + 1, dtype=pl.Int64, eager=True)
        self.zipf_cum = (ZIPF_SCALE // weights).cum_sum()  # heaviest customer first
        self.zipf_total = int(self.zipf_cum[-1])
        self.templ = templ
        self.templ_cum = templ["cum"]
        self.day0_us = int(datetime(period_start.year, period_start.month, period_start.day,
                                    tzinfo=timezone.utc).timestamp()) * 1_000_000
        self.unique_offsets = pl.Series(unique_offsets, dtype=pl.Int64)  # first index of each day, + total
        self.quantity_type = quantity_type

    def events(self, index: pl.Series) -> pl.DataFrame:
        """The events with these global indices (same index, same event, every time)."""
        s = self.seed
        i = pl.col("i")
        frame = pl.DataFrame({"i": index.cast(pl.Int64)})
        u = frame.select(below(i, s, "event.customer", self.zipf_total).alias("u")).to_series()
        rank = self.zipf_cum.search_sorted(u, side="right").cast(pl.Int64)
        lo, total = self.plan_lo.gather(rank), self.plan_total.gather(rank)
        pick = frame.select((pl.lit(lo) + (bits(i, s, "event.template") % pl.lit(total).cast(U64)).cast(pl.Int64))
                            .alias("p")).to_series()
        t = self.templ_cum.search_sorted(pick, side="right").cast(pl.Int64)
        day = self.unique_offsets.search_sorted(index, side="right").cast(pl.Int64) - 1
        frame = frame.with_columns(
            customer_id=self.customer_of_rank.gather(rank),
            meter=self.templ["meter"].gather(t),
            model=self.templ["model"].gather(t),
            region=self.templ["region"].gather(t),
            ts_us=pl.lit(self.day0_us) + pl.lit(day) * DAY_US + below(i, s, "event.time", DAY_US),
        )
        frame = frame.with_columns(quantity=_quantity(frame, s, self.quantity_type))
        return frame.select(
            event_id=pl.format("evt_{}", bits(i, s, "event.id").cast(pl.String).str.zfill(20)),
            customer_id="customer_id",
            meter="meter",
            quantity="quantity",
            timestamp=pl.from_epoch("ts_us", time_unit="us").dt.replace_time_zone("UTC"),
            model="model",
            region="region",
        )


def _quantity(frame: pl.DataFrame, seed: int, quantity_type: str) -> pl.Expr:
    """Per meter kind: tokens (1..a) x (b..b+299 or so), counts 1..a, money 1.00..499.99."""
    i, meter = pl.col("i"), pl.col("meter")
    a_draw, b_draw = below(i, seed, "event.qty_a", 1 << 20), below(i, seed, "event.qty_b", 1 << 20)
    expr = pl.lit(None, dtype=pl.Int64)
    money = None
    for name, (kind, a, b) in METER_SIZE.items():
        if kind == "tokens":
            value = (1 + a_draw % a) * (b + b_draw % 300)
        elif kind == "count":
            value = 1 + a_draw % a
        else:  # money, in minor units (cents)
            value = b + a_draw % a
            money = name
        expr = pl.when(meter == name).then(value).otherwise(expr)
    if quantity_type == "int64":
        # whole major units for money meters, so the column stays integer
        return pl.when(meter == money).then(expr // 100).otherwise(expr).cast(pl.Int64)
    whole = pl.when(meter == money).then(expr // 100).otherwise(expr).cast(pl.String)
    cents = (expr % 100).cast(pl.String).str.zfill(2)
    return pl.when(meter == money).then(pl.concat_str(whole, pl.lit("."), cents)).otherwise(whole)


# --- main ----------------------------------------------------------------------------------------

def parse_mix(text: str) -> dict[str, int]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        mix[name.strip()] = int(weight)
    return mix


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, required=True, help="usage rows to write (duplicates included)")
    ap.add_argument("--customers", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True, help="store folder to create (must not hold usage/)")
    ap.add_argument("--period", default="2026-10")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plans", type=Path, default=Path(__file__).resolve().parent.parent / "plans")
    ap.add_argument("--dup-pct", type=float, default=1.0, help="share of rows that are duplicate copies")
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"plan weights for non-enterprise customers ({DEFAULT_MIX})")
    ap.add_argument("--enterprise-top-pct", type=float, default=1.0,
                    help="the most active N%% of customers are on the enterprise plan")
    ap.add_argument("--rows-per-file", type=int, default=2_000_000, help="at most this many rows per Parquet file")
    ap.add_argument("--quantity-type", choices=("string", "int64"), default="string",
                    help="string: decimal strings (payments carry cents); int64: whole units")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    year, month = (int(x) for x in args.period.split("-"))
    period_start = date(year, month, 1)
    days = calendar.monthrange(year, month)[1]
    if (args.out / USAGE_PREFIX).exists():
        sys.exit(f"generate: {args.out / USAGE_PREFIX} exists; remove it or choose another --out")
    plans = load_plans(args.plans)
    mix = parse_mix(args.mix)
    plan_ids = sorted(set(mix) | ({"enterprise"} if args.enterprise_top_pct > 0 else set()))
    missing = [p for p in plan_ids if p not in plans or p not in PLAN_METERS]
    if missing:
        sys.exit(f"generate: no plan file or event templates for {missing}")
    templ, bounds = templates(plans, plan_ids)

    customers = customers_table(args.customers, args.seed, mix, args.enterprise_top_pct)
    customers_csv, subscriptions_csv = args.out / CUSTOMERS_KEYS[0], args.out / SUBSCRIPTIONS_KEYS[0]
    customers_csv.parent.mkdir(parents=True, exist_ok=True)
    subscriptions_csv.parent.mkdir(parents=True, exist_ok=True)
    customers_frame(customers).write_csv(customers_csv)
    subscriptions_frame(customers, args.seed, period_start, plans).write_csv(subscriptions_csv)
    (args.out / SELLER_KEY).write_text(yaml.safe_dump(SELLER, sort_keys=True), encoding="utf-8")

    duplicates = int(args.events * args.dup_pct / 100)
    unique = args.events - duplicates
    u_days = day_counts(unique, period_start, days)
    d_days = day_counts(duplicates, period_start, days)
    offsets = [0]
    for n in u_days:
        offsets.append(offsets[-1] + n)
    model = EventModel(args.seed, customers, templ, bounds, period_start, offsets, args.quantity_type)

    by_meter: dict[str, int] = {}
    by_plan: dict[str, int] = {}
    plan_of = dict(zip(customers["customer_id"], customers["plan"], strict=True))
    files, bytes_written, dup_offset = 0, 0, 0
    for d in range(days):
        fresh = pl.int_range(offsets[d], offsets[d + 1], dtype=pl.Int64, eager=True)
        # A duplicate copies an event of this day or of the two days before (client retries and
        # late re-deliveries), drawn by its own counter so each copy is reproducible.
        lo = offsets[max(0, d - 2)]
        k = pl.int_range(dup_offset, dup_offset + d_days[d], dtype=pl.Int64, eager=True)
        dup_offset += d_days[d]
        sources = pl.select(pl.lit(lo) + below(pl.lit(k), args.seed, "dup.source", offsets[d + 1] - lo)).to_series()
        rows = pl.concat([model.events(fresh), model.events(sources)]).sort("timestamp", "event_id")
        counts = rows.group_by("meter").len()
        for meter, n in counts.iter_rows():
            by_meter[meter] = by_meter.get(meter, 0) + n
        plan_counts = (rows.group_by("customer_id").len()
                       .with_columns(plan=pl.col("customer_id").replace_strict(plan_of))
                       .group_by("plan").agg(pl.col("len").sum()))
        for plan, n in plan_counts.iter_rows():
            by_plan[plan] = by_plan.get(plan, 0) + n
        folder = args.out / usage_day_prefix(period_start + timedelta(days=d))
        folder.mkdir(parents=True, exist_ok=True)
        parts = max(1, -(-rows.height // args.rows_per_file))
        size = -(-rows.height // parts)
        for p in range(parts):
            path = folder / f"part-{p}.parquet"
            rows.slice(p * size, size).write_parquet(path, compression="zstd", statistics=True)
            bytes_written += path.stat().st_size
            files += 1
        print(f"  day {d + 1:2d}/{days}: {rows.height:>10,} rows in {parts} file(s), "
              f"{time.perf_counter() - started:6.1f}s", flush=True)
        del rows

    seconds = time.perf_counter() - started
    meta = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": args.events, "unique_events": unique, "duplicates": duplicates, "quarantined": 0,
        "customers": args.customers, "subscriptions": args.customers,
        "customers_by_plan": dict(sorted(customers.group_by("plan").len().iter_rows())),
        "rows_by_plan": dict(sorted(by_plan.items())), "rows_by_meter": dict(sorted(by_meter.items())),
        "files": files, "usage_bytes": bytes_written, "seconds": round(seconds, 1),
    }
    (args.out / "bench-store.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"generate: {args.events:,} rows ({duplicates:,} duplicates) for {args.customers:,} customers, "
          f"{files} files, {bytes_written / 1e6:,.0f} MB in {seconds:.1f}s -> {args.out}")
    print(json.dumps({"rows_by_plan": meta["rows_by_plan"], "rows_by_meter": meta["rows_by_meter"]}))


if __name__ == "__main__":
    main()
