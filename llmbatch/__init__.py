"""llmbatch: run LLM requests in bulk, cheaply and safely.

The front door. Its public surface is what this module exports:

- ``publish_request``: hand one request to the pipeline from a service
  (validated and priced like ``llmbatch submit``; returns once Kafka has it);
- ``Settings`` / ``get_settings``: the one settings object;
- ``LLMBatchError`` and its subtree (``LineError``, ``BudgetError``, …): the
  one exception tree, drawn in ``pipeline.errors``.

The command line lives in ``llmbatch.cli``. Everything under ``pipeline``,
``workers``, ``schedules`` and ``simulator`` is internal and may change.
"""

from pipeline.config import Settings, get_settings
from pipeline.errors import (BudgetError, ConfigError, InfrastructureError, InputError, LineError,
                             LLMBatchError, ProviderError)
from pipeline.intake.producer import publish_request

__version__ = "0.1.0"

__all__ = ["publish_request", "Settings", "get_settings", "LLMBatchError", "ConfigError", "InputError",
           "LineError", "ProviderError", "BudgetError", "InfrastructureError", "__version__"]
