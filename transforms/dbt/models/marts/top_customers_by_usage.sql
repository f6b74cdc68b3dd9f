-- One row per period x currency x customer among the 25 customers with the most usage billed in
-- that period and currency (usage and overage lines, net of corrections), with the events and
-- meters behind it. rank_in_period 1 is the largest.

with lines as (

    select * from {{ ref('stg_billrun__invoice_lines') }}

),

usage_billed as (

    select
        period,
        currency,
        customer_id,
        sum(amount_minor)::bigint as usage_minor
    from lines
    where coalesce(adjusts_kind, kind) in ('usage', 'overage', 'cap_waiver')
    group by period, currency, customer_id

),

customer_of_subscription as (

    select distinct subscription_id, period, customer_id
    from {{ ref('stg_billrun__invoices') }}
    where kind = 'invoice'

),

usage_events as (

    select
        usage.period,
        subs.customer_id,
        sum(usage.events)::bigint as events,
        count(distinct usage.meter) as meters
    from {{ source('billrun', 'usage_summary') }} as usage
    join customer_of_subscription as subs
        on usage.subscription_id = subs.subscription_id and usage.period = subs.period
    group by usage.period, subs.customer_id

),

ranked as (

    select
        usage_billed.*,
        coalesce(usage_events.events, 0) as events,
        coalesce(usage_events.meters, 0) as meters,
        rank() over (partition by usage_billed.period, usage_billed.currency
                     order by usage_billed.usage_minor desc, usage_billed.customer_id) as rank_in_period
    from usage_billed
    left join usage_events
        on usage_billed.period = usage_events.period and usage_billed.customer_id = usage_events.customer_id

)

select * from ranked
where rank_in_period <= 25
order by period, currency, rank_in_period
