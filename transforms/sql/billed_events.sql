-- The billed_events output: lineage from invoice line to event (transforms/engine/lineage.py).
-- One row per usage row the close counted (the manifest's `rows.read`), sorted by customer,
-- event time, event_id and source: a billed row with the invoice line that billed it (and the
-- credit grants that paid for it), a duplicate with the copy that billed in its place, a
-- quarantined row with its reason.
--
-- The rows come in buckets: ranges of customer_id, in order (transforms.engine.lineage.write_lineage
-- splits the checked usage's lineage files by them; one bucket, 0, when they are not split). Each
-- bucket is sorted on its own and the table is the buckets one after the other: a sort of a
-- shard's size in memory instead of one of the period's events spilled to disk.
--
-- Inputs: `lineage_part` (one bucket's billed and duplicate rows, read from its lineage files:
-- checked_usage.sql `lineage`), `keyed` (one row per distinct billed meter x dims x usage-line
-- filter that matches it, with the group the dims fall in: transforms.engine.lineage.line_of_dims,
-- the only step in Python), `usage_lines` (the usage and overage lines of the invoices, filter and
-- group as '' when absent), `grant_rows` (one row per event_id a credit draw paid for, with its
-- bucket and its grants as sorted, comma-joined ids), `set_aside_rows` (the quarantined rows, in
-- the output's columns, with their bucket and row number, registered before the numbers are
-- given). Per-event work happens here only: the close never holds the
-- period's events.
--
-- The sort carries what is the event's own (event_id, time, quantity, credit grants, source row)
-- and numbers for the rest: its shape's within its bucket (the texts that many events share:
-- customer, subscription, segment, meter, dims, status, invoice line, in `shapes`), its
-- customer's (`customers`: in customer_id's order, so that the rows sort on the number) and its
-- source object's (`sources`, in source_key's order). The table's writer puts the texts back a
-- batch at a time (transforms.engine.lineage.events_of). Sorting 10M events with the shapes' texts
-- aboard cost about 13 CPU s more than with their number: DuckDB moves and spills every row's
-- payload; sorting on numbers for customer and source rather than their texts costs a third
-- less than on the texts.

-- name: lineage_customers
-- One row per customer of a check's lineage rows (`lineage_rows`: checked_usage.sql `lineage`),
-- NULL included: the bucket of each is found in Python (transforms.engine.lineage.customer_bucket).
SELECT DISTINCT customer_id
FROM lineage_rows;

-- name: bucketed_lineage
-- One row per lineage row, with the bucket of its customer (`lineage_buckets`): written a file per
-- bucket.
SELECT r.*, b.bucket
FROM lineage_rows AS r
JOIN lineage_buckets AS b
  ON b.customer_id IS NOT DISTINCT FROM r.customer_id;

-- name: row_shapes
-- One row per distinct bucket x customer x subscription x segment x meter x dims x outcome of
-- the lineage rows: the texts of billed_events that many events share. A few per customer (1M at
-- 10M events). Filled a bucket at a time (`bucket_shapes`).
CREATE OR REPLACE TEMP TABLE row_shapes (bucket INTEGER, customer_id VARCHAR, subscription_id VARCHAR,
                                         segment_no INTEGER, meter VARCHAR, dims VARCHAR, outcome VARCHAR);

-- name: source_keys
-- One row per distinct source object of a bucket's lineage rows. Filled a bucket at a time
-- (`bucket_sources`).
CREATE OR REPLACE TEMP TABLE source_keys (source_key VARCHAR);

-- name: bucket_shapes
-- The row shapes of one bucket's lineage rows.
INSERT INTO row_shapes
SELECT DISTINCT CAST($bucket AS INTEGER), customer_id, subscription_id, CAST(segment_no AS INTEGER), meter, dims,
       outcome
FROM lineage_part;

-- name: bucket_sources
-- The source objects of one bucket's lineage rows.
INSERT INTO source_keys
SELECT DISTINCT source_key
FROM lineage_part;

-- name: customers
-- One row per bucket x customer of the lineage and quarantined rows, numbered from 0 within the
-- bucket in customer_id's order (NULL last): the number the rows sort on.
CREATE OR REPLACE TEMP TABLE customers AS
SELECT bucket, customer_id,
       CAST(row_number() OVER (PARTITION BY bucket ORDER BY customer_id NULLS LAST) - 1 AS INTEGER) AS customer_no
FROM (SELECT bucket, customer_id FROM row_shapes
      UNION
      SELECT bucket, customer_id FROM set_aside_rows);

-- name: sources
-- One row per source object of the lineage and quarantined rows, numbered from 0 in source_key's
-- order (NULL last): the number the rows sort on, which the writer looks up.
CREATE OR REPLACE TEMP TABLE sources AS
SELECT source_key, CAST(row_number() OVER (ORDER BY source_key NULLS LAST) - 1 AS INTEGER) AS source_no
FROM (SELECT source_key FROM source_keys
      UNION
      SELECT source_key FROM set_aside_rows);

-- name: billed_dims
-- One row per distinct (meter, dims) of the billed rows: what line_of_dims looks at in Python.
SELECT DISTINCT meter, dims
FROM row_shapes
WHERE outcome = 'billed';

