-- The billed-event index: which event_ids the finalized documents of closed periods bill.
-- One row per (period, event_id, document run) with `change` +1 (the run's document bills the
-- event in that period) or -1 (a correction of that period reverses it); an event is billed in a
-- period while its changes there add up to more than 0. Files are sorted by id_hash, so a lookup
-- by hash reads few row groups.
--
-- A lookup happens in two steps, so that the index is read as 8-byte hashes only: the hashes of
-- the event_ids looked up are matched against the index's `id_hash` column (`index_hits`), then
-- the event_ids are compared exactly in the rows of the matching hashes alone (`billed_elsewhere`).
-- A hash never decides alone that an event was billed.

-- name: id_hash_macro
-- An event_id's hash: the first 64 bits of its MD5 (a standard digest, the same as the nightly
-- index's, so an index written by one version of billrun or DuckDB reads the same in the next),
-- read big-endian: the number the first 16 hex digits of the digest spell. DuckDB's md5_number
-- reads the 16 bytes little-endian, so its low 64 bits are those 8 bytes in reverse order; they
-- are put back in order with shifts, which costs about a third of formatting the digest in hex
-- and parsing 16 digits of it back (0.17 against 0.27 CPU s per million event_ids).
CREATE OR REPLACE TEMP MACRO id_hash(event_id) AS
    byte_reversed(CAST(md5_number(event_id) & 18446744073709551615 AS UBIGINT));

-- name: byte_reversed_macro
-- A UBIGINT with its 8 bytes in reverse order (the lowest byte becomes the highest).
CREATE OR REPLACE TEMP MACRO byte_reversed(x) AS
    ((x & 255) << 56) | ((x & 65280) << 40) | ((x & 16711680) << 24) | ((x & 4278190080) << 8)
    | ((x >> 8) & 4278190080) | ((x >> 24) & 16711680) | ((x >> 40) & 65280) | (x >> 56);

-- name: index_hits
-- One row per hash, among the index's, of an event_id looked up (`probed`: event_id, id_hash).
-- Only the id_hash column of the index files is read.
SELECT DISTINCT i.id_hash
FROM read_parquet($files) AS i
WHERE i.id_hash IN (SELECT id_hash FROM probed)
ORDER BY 1;

-- name: billed_elsewhere
-- One row per event_id looked up that a counted period's documents bill (changes adding up to
-- more than 0), with that period and the run that billed it last. `index_runs` names each file's
-- run; only periods in $periods count (for a backfill, not the periods it re-rates itself).
CREATE OR REPLACE TEMP TABLE billed_elsewhere AS
WITH candidate_rows AS (
    SELECT i.period, i.event_id, i.change, r.run_id
    FROM read_parquet($files, filename = true) AS i
    JOIN index_runs AS r ON r.file = i.filename
    WHERE i.id_hash IN (SELECT unnest($hits::UBIGINT[]))
      AND i.period IN (SELECT unnest($periods::VARCHAR[]))
),
exact AS (
    SELECT c.*
    FROM candidate_rows AS c
    JOIN probed AS p ON p.event_id = c.event_id
),
net AS (
    SELECT period, event_id, sum(change) AS net, max(run_id) FILTER (WHERE change > 0) AS run_id
    FROM exact
    GROUP BY ALL
)
SELECT event_id, arg_min(period, period) AS period, arg_min(run_id, period) AS run_id
FROM net
WHERE net > 0
GROUP BY event_id;

-- name: index_of_billed
-- The index file of one period's billed events (`billed`: event_id, id_hash), each +1, sorted by
-- hash then event_id, so the bytes depend only on the events.
SELECT CAST($period AS VARCHAR) AS period, event_id, id_hash, CAST(1 AS TINYINT) AS change
FROM billed
ORDER BY id_hash, event_id;

-- name: effective_in_period
-- One row per event_id that the documents of period $period bill now (before this run).
SELECT i.event_id, any_value(i.id_hash) AS id_hash
FROM read_parquet($files) AS i
WHERE i.period = $period
GROUP BY i.event_id
HAVING sum(i.change) > 0;

-- name: index_of_changes
-- The index file of a correction of one period: -1 for each event its documents billed and the
-- re-rating no longer bills, +1 for each it bills now and did not (`before` and `after`: event_id,
-- id_hash), sorted by hash then event_id.
SELECT CAST($period AS VARCHAR) AS period, event_id, id_hash, CAST(change AS TINYINT) AS change
FROM (SELECT event_id, id_hash, -1 AS change FROM before
      WHERE event_id NOT IN (SELECT event_id FROM after)
      UNION ALL
      SELECT event_id, id_hash, 1 FROM after
      WHERE event_id NOT IN (SELECT event_id FROM before))
ORDER BY id_hash, event_id;
