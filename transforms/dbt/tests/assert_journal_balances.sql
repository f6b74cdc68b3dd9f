-- The journal balances: debits equal credits per period, currency, customer and stream.
select period, currency, customer_id, stream, sum(debit_minor) as debit_minor, sum(credit_minor) as credit_minor
from {{ ref('stg_billrun__journal') }}
group by period, currency, customer_id, stream
having sum(debit_minor) <> sum(credit_minor)
