"""Pure billing logic: schemas, usage checks, rating, invoices, rendering.

Nothing in this package touches Prefect, object storage, the environment or the clock:
every function is a function of its arguments, which is what makes reruns exact.
"""
