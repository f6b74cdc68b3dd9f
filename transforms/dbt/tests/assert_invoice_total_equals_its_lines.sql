-- An invoice's (or note's) total is the sum of its lines: returns the documents where it is not.
with lines as (
    select invoice_id, sum(amount_minor) as lines_minor, count(*) as line_count
    from {{ ref('stg_billrun__invoice_lines') }}
    group by invoice_id
)
select documents.invoice_id, documents.total_minor, coalesce(lines.lines_minor, 0) as lines_minor
from {{ ref('stg_billrun__invoices') }} as documents
left join lines using (invoice_id)
where documents.total_minor <> coalesce(lines.lines_minor, 0)
