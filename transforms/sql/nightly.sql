-- Nightly intake on top of settle_usage.sql's `settled` table (tonight's objects only).
-- `earlier`: accepted events of objects taken in on earlier nights; `to_date`: every accepted
-- event of the period so far; `segments`, `per_event_meters` as in the close.

-- name: accepted_tonight
-- One row per event of tonight's objects that bills among tonight's rows, flagged `is_new` when
-- no object taken in on an earlier night holds it (first seen wins). All of them are kept as
-- their object's state: if the first copy's object is later rewritten without it, this copy
-- becomes the first.
SELECT event_id, customer_id, meter, dims, quantity, event_at, source_key, CAST($night AS DATE) AS night,
       event_id NOT IN (SELECT event_id FROM earlier) AS is_new
FROM settled
WHERE outcome = 'billed'
ORDER BY source_key, source_row;

-- name: first_copies
-- The period so far: one row per event_id, its first copy by the night it was taken in.
CREATE OR REPLACE TEMP VIEW to_date AS
SELECT * EXCLUDE (copy_no)
FROM (SELECT *, row_number() OVER (PARTITION BY event_id
                                            -- state from before nights were recorded comes first
                                            ORDER BY COALESCE(night, DATE '0001-01-01'), source_key, event_at) AS copy_no
      FROM all_accepted)
WHERE copy_no = 1;

-- name: to_date_by_day
-- One row per subscription segment x meter x dimensions x UTC day: units so far this period.
SELECT seg.subscription_id, seg.segment_no, t.meter, t.dims, CAST(t.event_at AS DATE) AS day,
       sum(t.quantity) AS units, count(*) AS events
FROM to_date AS t
JOIN segments AS seg
  ON seg.customer_id = t.customer_id AND t.event_at >= seg.start_at AND t.event_at < seg.end_at
GROUP BY ALL
ORDER BY ALL;

-- name: to_date_per_event
-- One row per event so far of a meter priced or paid event by event, in event-time order.
SELECT seg.subscription_id, seg.segment_no, t.meter, t.dims, t.quantity, t.customer_id, t.event_id, t.event_at
FROM to_date AS t
JOIN segments AS seg
  ON seg.customer_id = t.customer_id AND t.event_at >= seg.start_at AND t.event_at < seg.end_at
WHERE t.meter IN (SELECT meter FROM per_event_meters)
ORDER BY seg.subscription_id, seg.segment_no, t.meter, t.event_at, t.event_id;
