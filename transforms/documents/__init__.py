"""Customer documents: HTML invoices and notes (`render`, `../templates/`), draft invoices, and
payment terms."""
