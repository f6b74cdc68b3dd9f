-- Settle one period's usage: which rows bill, which are duplicates, which are quarantined.
-- Inputs: `events` (normalized usage rows of every object read), `customers`, `segments`
-- (one row per subscription segment in the period, numbered by `segment_key`), `plan_meters`
-- (one row per plan version x meter it prices), `price_combos` (the rows of `dims_to_price`),
-- `priced_dims` (those of them a charge prices), `billed_elsewhere` (event_ids the documents of
-- other closed periods bill, from the billed-event index: billed_index.sql). Parameters: $period
-- ('YYYY-MM'), $period_start, $period_end (UTC instants, half-open), $first_day (the period's
-- first day, a DATE), $decided (the closed periods whose index counts: what they billed is
-- known, so their usage never decides anything here).
-- Macros: `id_hash` (billed_index.sql), `copy_order` (copies.sql: which copy of an event counts).
-- Only `settled` holds every row: the rows are read from `events` and checked on the way into it,
-- never copied into a table of their own first.

-- name: candidates
-- One row per 64-bit hash of an event_id (DuckDB's hash(), within this connection) that two or
-- more scoped rows valid on their own have: only their event_ids can have two clean copies. A
-- row whose hash is not a candidate is the only copy of its event_id here and is never ranked.
-- A hash never decides alone: the candidates' rows are ranked by event_id itself (`settled`),
-- so a collision only ranks an event_id that has one clean copy, which comes first.
CREATE OR REPLACE TEMP TABLE candidates AS
SELECT hash(event_id) AS event_hash
FROM events
WHERE reason IS NULL
  AND (event_at IS NULL OR (event_at >= $period_start AND event_at < $period_end))
GROUP BY 1
HAVING count(*) > 1;

-- name: dims_to_price
-- One row per plan version x meter x distinct dimensions among the scoped rows valid on their
-- own that fall in a subscription segment: small, so matching them against the charges' filters
-- happens once per combination, not per row. Rows set aside later for another reason (an
-- unknown meter, say) only add combinations that no row is priced by.
SELECT DISTINCT seg.plan, seg.plan_version, e.meter, e.dims
FROM events AS e
JOIN segments AS seg
  ON seg.customer_id = e.customer_id
 AND e.event_at >= seg.start_at AND e.event_at < seg.end_at
WHERE e.reason IS NULL
  AND e.event_at >= $period_start AND e.event_at < $period_end
ORDER BY ALL;

-- name: combinations
-- One row per plan version x meter x dimensions of `dims_to_price` (`price_combos`), numbered
-- (`combination`), with what a row of it needs from the charges: whether the plan version
-- prices the meter (`plan_meters`), the largest quantity one event may have, whether it is
-- priced event by event, and whether a charge prices the dimensions (`priced_dims`). Every
-- scoped row valid on its own that falls in a segment has its combination here, so `settled`
-- looks all of that up in one join, and the aggregates group by the number.
CREATE OR REPLACE TEMP TABLE combinations AS
SELECT CAST(row_number() OVER (ORDER BY c.plan, c.plan_version, c.meter, c.dims) AS INTEGER) AS combination,
       c.plan, c.plan_version, c.meter, c.dims,
       pm.meter IS NOT NULL AS known_meter, pm.max_quantity, pm.per_event,
       pd.meter IS NOT NULL AS priced
FROM price_combos AS c
LEFT JOIN plan_meters AS pm
       ON pm.plan = c.plan AND pm.plan_version = c.plan_version AND pm.meter = c.meter
LEFT JOIN priced_dims AS pd
       ON pd.plan = c.plan AND pd.plan_version = c.plan_version AND pd.meter = c.meter AND pd.dims = c.dims;

-- name: segment_names
-- One row per subscription segment: its number and what it is called in the aggregates. A table
-- of DuckDB's own, whose statistics know its columns hold no NULL: the aggregates' Parquet files
-- declare the names required, as they did when they were grouped by them.
CREATE OR REPLACE TEMP TABLE segment_names AS
SELECT segment_key, subscription_id, segment_no
FROM segments;

-- name: any_earlier
-- Whether any row of this usage is dated before the period (if none, no copy billed before).
SELECT EXISTS (SELECT 1 FROM events WHERE reason IS NULL AND event_at < $period_start);

-- name: earlier_copies
-- One row per copy, earlier in time and in an earlier period not yet decided, of an event_id
-- that has a scoped copy here valid on its own. Whether that copy bills in its own period (a
-- subscription, a meter and a charge for it then) is decided against subscriptions and plans;
-- if it does, a clean copy here is a duplicate, so an event_id bills once, ever, whichever
-- period is closed first. A copy in a decided period (closed, with its billed-event index) is
-- left out: what that period bills is its index (`billed_elsewhere`), whatever copies arrived
-- there since.
SELECT DISTINCT e.event_id, e.customer_id, e.meter, e.dims, e.event_at
FROM events AS e
JOIN customers AS c ON c.customer_id = e.customer_id
WHERE e.reason IS NULL
  AND e.event_at < $period_start
  AND strftime(e.event_at, '%Y-%m') NOT IN (SELECT unnest($decided::VARCHAR[]))
  AND e.event_id IN (SELECT event_id FROM events
                     WHERE reason IS NULL
                       AND (event_at IS NULL OR (event_at >= $period_start AND event_at < $period_end)))
ORDER BY ALL;

-- name: probed
-- One row per event_id with a scoped copy here valid on its own, with its index hash: what the
-- billed-event index is looked up for (only when some closed period has an index). Only the
-- copy that bills is held to what the lookup finds (`settled`).
CREATE OR REPLACE TEMP TABLE probed AS
SELECT DISTINCT event_id, id_hash(event_id) AS id_hash
FROM events
WHERE reason IS NULL
  AND (event_at IS NULL OR (event_at >= $period_start AND event_at < $period_end));

-- name: settled
-- One row per scoped row with its outcome: billed, duplicate or quarantined. Among clean copies
-- of one event_id the earliest bills; ties are broken by content, then by source, so the outcome
-- never depends on the order objects were listed or read (the rule: copies.sql `copy_order`).
-- The rows are read, checked and written here in one stream, each clean row as copy 1 of its
-- event_id: any clean row whose event_id hash is not a candidate is the only clean copy of its
-- event_id. The rows whose hash is a candidate (a few in a hundred: `ranked`) are ranked by
-- event_id afterwards (`later_copies`), and the copies after the first made duplicates
-- (`later_copies_settled`), rather than every row being held in memory to be ranked on the way.
-- The copy that would bill is quarantined instead (`billed_in_period`) when another closed
-- period's documents bill the event already (`billed_elsewhere`): reported, never billed twice.
-- The fields as read are kept for quarantined rows only (the quarantine's), and the row's own
-- reason only as its final_reason. A row in a segment keeps the segment's `segment_key` and its
-- `combination`, the keys the aggregates group by (numbers are grouped at a fraction of the cost
-- of the strings they stand for).
-- `checked`: one row per usage row this close counts (scoped: rows whose event time falls in the
-- period, and rows with no usable event time, which belong to no period, so every close that
-- reads them counts them), with its final reason: the row's own rule first, then the rules that
-- need other tables; a row that no charge of its plan version prices (its dimensions fit no
-- charge's filter) is quarantined rather than silently billed at nothing. Segments of one
-- customer never overlap, so a row joins at most one, and one combination (a row without one is
-- never billed: `IS NOT TRUE`).
CREATE OR REPLACE TEMP TABLE settled AS
WITH checked AS (
    SELECT s.*,
           seg.subscription_id,
           seg.segment_no,
           seg.segment_key,
           k.combination,
           COALESCE(s.reason,
                    CASE WHEN c.customer_id IS NULL THEN 'unknown_customer'
                         WHEN seg.subscription_id IS NULL THEN 'no_subscription'
                         WHEN k.known_meter IS NOT TRUE THEN 'unknown_meter'
                         -- its amount at the plan's price would not fit (transforms.engine.checked_usage.plan_meters)
                         WHEN s.quantity > k.max_quantity THEN 'amount_out_of_range'
                         WHEN k.priced IS NOT TRUE THEN 'no_matching_charge'
                    END) AS final_reason,
           hash(s.event_id) IN (SELECT event_hash FROM candidates) AS ranked
    FROM (SELECT *
          FROM events
          WHERE event_at IS NULL
             OR (event_at >= $period_start AND event_at < $period_end)) AS s
    LEFT JOIN customers AS c
           ON c.customer_id = s.customer_id
    LEFT JOIN segments AS seg
           ON s.reason IS NULL
          AND seg.customer_id = s.customer_id
          AND s.event_at >= seg.start_at AND s.event_at < seg.end_at
    LEFT JOIN combinations AS k
           ON k.plan = seg.plan AND k.plan_version = seg.plan_version
          AND k.meter = s.meter AND k.dims = s.dims
),
decided AS (
    SELECT c.* REPLACE (CASE WHEN c.final_reason IS NULL AND b.event_id IS NOT NULL
                             THEN 'billed_in_period' ELSE c.final_reason END AS final_reason),
           CASE WHEN c.final_reason IS NULL THEN 1 END AS copy_no,
           CASE WHEN c.final_reason IS NULL THEN b.period END AS billed_period,
           CASE WHEN c.final_reason IS NULL THEN b.run_id END AS billed_run
    FROM checked AS c
    LEFT JOIN billed_elsewhere AS b ON b.event_id = c.event_id
)
SELECT * EXCLUDE (reason)
         REPLACE (CASE WHEN final_reason IS NOT NULL THEN quantity_raw END AS quantity_raw,
                  CASE WHEN final_reason IS NOT NULL THEN timestamp_raw END AS timestamp_raw),
       CASE WHEN final_reason IS NOT NULL THEN 'quarantined'
            WHEN event_id NOT IN (SELECT event_id FROM billed_before) THEN 'billed'
            ELSE 'duplicate'
       END AS outcome
FROM decided;

-- name: later_copies
-- One row per clean copy of an event_id that is not its first (`settled`'s row, by rowid, and
-- its copy number): the clean rows of the candidates (`ranked`; a clean row has a copy number)
-- ranked by event_id with the rule (copies.sql `copy_order`).
CREATE OR REPLACE TEMP TABLE later_copies AS
SELECT row_key, copy_no
FROM (SELECT rowid AS row_key,
             row_number() OVER (PARTITION BY event_id
                                ORDER BY copy_order(event_at, customer_id, meter, quantity, dims, source_key,
                                                    source_row)) AS copy_no
      FROM settled
      WHERE ranked AND copy_no IS NOT NULL)
WHERE copy_no > 1;

-- name: later_copies_settled
-- Each later copy (`later_copies`) settled as what it is: a duplicate, its copy number set, and
-- what `settled` gave it as copy 1 undone (a copy after the first is never `billed_in_period`:
-- no billed period or run, its fields as read not kept).
UPDATE settled
SET copy_no = l.copy_no, final_reason = NULL, billed_period = NULL, billed_run = NULL,
    quantity_raw = NULL, timestamp_raw = NULL, outcome = 'duplicate'
FROM later_copies AS l
WHERE settled.rowid = l.row_key;

-- name: counts
-- One row: the manifest's proof that every counted row is billed, a duplicate or quarantined.
SELECT count(*) AS read,
       count(*) FILTER (WHERE outcome = 'billed') AS billed,
       count(*) FILTER (WHERE outcome = 'duplicate') AS duplicates,
       count(*) FILTER (WHERE outcome = 'quarantined') AS quarantined
FROM settled;

-- name: quarantine
-- One row per quarantined row: its fields as read, where it came from and why.
-- A copy of an event another closed period bills says which period and run; when that period
-- is a later one (closed first), its documents are final, and a backfill of both periods moves
-- the event to the earlier one.
SELECT source_key, source_row, event_id, customer_id, meter,
       quantity_raw AS quantity, timestamp_raw AS timestamp, dims, final_reason AS reason,
       CASE WHEN final_reason = 'billed_in_period' AND billed_period < $period
                THEN format('billed in {} by {}', billed_period, billed_run)
            WHEN final_reason = 'billed_in_period'
                THEN format('billed in {} by {} (a later period, closed first, whose documents are final); '
                            'to bill it in {} instead, run billrun backfill --from {} --to {}',
                            billed_period, billed_run, $period, $period, billed_period)
            ELSE detail
       END AS detail
FROM settled
WHERE outcome = 'quarantined'
ORDER BY source_key, source_row;

-- name: by_day
-- One row per subscription segment x meter x distinct dimensions x UTC day, by their numbers
-- (`segment_key`, `combination`, and the day's number in the period): the billed units, for
-- spend alerts replayed in event time. A billed row is in a segment, so in the period, and its
-- microseconds since the period's start divided by a day's are its day's number. Materialized
-- (DuckDB's memory, which spills): both usage_by_day and usage_by_dims read it.
CREATE OR REPLACE TEMP TABLE by_day AS
SELECT segment_key, combination,
       CAST((epoch_us(event_at) - epoch_us($period_start)) // 86400000000 AS INTEGER) AS day_no,
       sum(quantity) AS units, count(*) AS events
FROM settled
WHERE outcome = 'billed'
GROUP BY ALL;

-- name: usage_by_day
-- One row per subscription segment x meter x distinct dimensions x UTC day (`by_day`, its
-- numbers named again), in order.
SELECT seg.subscription_id, seg.segment_no, k.meter, k.dims, $first_day + d.day_no AS day, d.units, d.events
FROM by_day AS d
JOIN segment_names AS seg USING (segment_key)
JOIN combinations AS k USING (combination)
ORDER BY ALL;

-- name: usage_by_day_part
-- One row per subscription segment x meter x distinct dimensions x UTC day (`by_day`, its
-- numbers named again), in no order: a part of the usage that is merged with others
-- (merged_usage.sql re-adds the parts' units, orders them, and sums the per-dims units from
-- them), so sorting it would be lost work.
SELECT seg.subscription_id, seg.segment_no, k.meter, k.dims, $first_day + d.day_no AS day, d.units, d.events
FROM by_day AS d
JOIN segment_names AS seg USING (segment_key)
JOIN combinations AS k USING (combination);

-- name: dims_units
-- One row per subscription segment x meter x distinct dimensions: the billed units, summed from
-- `by_day` (by its numbers) rather than from every row again, their names joined back. A view:
-- `usage_by_dims` writes it in order, `usage_by_dims_part` as it comes.
CREATE OR REPLACE TEMP VIEW dims_units AS
SELECT seg.subscription_id, seg.segment_no, k.meter, k.dims, d.units, d.events
FROM (SELECT segment_key, combination,
             CAST(sum(units) AS DECIMAL(38, 9)) AS units, CAST(sum(events) AS BIGINT) AS events
      FROM by_day
      GROUP BY ALL) AS d
JOIN segment_names AS seg USING (segment_key)
JOIN combinations AS k USING (combination);

-- name: usage_by_dims
-- One row per subscription segment x meter x distinct dimensions (`dims_units`), in order.
SELECT *
FROM dims_units
ORDER BY ALL;

-- name: usage_by_dims_part
-- One row per subscription segment x meter x distinct dimensions (`dims_units`), in no order: a
-- part's, which the merge puts in order (merged_usage.sql `usage_by_dims_disjoint`).
SELECT *
FROM dims_units;

-- name: per_event_usage
-- One row per billed event of a meter that some charge prices per event (percentage fees),
-- in event-time order within its segment. A billed row is in a segment: saying so lets the
-- Parquet file declare the segment's columns required, as a join with `segments` did.
SELECT subscription_id, segment_no, meter, dims, quantity, customer_id, event_id, event_at
FROM settled
WHERE outcome = 'billed' AND combination IN (SELECT combination FROM combinations WHERE per_event)
  AND subscription_id IS NOT NULL AND segment_no IS NOT NULL
ORDER BY subscription_id, segment_no, meter, event_at, event_id;

-- name: per_event_usage_part
-- One row per billed event of a meter priced per event, as `per_event_usage`, in no order: a
-- part's, which the merge puts in order (merged_usage.sql `per_event_usage`).
SELECT subscription_id, segment_no, meter, dims, quantity, customer_id, event_id, event_at
FROM settled
WHERE outcome = 'billed' AND combination IN (SELECT combination FROM combinations WHERE per_event)
  AND subscription_id IS NOT NULL AND segment_no IS NOT NULL;


-- name: credit_history
-- One row per valid copy of an event of a credit meter before the period, earliest copy of
-- each event_id first: the wallet replay keeps, per event_id, the first copy a plan paid with
-- credits (the one that billed in its own period).
SELECT event_id, customer_id, meter, dims, quantity, event_at
FROM events
WHERE reason IS NULL
  AND event_at < $period_start
  AND meter IN (SELECT unnest($meters::VARCHAR[]))
  AND customer_id IN (SELECT customer_id FROM customers)
ORDER BY event_id, copy_order(event_at, customer_id, meter, quantity, dims, source_key, source_row);

-- name: lineage
-- One row per billed or duplicate row (the quarantined ones are in `quarantine`), in no order:
-- what the billed_events output is made of. A duplicate names the copy that billed in its place:
-- the billed copy of its event_id in this period (same shard: copies of an event_id meet in one),
-- or, when none billed here, a copy that billed in an earlier period. Only the duplicates (a few
-- in a hundred) are joined to the copies that billed; the billed rows name none.
SELECT customer_id, event_at, event_id, meter, dims, quantity, subscription_id, segment_no,
       outcome, source_key, source_row,
       CAST(NULL AS VARCHAR) AS duplicate_of_source_key, CAST(NULL AS BIGINT) AS duplicate_of_source_row
FROM settled
WHERE outcome = 'billed'
UNION ALL
SELECT s.customer_id, s.event_at, s.event_id, s.meter, s.dims, s.quantity, s.subscription_id, s.segment_no,
       s.outcome, s.source_key, s.source_row,
       b.source_key AS duplicate_of_source_key, b.source_row AS duplicate_of_source_row
FROM settled AS s
LEFT JOIN (SELECT event_id, source_key, source_row FROM settled
           WHERE outcome = 'billed' AND event_id IN (SELECT event_id FROM settled WHERE outcome = 'duplicate')) AS b
       ON b.event_id = s.event_id
WHERE s.outcome = 'duplicate';

-- name: billed_ids
-- One row per event billed here, with its index hash: this check's part of the billed-event
-- index (billed_index.sql).
SELECT event_id, id_hash(event_id) AS id_hash
FROM settled
WHERE outcome = 'billed';

-- name: conflicts
-- One row per copy set aside as a duplicate whose content differs from the copy of its event_id
-- that counts (copy 1): another customer, meter, quantity or dimensions. Exactly one copy bills
-- (the first, by the rule above); the others are reported here rather than dropped silently.
WITH extra AS (
    SELECT * FROM settled WHERE copy_no > 1
),
firsts AS (
    SELECT * FROM settled WHERE copy_no = 1 AND event_id IN (SELECT event_id FROM extra)
)
SELECT d.source_key, d.source_row, d.event_id, d.customer_id, d.meter, d.dims, d.quantity, d.event_at,
       concat_ws(', ', if(d.customer_id <> f.customer_id, 'customer_id', NULL), if(d.meter <> f.meter, 'meter', NULL),
                       if(d.quantity <> f.quantity, 'quantity', NULL), if(d.dims <> f.dims, 'dims', NULL)) AS differs_in,
       f.source_key AS kept_source_key, f.source_row AS kept_source_row, f.outcome AS kept_outcome,
       f.customer_id AS kept_customer_id, f.meter AS kept_meter, f.dims AS kept_dims, f.quantity AS kept_quantity,
       f.event_at AS kept_event_at
FROM extra AS d
JOIN firsts AS f ON f.event_id = d.event_id
WHERE d.customer_id <> f.customer_id OR d.meter <> f.meter OR d.quantity <> f.quantity OR d.dims <> f.dims
ORDER BY d.source_key, d.source_row;
