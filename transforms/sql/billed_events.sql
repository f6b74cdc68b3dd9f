-- The billed_events output: lineage from invoice line to event (transforms/engine/lineage.py).
-- One row per usage row the close counted (the manifest's `rows.read`), sorted by customer,
-- event time, event_id and source: a billed row with the invoice line that billed it (and the
-- credit grants that paid for it), a duplicate with the copy that billed in its place, a
-- quarantined row with its reason.
--
-- Inputs: `lineage` (the checked usage's billed and duplicate rows, read from the shards' files:
-- checked_usage.sql `lineage`), `keyed` (one row per distinct billed meter x dims x usage-line
-- filter that matches it, with the group the dims fall in: transforms.engine.lineage.line_of_dims, the
-- only step in Python), `usage_lines` (the usage and overage lines of the invoices, filter and
-- group as '' when absent), `grants` (one row per event_id a credit draw paid for, with its
-- grants as sorted, comma-joined ids), `set_aside` (the quarantined rows, already in the
-- output's columns). Per-event work happens here only, so that DuckDB spills what does not fit
-- under its memory cap instead of the close holding every event of the period.

-- name: billed_dims
-- One row per distinct (meter, dims) of the billed rows: what line_of_dims looks at in Python.
SELECT DISTINCT meter, dims
FROM lineage
WHERE outcome = 'billed';

-- name: dims_lines
-- One row per subscription segment x meter x dims of the billed rows, with the invoice line that
-- bills them: the usage or overage line of the segment whose charge has the meter, whose filter
-- the dims match and whose group they fall in. Plans refuse two charges that could bill one
-- event, so a segment x meter x dims has at most one line. Small (a row per usage_summary row):
-- the events then join it on four keys, never on themselves.
CREATE OR REPLACE TEMP TABLE dims_lines AS
SELECT b.subscription_id, b.segment_no, b.meter, b.dims, l.invoice_id, l.line_no
FROM (SELECT DISTINCT subscription_id, CAST(segment_no AS INTEGER) AS segment_no, meter, dims
      FROM lineage
      WHERE outcome = 'billed') AS b
JOIN keyed AS k
  ON k.meter = b.meter AND k.dims = b.dims
JOIN usage_lines AS l
  ON l.subscription_id = b.subscription_id AND l.segment_no = b.segment_no AND l.meter = b.meter
 AND l.filter = k.filter AND l."group" = k."group";

-- name: billed_events
-- One row per usage row, in the output's columns and order. A duplicate names the copy that
-- billed in its place (`source_key#row=N`), or says that a copy billed in an earlier period.
WITH settled AS (
    SELECT r.customer_id,
           r.event_at,
           r.event_id,
           r.meter,
           r.dims,
           CAST(r.quantity AS DECIMAL(38, 9)) AS quantity,
           r.outcome AS status,
           dl.invoice_id,
           dl.line_no,
           CASE WHEN r.outcome = 'billed' THEN g.grant_id END AS grant_id,
           r.subscription_id,
           CAST(r.segment_no AS INTEGER) AS segment_no,
           CASE WHEN r.outcome = 'duplicate' THEN 'duplicate_event_id' END AS reason,
           CAST(NULL AS VARCHAR) AS detail,
           CASE WHEN r.outcome <> 'duplicate' THEN NULL
                WHEN r.duplicate_of_source_key IS NOT NULL
                    THEN r.duplicate_of_source_key || '#row=' || CAST(r.duplicate_of_source_row AS VARCHAR)
                ELSE 'a copy billed in an earlier period'
           END AS duplicate_of,
           r.source_key,
           r.source_row
    FROM lineage AS r
    LEFT JOIN dims_lines AS dl
           ON r.outcome = 'billed' AND dl.subscription_id = r.subscription_id
          AND dl.segment_no = CAST(r.segment_no AS INTEGER) AND dl.meter = r.meter AND dl.dims = r.dims
    LEFT JOIN grants AS g
           ON g.event_id = r.event_id
)
SELECT customer_id, event_at, event_id, meter, dims, quantity, status, invoice_id, line_no, grant_id,
       subscription_id, segment_no, reason, detail, duplicate_of, source_key, source_row
FROM (SELECT * FROM settled
      UNION ALL BY NAME
      SELECT * FROM set_aside)
ORDER BY customer_id NULLS LAST, event_at NULLS LAST, event_id NULLS LAST, source_key NULLS LAST,
         source_row NULLS LAST;
