"""The core every llmbatch process imports: settings, errors, formats, tiers,
tokens, pricing, the stores (Postgres, Kafka, Redis: cache, budget, rate
limits), providers, the producer and the batcher.

It imports none of ``llmbatch``, ``workers``, ``schedules`` or ``simulator``
(tests/unit/test_layout.py): the batcher sends its Celery task by name.
The public surface is re-exported by the ``llmbatch`` package.
"""

__version__ = "0.1.0"
