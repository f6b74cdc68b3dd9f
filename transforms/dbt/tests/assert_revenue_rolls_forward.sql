-- Every revenue row: opening + billed - recognized - breakage = closing.
select *
from {{ ref('stg_billrun__revenue') }}
where opening_deferred_minor + billed_minor - recognized_minor - breakage_minor <> closing_deferred_minor
