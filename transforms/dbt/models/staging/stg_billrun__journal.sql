-- One row per journal entry line of a close or a backfill.
-- run_kind says which wrote it (close | backfill); correction_run_id names the backfill.
{{ billrun_with_corrections('journal') }}
