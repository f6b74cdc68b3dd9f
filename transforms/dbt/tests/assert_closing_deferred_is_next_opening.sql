-- One period's closing deferred revenue is the next closed period's opening, per customer,
-- stream and currency (close rows; a later backfill's adjustments are booked separately).
with closes as (
    select * from {{ ref('stg_billrun__revenue') }} where run_kind = 'close'
),
closed_periods as (
    select distinct period from closes
),
expected as (
    select
        closes.customer_id, closes.stream, closes.currency,
        strftime(strptime(closes.period || '-01', '%Y-%m-%d') + interval 1 month, '%Y-%m') as next_period,
        closes.closing_deferred_minor
    from closes
)
select expected.*, coalesce(next.opening_deferred_minor, 0) as next_opening_minor
from expected
join closed_periods on closed_periods.period = expected.next_period
left join closes as next
    on next.period = expected.next_period and next.customer_id = expected.customer_id
    and next.stream = expected.stream and next.currency = expected.currency
where coalesce(next.opening_deferred_minor, 0) <> expected.closing_deferred_minor
