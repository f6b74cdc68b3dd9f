"""The period engine: usage checked in DuckDB (`checked_usage`, `../sql/`), the period to date a
night keeps, the one rating path (`rating.rated_invoices`), invoice lines, and lineage from line to
event with the billed-event index."""
