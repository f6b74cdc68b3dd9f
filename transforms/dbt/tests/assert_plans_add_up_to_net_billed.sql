-- The plan breakdown loses nothing: per period and currency it adds up to the net billed.
with by_plan as (
    select period, currency, sum(billed_minor) as billed_minor
    from {{ ref('recurring_and_usage_revenue_by_plan') }}
    group by period, currency
)
select net.period, net.currency, net.net_billed_minor, by_plan.billed_minor
from {{ ref('net_billed_by_period') }} as net
full join by_plan using (period, currency)
where net.net_billed_minor is distinct from by_plan.billed_minor
