-- One row per document line: the closes' invoice lines and the backfills' adjustment lines.
-- run_kind says which wrote it (close | backfill); correction_run_id names the backfill.
{{ billrun_with_corrections('invoice_lines') }}
