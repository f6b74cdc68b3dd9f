-- One row per period x currency: invoiced at the close, credited and debited by backfills since,
-- and the net the customers owe for the period. Amounts in minor units of `currency`.

with documents as (

    select * from {{ ref('stg_billrun__invoices') }}

)

select
    period,
    currency,
    coalesce(sum(total_minor) filter (where kind = 'invoice'), 0)::bigint as invoiced_minor,
    coalesce(sum(total_minor) filter (where kind = 'credit_note'), 0)::bigint as credited_minor,
    coalesce(sum(total_minor) filter (where kind = 'debit_note'), 0)::bigint as debited_minor,
    sum(total_minor)::bigint as net_billed_minor,
    count(*) filter (where kind = 'invoice') as invoices,
    count(*) filter (where kind <> 'invoice') as corrections
from documents
group by period, currency
order by period, currency
