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
    ├── BudgetError                  the caps (pipeline/money/) refused or could not say
    │   ├── BudgetExceeded           a cap cannot take this request's maximum now: deferred
    │   │   ├── BudgetNeverFits      the maximum is above the cap itself: fails at once
    │   │   └── BudgetWaitedOut      waited ``budget_wait_max_s`` on other live holds: deferred
    │   ├── InvalidAmount            no amount to reserve: that request fails
    │   └── BudgetUnavailable        the budget store (Redis) unreachable: no call (also infrastructure)
    │       └── BudgetScriptError    Redis answered, a budget script refused its arguments: a bug
    └── InfrastructureError          Kafka, Postgres or Redis unusable

Retries are outcomes, not failures: a ``RetryableProviderError`` carries the
delay the provider asked for and is logged as a scheduled retry.
"""

from __future__ import annotations

from decimal import Decimal


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


class BudgetExceeded(BudgetError):
    """A cap cannot take this request's maximum cost (now: deferred, or failed if the job says so)."""

    #: never fits, whatever is spent: the request fails at once instead of waiting forever
    permanent = False
    code = "budget_exceeded"

    def __init__(self, scope: str, spent: Decimal, cap: Decimal, message: str | None = None):
        self.scope = scope            # 'global' | 'tier:peak' | 'job:…'
        self.kind = scope.split(":", 1)[0]
        self.spent, self.cap = spent, cap
        super().__init__(message or f"budget {scope}: ${spent} spent of ${cap}")


class BudgetNeverFits(BudgetExceeded):
    """The request's maximum cost is above the cap itself: no period and no settlement makes room."""

    permanent = True

    def __init__(self, scope: str, amount: Decimal, cap: Decimal):
        self.amount = amount
        super().__init__(scope, Decimal(0), cap,
                         f"budget {scope}: this request's maximum cost ${amount} is above the cap ${cap},"
                         f" so it can never fit")


class BudgetWaitedOut(BudgetExceeded):
    """Only other live holds stood in the way, for longer than ``budget_wait_max_s``: the request
    is deferred for a minute (kind ``wait``) with the cap, what it holds and by whom in words."""

    def __init__(self, scope: str, spent: Decimal, cap: Decimal, message: str):
        super().__init__(scope, spent, cap, message)
        self.kind = "wait"


class InvalidAmount(BudgetError):
    """An amount that cannot be reserved (not a number, not finite, ≤ 0, absurd): that request fails."""

    permanent = True
    code = "invalid_max_cost"


class BudgetUnavailable(BudgetError, InfrastructureError):
    """The budget store (Redis) cannot be reached: no call goes ahead."""


class BudgetScriptError(BudgetUnavailable):
    """Redis answered, but a budget script refused its arguments: a bug, not an outage.

    It still fails closed (no call without a reservation), but it is named for what it is, so an
    operator does not go looking for a Redis outage that is not there.
    """
