-- The billed_events output: lineage from invoice line to event (transforms/engine/lineage.py).
-- One row per usage row the close counted (the manifest's `rows.read`), sorted by customer,
-- event time, event_id and source: a billed row with the invoice line that billed it (and the
-- credit grants that paid for it), a duplicate with the copy that billed in its place, a
-- quarantined row with its reason.
--
-- Inputs: `lineage` (the checked usage's billed and duplicate rows, read from the shards' files:
-- checked_usage.sql `lineage`, and read twice: once for its shapes, once for its events), `keyed` (one row per distinct billed meter x dims x usage-line
-- filter that matches it, with the group the dims fall in: transforms.engine.lineage.line_of_dims, the
-- only step in Python), `usage_lines` (the usage and overage lines of the invoices, filter and
-- group as '' when absent), `grants` (one row per event_id a credit draw paid for, with its
-- grants as sorted, comma-joined ids), `set_aside` (the quarantined rows, in the output's
-- columns, each with a shape number of its own, counted on from the last of `shapes`). Per-event work happens here only, so that DuckDB spills what does not fit under its memory
-- cap instead of the close holding every event of the period.
--
-- The sort carries what is the event's own (ids, time, quantity, credit grants, source) and the
-- number of its shape: the texts that many events share (subscription, segment, meter, dims,
-- status, invoice line) are in `shapes`, and the table's writer puts them back a batch at a time
-- (transforms.engine.lineage.events_of). Sorting 10M events with those texts aboard cost about
-- 13 CPU s more than with their number: DuckDB moves and spills every row's payload.

-- name: row_shapes
-- One row per distinct subscription x segment x meter x dims x outcome of the lineage rows: the
-- texts of billed_events that many events share. A few per customer (1M at 10M events).
CREATE OR REPLACE TEMP TABLE row_shapes AS
SELECT DISTINCT subscription_id, CAST(segment_no AS INTEGER) AS segment_no, meter, dims, outcome
FROM lineage;

-- name: billed_dims
-- One row per distinct (meter, dims) of the billed rows: what line_of_dims looks at in Python.
SELECT DISTINCT meter, dims
FROM row_shapes
WHERE outcome = 'billed';

-- name: shapes
-- One row per row shape, numbered from 0: the columns of billed_events that its events share, with
-- the invoice line that bills a billed shape and why a duplicate did not bill. A billed shape's
-- line is the usage or overage line of its segment whose charge has the meter, whose filter the
-- dims match and whose group they fall in (`keyed`); plans refuse two charges that could bill one
-- event, so a shape has at most one line. The events then join it on five keys, never on themselves.
CREATE OR REPLACE TEMP TABLE shapes AS
WITH dims_lines AS (
    SELECT b.subscription_id, b.segment_no, b.meter, b.dims, l.invoice_id, l.line_no
    FROM row_shapes AS b
    JOIN keyed AS k
      ON k.meter = b.meter AND k.dims = b.dims
    JOIN usage_lines AS l
      ON l.subscription_id = b.subscription_id AND l.segment_no = b.segment_no AND l.meter = b.meter
     AND l.filter = k.filter AND l."group" = k."group"
    WHERE b.outcome = 'billed'
)
SELECT CAST(row_number() OVER () - 1 AS INTEGER) AS shape,
       s.meter,
       s.dims,
       s.outcome AS status,
       dl.invoice_id,
       dl.line_no,
       s.subscription_id,
       s.segment_no,
       CASE WHEN s.outcome = 'duplicate' THEN 'duplicate_event_id' END AS reason,
       CAST(NULL AS VARCHAR) AS detail
FROM row_shapes AS s
LEFT JOIN dims_lines AS dl
       ON s.outcome = 'billed' AND dl.subscription_id = s.subscription_id AND dl.segment_no = s.segment_no
      AND dl.meter = s.meter AND dl.dims = s.dims;

-- name: shape_count
-- One row: how many shapes the lineage rows have (a quarantined row's shape is numbered after them).
SELECT count(*) FROM shapes;

-- name: shape_columns
-- One row per shape, in its number's order: what transforms.engine.lineage.events_of looks up.
SELECT meter, dims, status, invoice_id, line_no, subscription_id, segment_no, reason, detail
FROM shapes
ORDER BY shape;

-- name: billed_events
-- One row per usage row, in the output's order: the event's own columns and its shape's number
-- (a quarantined row's is past the lineage's shapes: `set_aside`). A duplicate names the copy that
-- billed in its place (`source_key#row=N`), or says that a copy billed in an earlier period.
WITH settled AS (
    SELECT r.customer_id,
           r.event_at,
           r.event_id,
           CAST(r.quantity AS DECIMAL(38, 9)) AS quantity,
           s.shape,
           CASE WHEN r.outcome = 'billed' THEN g.grant_id END AS grant_id,
           CASE WHEN r.outcome <> 'duplicate' THEN NULL
                WHEN r.duplicate_of_source_key IS NOT NULL
                    THEN r.duplicate_of_source_key || '#row=' || CAST(r.duplicate_of_source_row AS VARCHAR)
                ELSE 'a copy billed in an earlier period'
           END AS duplicate_of,
           r.source_key,
           r.source_row
    FROM lineage AS r
    JOIN shapes AS s
      ON s.subscription_id = r.subscription_id AND s.segment_no = CAST(r.segment_no AS INTEGER)
     AND s.meter = r.meter AND s.dims = r.dims AND s.status = r.outcome
    LEFT JOIN grants AS g
           ON g.event_id = r.event_id
)
SELECT customer_id, event_at, event_id, quantity, shape, grant_id, duplicate_of, source_key, source_row
FROM (SELECT * FROM settled
      UNION ALL BY NAME
      SELECT customer_id, event_at, event_id, quantity, shape, source_key, source_row FROM set_aside)
ORDER BY customer_id NULLS LAST, event_at NULLS LAST, event_id NULLS LAST, source_key NULLS LAST,
         source_row NULLS LAST;
