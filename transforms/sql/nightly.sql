-- A night's period to date, moved from the last night's by tonight's checked usage. Tonight's
-- objects are settled by the period engine as the close settles its period (flows/engine.py:
-- scope, checks, duplicates among themselves, the billed-event index); what it bills tonight
-- (`billed_tonight`: its lineage rows with outcome 'billed') is then ranked against the copies
-- earlier nights took in, by the close's rule (copies.sql `copy_order`: the earliest event time,
-- then content, then the object key, whatever night brought the copy), so a night that learns
-- of an earlier copy moves the period to date to it.
-- A night costs its new data: it never windows over the period so far. The state keeps, per
-- object taken in, its accepted events (full rows) and their event_ids (a compact index), and
-- for the period to date two small tables: units per customer x meter x dims x UTC day, and the
-- events of meters handled event by event.
-- Tonight only the event_ids of tonight's objects and of the objects they replace can change
-- their first copy, so only those are looked up (a semi-join against the index), and the
-- period-to-date tables move by the difference.
--
-- Inputs: `billed_tonight`; `kept_hashes` (id_hash, source_key of every event_id kept from
-- earlier nights: the index, read for its hash column only); `gone` (accepted events of objects
-- rewritten or removed since, as they were taken in); `kept_rows` (the full rows, as taken in,
-- of the kept copies `kept_copies` finds); `per_event_meters` as in the close. Macros: `id_hash`
-- (billed_index.sql: the index's hash of an event_id), `copy_order` (copies.sql). The
-- period-to-date tables are moved by `delta_*` in flows/nightly.py (Polars).
--
-- The index is checked in two steps, so that a night reads the month's event_ids only as 8-byte
-- hashes: tonight's ids are matched on `id_hash` (which objects may hold one of them), then
-- exactly, on event_id, in those objects alone (`kept_ids`: every kept copy of tonight's and the
-- gone objects' event_ids, and only those). A hash never decides alone that an event is a copy.
-- Accepted rows carry no source_row: an object's own copies of an event_id were settled before
-- it was taken in, so two copies of one object never compete, and the object key decides last.

-- name: event_ranges
-- One row per object read tonight: its first and last event time, and whether a row has none
-- (for the store-wide usage index). Input: `read_tonight`, the normalized rows as read.
SELECT source_key, min(event_at) AS first_at, max(event_at) AS last_at, bool_or(event_at IS NULL) AS undated
FROM read_tonight
GROUP BY ALL;

-- name: billed_tonight
-- One row per event tonight's checked usage bills (the engine's lineage rows: `tonight_lineage`).
CREATE OR REPLACE TEMP VIEW billed_tonight AS
SELECT * FROM tonight_lineage WHERE outcome = 'billed';

-- name: accepted_tonight
-- One row per event of tonight's objects that bills among tonight's rows, with its index hash.
-- All of them are kept as their object's state: if the first copy's object is later rewritten
-- without it, this copy becomes the first.
CREATE OR REPLACE TEMP TABLE tonight AS
SELECT event_id, customer_id, meter, dims, quantity, event_at, source_key, CAST($night AS DATE) AS night,
       id_hash(event_id) AS id_hash
FROM billed_tonight
ORDER BY source_key, source_row;

-- name: probe_ids
-- One row per event_id whose first copy tonight may decide or move: tonight's accepted rows
-- (`tonight`, hashed once there) and the rows of gone objects.
CREATE OR REPLACE TEMP TABLE probe AS
SELECT event_id, id_hash FROM tonight
UNION
SELECT event_id, id_hash(event_id) FROM gone;

-- name: objects_to_check
-- One row per kept object whose index holds the hash of a probed event_id (a true copy, or,
-- rarely, another id with the same hash: the exact check below tells them apart).
SELECT DISTINCT source_key
FROM kept_hashes
WHERE id_hash IN (SELECT id_hash FROM probe)
ORDER BY source_key;

-- name: kept_copies
-- One row per kept copy of a probed event_id, read from the objects found above only.
CREATE OR REPLACE TEMP TABLE kept_ids AS
SELECT event_id, source_key, night
FROM kept_candidates
WHERE event_id IN (SELECT event_id FROM probe);

-- name: new_tonight
-- One row: how many of tonight's accepted events no object kept from an earlier night holds.
SELECT count(*) FROM tonight WHERE event_id NOT IN (SELECT event_id FROM kept_ids);

-- name: kept_rows_needed
-- One row per (object kept from an earlier night, event_id) whose full row tonight's ranking
-- needs: every kept copy of an event_id that tonight's or the gone objects hold (few: the
-- copies a client resent, and the events of rewritten objects).
SELECT DISTINCT source_key, event_id FROM kept_ids ORDER BY ALL;

