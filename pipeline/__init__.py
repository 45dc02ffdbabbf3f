"""The core every llmbatch process imports.

At its top, the shared vocabulary and plumbing only: settings (``config``), the one exception
tree (``errors``), ``constants``, ``ids``, the caps' ``clock``, ``aio``, ``logs``, ``metrics``;
they import no folder. The folders (docs/ARCHITECTURE.md, "Layout and the import rule"):
``intake`` (file to batches: parsing, the producer, Kafka, the batcher), ``money`` (tokens,
bounds, pricing, the budget), ``providers`` (calls, retries, rate limits, Batch APIs) and
``stores`` (Postgres and Redis: jobs, batches, outcomes, cache, export).

It imports none of ``llmbatch``, ``workers``, ``schedules`` or ``simulator``
(tests/unit/test_layout.py): the batcher sends its Celery task by name.
The public surface is re-exported by the ``llmbatch`` package.
"""

__version__ = "0.1.0"
