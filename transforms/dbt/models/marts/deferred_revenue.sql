-- One row per period x currency x stream: the deferred revenue balance rolled forward over all
-- customers. Close rows count in their period; a backfill's adjustments in the period they were
-- booked (`period`; the period they correct is `corrected_period` in the staging model).

with revenue as (

    select * from {{ ref('stg_billrun__revenue') }}

)

select
    period,
    currency,
    stream,
    sum(opening_deferred_minor)::bigint as opening_deferred_minor,
    sum(billed_minor)::bigint as billed_minor,
    sum(recognized_minor)::bigint as recognized_minor,
    sum(breakage_minor)::bigint as breakage_minor,
    sum(closing_deferred_minor)::bigint as closing_deferred_minor,
    count(distinct customer_id) as customers
from revenue
group by period, currency, stream
order by period, currency, stream
