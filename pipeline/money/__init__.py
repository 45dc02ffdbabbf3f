"""Money: what a request may cost and what it did cost, and the caps that hold spend.

``tokens`` (offline token counts), ``bounds`` (a request's maximum), ``pricing`` (the price
book and costs), ``calls`` (calls that may have been billed); the budget: ``units`` (money as
integers), ``caps`` (scopes, periods, caps in force), ``scripts`` (Redis keys and Lua),
``ledger`` (rebuild and reconcile from Postgres), ``budget`` (a worker's reservations),
``holds`` (the scheduler's synchronous holds), ``waits`` (why a reservation waits),
``deferral`` and ``admin`` (``budget set``, ``show``, alerts). Names are imported from their
modules; this package re-exports nothing.
"""
