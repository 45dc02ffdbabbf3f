"""The one exception tree of llmbatch.

::

    LLMBatchError
    ├── ConfigError                  bad or missing setting
    ├── InputError                   a submitted line or file is unusable
    │   ├── LineError                one line: carries ``line`` and ``reason``
    │   │   └── UnknownModelError    model not in the price book
    │   └── FileInputError           the file itself (missing, empty, unreadable)
    ├── ProviderError                a provider call did not give an answer
    │   ├── RetryableProviderError   429, 408, 409, 5xx, 529, timeouts, connection
    │   └── PermanentProviderError   400, 401, 403, 404, 422: never retried
    ├── BudgetError                  a cap refused a reservation
    └── InfrastructureError          Kafka, Postgres or Redis unusable

Retries are outcomes, not failures: a ``RetryableProviderError`` carries the
delay the provider asked for and is logged as a scheduled retry.
"""

from __future__ import annotations


class LLMBatchError(Exception):
    """Root of every error llmbatch raises on purpose."""


class ConfigError(LLMBatchError):
    pass


class InputError(LLMBatchError):
    pass


class LineError(InputError):
    """A line of a submitted file was rejected; the rest of the job goes on."""

    def __init__(self, reason: str, line: int | None = None, custom_id: str | None = None):
        self.reason = reason
        self.line = line
        self.custom_id = custom_id
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{reason}")


class UnknownModelError(LineError):
    pass


class FileInputError(InputError):
    pass


class ProviderError(LLMBatchError):
    def __init__(self, message: str, status_code: int | None = None, request_id: str | None = None):
        self.status_code = status_code
        self.request_id = request_id
        super().__init__(message)


class RetryableProviderError(ProviderError):
    def __init__(self, message: str, status_code: int | None = None,
                 request_id: str | None = None, retry_after: float | None = None):
        super().__init__(message, status_code, request_id)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    pass


class BudgetError(LLMBatchError):
    pass


class InfrastructureError(LLMBatchError):
    pass
