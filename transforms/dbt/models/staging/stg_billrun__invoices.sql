-- One row per document: every close's invoices and every backfill's credit and debit notes.
-- run_kind says which wrote it (close | backfill); correction_run_id names the backfill.
{{ billrun_with_corrections('invoices') }}
