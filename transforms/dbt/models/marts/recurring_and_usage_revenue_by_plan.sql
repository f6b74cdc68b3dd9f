-- One row per period x plan x currency: what was billed for the plan's recurring fees and its
-- usage, net of every credit and debit note issued for the period since (corrections count in the
-- period they correct). Amounts in minor units of `currency`.

with lines as (

    select * from {{ ref('stg_billrun__invoice_lines') }}

),

plan_of_subscription as (

    -- a correction's lines carry no plan: it is the plan its subscription was billed on that period
    select subscription_id, period, min(plan) as plan
    from lines
    where run_kind = 'close' and plan is not null
    group by subscription_id, period

),

classified as (

    select
        lines.period,
        coalesce(lines.plan, plan_of_subscription.plan, '(no plan)') as plan,
        lines.currency,
        case
            when coalesce(lines.adjusts_kind, lines.kind) = 'fixed_fee' then 'recurring'
            when coalesce(lines.adjusts_kind, lines.kind) in ('usage', 'overage', 'cap_waiver') then 'usage'
            else 'other'
        end as revenue_type,
        lines.amount_minor
    from lines
    left join plan_of_subscription
        on lines.subscription_id = plan_of_subscription.subscription_id
        and lines.period = plan_of_subscription.period

),

final as (

    select
        period,
        plan,
        currency,
        sum(amount_minor) filter (where revenue_type = 'recurring')::bigint as recurring_minor,
        sum(amount_minor) filter (where revenue_type = 'usage')::bigint as usage_minor,
        sum(amount_minor) filter (where revenue_type = 'other')::bigint as other_minor,
        sum(amount_minor)::bigint as billed_minor
    from classified
    group by period, plan, currency

)

select
    period,
    plan,
    currency,
    coalesce(recurring_minor, 0) as recurring_minor,
    coalesce(usage_minor, 0) as usage_minor,
    coalesce(other_minor, 0) as other_minor,
    billed_minor
from final
order by period, plan, currency
