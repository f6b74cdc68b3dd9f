{#
  The store's outputs: every close writes billing/period=YYYY-MM/<table>.parquet and every
  backfill billing/corrections/run=<run id>/<table>.parquet (documents and adjustments only).
#}

{% macro billrun_has_corrections(table) %}
  {#- Whether any backfill wrote `table`. While dbt parses (no database yet) the answer is yes,
      so the corrections source is always a dependency of the models that read it. -#}
  {%- if not execute -%}
    {{ return(true) }}
  {%- endif -%}
  {%- set found = run_query("select count(*) from glob('" ~ var('store') ~ "/billing/corrections/run=*/" ~ table ~ ".parquet')") -%}
  {{ return(found.columns[0].values()[0] > 0) }}
{% endmacro %}


{% macro billrun_with_corrections(table) %}
  {#- One relation of `table`: the closes' rows (run_kind 'close') and, when there are any, the
      backfills' rows (run_kind 'backfill'), by column name: a correction file may lack columns
      of the close's, which read null. -#}
  select *, 'close' as run_kind from {{ source('billrun', table) }}
  {%- if billrun_has_corrections(table) %}
  union all by name
  select * exclude (run), 'backfill' as run_kind, run as correction_run_id
  from {{ source('billrun_corrections', table) }}
  {%- endif %}
{% endmacro %}
