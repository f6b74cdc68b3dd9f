-- A close issues one invoice per subscription and period (corrections are notes, never invoices).
select subscription_id, period, count(*) as invoices
from {{ ref('stg_billrun__invoices') }}
where kind = 'invoice'
group by subscription_id, period
having count(*) <> 1