-- name: delta
-- One row per event entering (+1) or leaving (-1) the period to date tonight: for each event_id
-- of tonight's and of gone objects, the copy that counted until now (among kept and gone
-- objects) and the one that counts from tonight (among kept objects and tonight's), each the
-- first by the close's rule (`copy_order`), when they are not the same copy. An id-only pass
-- first finds the event_ids with two copies or more (the copies a client resent, the events of
-- rewritten objects: few); only those are ranked. Any other copy is its event_id's only one:
-- tonight's enters, a gone one leaves. `kept_rows` holds kept copies of these event_ids only
-- (`kept_rows_needed`).
CREATE OR REPLACE TEMP TABLE delta AS
WITH copies AS (
    SELECT event_id, customer_id, meter, dims, quantity, event_at, source_key, 'kept' AS side FROM kept_rows
    UNION ALL
    SELECT event_id, customer_id, meter, dims, quantity, event_at, source_key, 'gone' FROM gone
    UNION ALL
    SELECT event_id, customer_id, meter, dims, quantity, event_at, source_key, 'tonight' FROM tonight
),
contested AS (
    SELECT event_id FROM copies GROUP BY event_id HAVING count(*) > 1
),
rivals AS (
    SELECT * FROM copies WHERE event_id IN (SELECT event_id FROM contested)
),
before_copy AS (
    SELECT *
    FROM rivals
    WHERE side <> 'tonight'
    QUALIFY row_number() OVER (PARTITION BY event_id
                               ORDER BY copy_order(event_at, customer_id, meter, quantity, dims, source_key, NULL)) = 1
),
after_copy AS (
    SELECT *
    FROM rivals
    WHERE side <> 'gone'
    QUALIFY row_number() OVER (PARTITION BY event_id
                               ORDER BY copy_order(event_at, customer_id, meter, quantity, dims, source_key, NULL)) = 1
)
SELECT -1 AS sign, event_id, customer_id, meter, dims, quantity, event_at
FROM before_copy AS b
WHERE NOT EXISTS (SELECT 1 FROM after_copy AS a
                  WHERE a.event_id = b.event_id AND a.side = b.side AND a.source_key = b.source_key)
UNION ALL
SELECT 1, event_id, customer_id, meter, dims, quantity, event_at
FROM after_copy AS a
WHERE NOT EXISTS (SELECT 1 FROM before_copy AS b
                  WHERE b.event_id = a.event_id AND b.side = a.side AND b.source_key = a.source_key)
UNION ALL
SELECT CASE side WHEN 'tonight' THEN 1 ELSE -1 END, event_id, customer_id, meter, dims, quantity, event_at
FROM copies
WHERE side <> 'kept' AND event_id NOT IN (SELECT event_id FROM contested);

-- name: delta_by_day
-- One row per customer x meter x dimensions x UTC day that tonight's delta touches: the units and
-- events it adds (negative: takes back). The period-to-date table moves by these rows only; the
-- groups it does not touch are carried as they are (flows/nightly.py `_moved_by_day`).
SELECT customer_id, meter, dims, CAST(event_at AS DATE) AS day, sum(sign * quantity) AS units,
       CAST(sum(sign) AS BIGINT) AS events
FROM delta
GROUP BY ALL;

-- name: delta_leaving_ids
-- One row per event_id whose row in the per-event table leaves or is replaced tonight: only an
-- event that counted until now is in the table, and each such move takes its old copy out (-1).
SELECT DISTINCT event_id FROM delta WHERE sign = -1;

-- name: delta_entering_events
-- One row per event of a meter handled event by event that enters the period to date tonight.
SELECT customer_id, meter, dims, quantity, event_id, event_at
FROM delta
WHERE sign = 1 AND meter IN (SELECT meter FROM per_event_meters);

-- name: rebuilt_kept_ids
-- One row per copy kept from earlier nights, when the period is rebuilt (`kept_rows_all`: every
-- kept object's accepted rows): the kept copies tonight's rows are checked against.
CREATE OR REPLACE TEMP VIEW kept_ids AS
SELECT DISTINCT event_id, source_key, night FROM kept_rows_all;

-- name: all_accepted
-- One row per accepted copy of the period so far, kept or tonight's (when rebuilding).
CREATE OR REPLACE TEMP VIEW all_accepted AS
SELECT * FROM kept_rows_all
UNION ALL
SELECT * EXCLUDE (id_hash) FROM tonight;

-- name: first_copies
-- The period so far from every accepted row, one row per event_id (its copy that counts, by the
-- close's rule, `copy_order`): how a period's tables are built when there is no state to move
-- from (its first night, a new state format, or plans that changed which meters are handled
-- event by event).
CREATE OR REPLACE TEMP TABLE to_date AS
SELECT * EXCLUDE (copy_no)
FROM (SELECT *, row_number() OVER (PARTITION BY event_id
                                   ORDER BY copy_order(event_at, customer_id, meter, quantity, dims, source_key,
                                                       NULL)) AS copy_no
      FROM all_accepted)
WHERE copy_no = 1;

-- name: rebuilt_by_day
-- One row per customer x meter x dimensions x UTC day of the period so far, from `to_date`, in
-- the order a night keeps it (period_to_date.py BY_DAY_ORDER: the day first).
SELECT customer_id, meter, dims, CAST(event_at AS DATE) AS day, sum(quantity) AS units,
       CAST(count(*) AS BIGINT) AS events
FROM to_date
GROUP BY ALL
ORDER BY day, customer_id, meter, dims;

-- name: rebuilt_events
-- One row per event of the period so far of a meter handled event by event, from `to_date`, in
-- the order a night keeps it (period_to_date.py EVENT_ORDER: the event time first).
SELECT customer_id, meter, dims, quantity, event_id, event_at
FROM to_date
WHERE meter IN (SELECT meter FROM per_event_meters)
ORDER BY event_at, event_id, customer_id, meter;

-- name: rebuilt_kept_index
-- One row per kept copy with its index hash: the event_id index of each kept object, written
-- afresh when the period is rebuilt.
SELECT *, id_hash(event_id) AS id_hash FROM kept_rows_all;

-- name: delta_days
-- One row per UTC day tonight's delta moves an event on or off: the days whose files of the
-- period-to-date tables a night writes again (flows/nightly.py `_day_files`).
SELECT DISTINCT CAST(event_at AS DATE) AS day FROM delta ORDER BY day;

-- name: changed_from
-- One row per customer whose usage moved tonight: the first UTC day it moved on (spend and
-- wallets resume from before it).
SELECT customer_id, min(CAST(event_at AS DATE)) AS day FROM delta GROUP BY ALL;
