"""Intake: from a submitted file to dispatched batches.

Reading and parsing lines (``lines``, ``formats``), tiers and the off-peak window
(``tiers``, ``windows``), the Kafka messages and clients (``messages``, ``kafka``,
``kafka_admin``), the producer behind ``submit``, the batcher, and the dispatch of a
batch to its Celery queue by task name (``dispatch``). Names are imported from their
modules; this package re-exports nothing.
"""
