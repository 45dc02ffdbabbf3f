"""Stores: what the pipeline keeps, in Postgres and Redis.

``db`` (the engine, transactions, retries, migrations), ``jobs`` (job rows, and the job
operations ``cancel_job`` and ``set_batch_fallback``), ``batches`` (admitting requests,
batches, leases, claims), ``outcomes`` (results and attempts), ``alerts`` (a provider key out
of the rotation), ``cache`` (the response cache in Redis) and ``export`` (results in the
provider's output shape). Names are imported from
their modules; this package re-exports nothing.
"""
