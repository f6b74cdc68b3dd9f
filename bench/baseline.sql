-- The floor a close is measured against: what bare DuckDB needs to bill the same usage files.
-- Grain of the result: one row per customer x meter, with its billed units and one graduated
-- price applied to them (10.00 per million units up to 10,000,000 units, 8.00 per million above),
-- in exact DECIMAL arithmetic, rounded half away from zero to the cent once per row.
-- Parameters: $files (glob of the usage Parquet), $period_start, $period_end (UTC instants,
-- half-open), $out (Parquet file to write).
COPY (
    WITH events AS (
        -- import: the period's rows, quantity parsed exactly (a decimal string or an integer)
        SELECT event_id,
               customer_id,
               meter,
               TRY_CAST(quantity AS DECIMAL(38, 9)) AS quantity,
               "timestamp" AS event_at
        FROM read_parquet($files, hive_partitioning = false)
        WHERE "timestamp" >= $period_start AND "timestamp" < $period_end
    ),
    unique_events AS (
        -- one row per event_id: the earliest copy (a hash aggregate, not a sort)
        SELECT event_id,
               arg_min({'customer_id': customer_id, 'meter': meter, 'quantity': quantity}, event_at) AS e
        FROM events
        GROUP BY event_id
    ),
    usage AS (
        -- one row per customer x meter
        SELECT e.customer_id, e.meter, sum(e.quantity) AS units, count(*) AS events
        FROM unique_events
        GROUP BY ALL
    ),
    rated AS (
        -- graduated: each tier prices the units that fall in it; per-unit prices are exact decimals
        -- (10.00 / 1,000,000 = 0.00001000), because DECIMAL / DECIMAL is a DOUBLE in DuckDB
        SELECT customer_id, meter, units, events,
               LEAST(units, 10000000) * CAST('0.00001000' AS DECIMAL(18, 8))
               + GREATEST(units - 10000000, 0) * CAST('0.00000800' AS DECIMAL(18, 8)) AS amount
        FROM usage
    )
    SELECT customer_id, meter, units, events, amount,
           CAST(ROUND(amount, 2) * 100 AS BIGINT) AS amount_minor
    FROM rated
    ORDER BY customer_id, meter
) TO $out (FORMAT parquet, COMPRESSION zstd);
