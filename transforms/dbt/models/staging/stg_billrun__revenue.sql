-- One row per customer x stream x period (close rows) or x corrected period (backfill adjustments, booked in `period`).
-- run_kind says which wrote it (close | backfill); correction_run_id names the backfill.
{{ billrun_with_corrections('revenue') }}
