-- The checked usage of disjoint shards merged into that of all rows, from the shards' Parquet
-- files (views `<table>_parts`, one per table of CHECKED_TABLES but usage_by_dims, each over every
-- shard's file).
-- Every copy of an event_id is checked in one shard (flows/shards.py: shards follow customers,
-- and copies under customers of two shards are gathered into one): aggregates re-add, or, when no
-- customer has rows in two shards, are only put in order (`*_disjoint`), and per-row tables are
-- put back in the order one check of all rows gives them. Every order is total (its keys are unique), so the bytes never depend on the
-- number of shards. NULLS FIRST: the order the checked usage had when Polars merged it.

-- name: quarantine
-- One row per quarantined row, in source order.
SELECT * FROM quarantine_parts
ORDER BY source_key NULLS FIRST, source_row NULLS FIRST;

-- name: conflicts
-- One row per duplicate copy whose content differs from the copy that counts, in source order.
SELECT * FROM conflicts_parts
ORDER BY source_key NULLS FIRST, source_row NULLS FIRST;

-- name: usage_by_dims
-- One row per subscription segment x meter x distinct dimensions: the units of the merged
-- `usage_by_day` (its file, as view `usage_by_day_merged`) summed over the days; the shards
-- write no per-dims units of their own (checked_usage.sql `usage_by_day_part`).
SELECT subscription_id, segment_no, meter, dims,
       CAST(sum(units) AS DECIMAL(38, 9)) AS units, CAST(sum(events) AS BIGINT) AS events
FROM usage_by_day_merged
GROUP BY subscription_id, segment_no, meter, dims
ORDER BY subscription_id NULLS FIRST, segment_no NULLS FIRST, meter NULLS FIRST, dims NULLS FIRST;

-- name: usage_by_day
-- One row per subscription segment x meter x distinct dimensions x UTC day: the shards' units
-- re-added (a segment's day has events in most shards).
SELECT subscription_id, segment_no, meter, dims, day,
       CAST(sum(units) AS DECIMAL(38, 9)) AS units, CAST(sum(events) AS BIGINT) AS events
FROM usage_by_day_parts
GROUP BY subscription_id, segment_no, meter, dims, day
ORDER BY subscription_id NULLS FIRST, segment_no NULLS FIRST, meter NULLS FIRST, dims NULLS FIRST,
         day NULLS FIRST;

-- name: per_event_usage
-- One row per billed event of a meter priced per event, in event-time order within its segment.
SELECT * FROM per_event_usage_parts
ORDER BY subscription_id NULLS FIRST, segment_no NULLS FIRST, meter NULLS FIRST, event_at NULLS FIRST,
         event_id NULLS FIRST;

-- name: credit_history
-- One row per earlier copy of an event of a credit meter, in event_id order; an event_id's
-- copies keep the order their shard gave them (copy_order: the one that billed first).
SELECT * EXCLUDE (filename, file_row_number) FROM credit_history_parts
ORDER BY event_id, filename, file_row_number;

-- name: usage_by_day_disjoint
-- One row per subscription segment x meter x distinct dimensions x UTC day: the shards' units
-- in order, as they are, when no customer's rows are in two shards (a segment's day is in one).
SELECT subscription_id, segment_no, meter, dims, day,
       CAST(units AS DECIMAL(38, 9)) AS units, CAST(events AS BIGINT) AS events
FROM usage_by_day_parts
ORDER BY subscription_id NULLS FIRST, segment_no NULLS FIRST, meter NULLS FIRST, dims NULLS FIRST,
         day NULLS FIRST;

-- name: usage_by_dims_disjoint
-- One row per subscription segment x meter x distinct dimensions: the shards' units in order,
-- as they are, when no customer's rows are in two shards.
SELECT subscription_id, segment_no, meter, dims,
       CAST(units AS DECIMAL(38, 9)) AS units, CAST(events AS BIGINT) AS events
FROM usage_by_dims_parts
ORDER BY subscription_id NULLS FIRST, segment_no NULLS FIRST, meter NULLS FIRST, dims NULLS FIRST;