-- name: shapes
-- One row per row shape, numbered from 0 within its bucket, stored in bucket order (a bucket's
-- shapes are read without scanning the others'), with its customer's number: the columns of
-- billed_events that its events share, with the invoice line that bills a billed shape and why a
-- duplicate did not bill. A billed shape's line is the usage or overage line of its segment
-- whose charge has the meter, whose filter the dims match and whose group they fall in
-- (`keyed`); plans refuse two charges that could bill one event, so a shape has at most one
-- line. The events then join it on six keys, never on themselves.
CREATE OR REPLACE TEMP TABLE shapes AS
WITH dims_lines AS (
    SELECT b.bucket, b.customer_id, b.subscription_id, b.segment_no, b.meter, b.dims, l.invoice_id, l.line_no
    FROM row_shapes AS b
    JOIN keyed AS k
      ON k.meter = b.meter AND k.dims = b.dims
    JOIN usage_lines AS l
      ON l.subscription_id = b.subscription_id AND l.segment_no = b.segment_no AND l.meter = b.meter
     AND l.filter = k.filter AND l."group" = k."group"
    WHERE b.outcome = 'billed'
)
SELECT s.bucket,
       CAST(row_number() OVER (PARTITION BY s.bucket) - 1 AS INTEGER) AS shape,
       c.customer_no,
       s.customer_id,
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
JOIN customers AS c
  ON c.bucket = s.bucket AND c.customer_id IS NOT DISTINCT FROM s.customer_id
LEFT JOIN dims_lines AS dl
       ON s.outcome = 'billed' AND dl.bucket = s.bucket AND dl.customer_id IS NOT DISTINCT FROM s.customer_id
      AND dl.subscription_id = s.subscription_id AND dl.segment_no = s.segment_no AND dl.meter = s.meter
      AND dl.dims = s.dims
ORDER BY s.bucket;

-- name: shape_counts
-- One row per bucket with lineage rows: how many shapes it has (its quarantined rows' shapes are
-- numbered after them).
SELECT bucket, count(*) AS shapes
FROM shapes
GROUP BY bucket;

-- name: grants
-- One row per event_id a credit draw paid for, in bucket order.
CREATE OR REPLACE TEMP TABLE grants AS
SELECT bucket, event_id, grant_id
FROM grant_rows
ORDER BY bucket;

-- name: set_aside
-- One row per quarantined row, in bucket order, with its customer's and source's numbers and a
-- shape of its own (`set_aside_shapes`: its number, counted on from the last of its bucket's
-- `shapes`, by its row number).
CREATE OR REPLACE TEMP TABLE set_aside AS
SELECT r.*, n.shape, c.customer_no, o.source_no
FROM set_aside_rows AS r
JOIN set_aside_shapes AS n
  ON n.row_no = r.row_no
JOIN customers AS c
  ON c.bucket = r.bucket AND c.customer_id IS NOT DISTINCT FROM r.customer_id
JOIN sources AS o
  ON o.source_key IS NOT DISTINCT FROM r.source_key
ORDER BY r.bucket;

-- name: bucket_size
-- One row: how many lineage rows a bucket has (its files' metadata tells).
SELECT count(*)
FROM lineage_part;

-- name: shape_columns
-- One row per shape of a bucket, in its number's order (its lineage rows' shapes, then its
-- quarantined rows'): what transforms.engine.lineage.events_of looks up.
SELECT customer_id, meter, dims, status, invoice_id, line_no, subscription_id, segment_no, reason, detail
FROM (SELECT shape, customer_id, meter, dims, status, invoice_id, line_no, subscription_id, segment_no, reason,
             detail
      FROM shapes
      WHERE bucket = $bucket
      UNION ALL
      SELECT shape, customer_id, meter, dims, status, invoice_id, line_no, subscription_id, segment_no, reason,
             detail
      FROM set_aside
      WHERE bucket = $bucket)
ORDER BY shape;

-- name: source_columns
-- One row per source object, in its number's order: what transforms.engine.lineage.events_of
-- looks up.
SELECT source_key
FROM sources
ORDER BY source_no;

-- name: billed_events
-- One row per usage row of a bucket, in the output's order: the event's own columns and the
-- numbers of its customer, shape (a quarantined row's is past the bucket's lineage shapes:
-- `set_aside`) and source object. A duplicate names the copy that billed in its place
-- (`source_key#row=N`), or says that a copy billed in an earlier period.
WITH settled AS (
    SELECT s.customer_no,
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
           o.source_no,
           r.source_row
    FROM lineage_part AS r
    JOIN (SELECT * FROM shapes WHERE bucket = $bucket) AS s
      ON s.customer_id IS NOT DISTINCT FROM r.customer_id AND s.subscription_id = r.subscription_id
     AND s.segment_no = CAST(r.segment_no AS INTEGER) AND s.meter = r.meter AND s.dims = r.dims
     AND s.status = r.outcome
    JOIN sources AS o
      ON o.source_key = r.source_key
    LEFT JOIN (SELECT event_id, grant_id FROM grants WHERE bucket = $bucket) AS g
           ON g.event_id = r.event_id
)
SELECT customer_no, event_at, event_id, quantity, shape, grant_id, duplicate_of, source_no, source_row
FROM (SELECT * FROM settled
      UNION ALL BY NAME
      SELECT customer_no, event_at, event_id, quantity, shape, source_no, source_row
      FROM set_aside
      WHERE bucket = $bucket)
ORDER BY customer_no, event_at NULLS LAST, event_id NULLS LAST, source_no NULLS LAST, source_row NULLS LAST;
