"""llmbatch: tiered, budgeted batch processing of LLM requests.

Public surface: ``Settings``/``get_settings`` (configuration), ``publish_request``
(the producer API for services) and the exception tree in ``pipeline.errors``.
Everything else is internal and may change.
"""

__version__ = "0.1.0"
