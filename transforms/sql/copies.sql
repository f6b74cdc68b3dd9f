-- Which copy of an event_id counts: the close's rule, stated here once. Every usage check ranks
-- copies by it, whatever brought them together: the close and its shards (checked_usage.sql
-- `settled`, `credit_history`) and the nights, which rank tonight's copies against those of
-- earlier nights (nightly.sql `delta`, `first_copies`).
-- Grain: one sort key per copy of an event_id; among an event_id's copies the smallest counts.
-- (`cross_shard` and `moving_shards` say which copies a close gathers into one shard to be ranked.)

-- name: copy_order_macro
-- A copy's sort key: the earliest event time first, then content (customer, meter, quantity,
-- dimensions), then the object it came from, then its row there, so which copy counts never
-- depends on the order objects were listed, read, or taken in night by night.
CREATE OR REPLACE TEMP MACRO copy_order(event_at, customer_id, meter, quantity, dims, source_key, source_row) AS
    row(event_at, customer_id, meter, quantity, dims, source_key, source_row);

-- name: cross_shard
-- One row per 64-bit event_id hash whose rows are in more than one shard (`hashes`: one row per
-- normalized row with an event_id, its hash and its shard, a hash of its customer_id), with the
-- shard that gathers them: the lowest. Shards follow customers, so only copies of an event under
-- different customers (or hashes that collide) are here: few, or none. A hash only gathers rows
-- into one shard, where copies are told apart by event_id itself.
SELECT event_hash, min(shard) AS target
FROM hashes
GROUP BY event_hash
HAVING min(shard) <> max(shard)
ORDER BY ALL;

-- name: moving_shards
-- One row per shard holding rows that `cross_shard` gathers into another shard.
SELECT DISTINCT h.shard
FROM hashes AS h
JOIN cross_shard AS c ON c.event_hash = h.event_hash
WHERE h.shard <> c.target
ORDER BY ALL;
