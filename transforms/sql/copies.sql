-- Which copy of an event_id counts: the close's rule, stated here once. Every usage check ranks
-- copies by it, whatever brought them together: the close and its shards (checked_usage.sql
-- `settled`, `credit_history`) and the nights, which rank tonight's copies against those of
-- earlier nights (nightly.sql `delta`, `first_copies`).
-- Grain: one sort key per copy of an event_id; among an event_id's copies the smallest counts.

-- name: copy_order_macro
-- A copy's sort key: the earliest event time first, then content (customer, meter, quantity,
-- dimensions), then the object it came from, then its row there, so which copy counts never
-- depends on the order objects were listed, read, or taken in night by night.
CREATE OR REPLACE TEMP MACRO copy_order(event_at, customer_id, meter, quantity, dims, source_key, source_row) AS
    row(event_at, customer_id, meter, quantity, dims, source_key, source_row);
