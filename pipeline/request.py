"""The one typed value a request travels in, and the one typed value it ends as.

``Request`` is built once by intake (a submitted line, a Kafka message) and read
back from its ``requests`` row by whoever runs it (a worker, the scheduler). It is
frozen: a layer that needs a different request makes one with ``replace``. Its
idempotency key (``key``: the provider call's ``Idempotency-Key`` and the budget's
hold id) is a property built by ``pipeline.ids.request_key``: nobody writes
``job_id:custom_id`` by hand.

``Outcome`` is what a path hands back for a request: succeeded, failed or
cancelled, with its answer or error, usage, cost at the path's price and at list
price, what each lever saved (the savings ledger), the path and its main lever,
the service tier that answered, attempts and latency. ``Outcome.to_row()`` is the one outcome dict ``pipeline.stores.outcomes``
writes.

``Request.from_row`` / ``Request.to_row`` and ``Outcome.to_row`` are the only
places the column names of ``requests`` and ``results`` appear in Python.
Nothing here touches a service.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from pipeline.config import get_settings
from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL
from pipeline.ids import request_key
from pipeline.money.bounds import Bound
from pipeline.money.pricing import Usage
from pipeline.providers.registry import build_registry
from pipeline.money.savings import as_json as savings_json

#: a path a request may take (pipeline/paths/); "auto" lets the cost engine choose (issue 21)
DEFAULT_PATH = "realtime"


def default_url(provider: str, kind: str | None = None) -> str:
    """The url of a request whose row names none: chat for OpenAI lines, messages for Anthropic ones.
    ``kind``: the API shape of the provider (a registry kind); asked of the registry when not
    given, never read from the provider's name (a provider of kind anthropic may have any name)."""
    if kind is None:
        kind = build_registry(get_settings(), secret_required=False).get(provider).kind
    return ANTHROPIC_MESSAGES_URL if kind == "anthropic" else CHAT_URL


def _iso(value) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


@dataclass(frozen=True)
class Request:
    """One request from intake to outcome."""

    job_id: str
    custom_id: str
    endpoint: str            # the request url, e.g. "/v1/chat/completions"
    provider: str            # a provider name (the registry's)
    model: str               # the provider's model id, as the body names it
    path: str                # realtime | flex | provider_batch (pipeline/paths/)
    tier: str
    body: dict
    bound: Bound             # the most it can cost at list price (pipeline/money/bounds.py)
    priority: int = 5
    deadline: datetime | str | None = None
    metadata: dict | None = None
    cache_key: str | None = None
    line: int | None = None
    attempts: int = 0
    fallback_model: str | None = None
    on_budget: str = "defer"
    tier_reason: str = ""
    published_at: datetime | str | None = None
    #: the budget period its holds were taken in (provider batches: requests.budget_period)
    budget_period: str | None = None
    batch_id: str | None = None
    #: why it takes its path (``requests.path_reason``: the cost engine's choice under ``--mode auto``)
    path_reason: str = ""

    @property
    def key(self) -> str:
        """The request's one key: the provider call's Idempotency-Key and its hold id."""
        return request_key(self.job_id, self.custom_id)

    @property
    def max_cost_usd(self) -> Decimal:
        return self.bound.max_cost_usd

    def with_path(self, path: str) -> "Request":
        return replace(self, path=path)

    def log_context(self) -> dict:
        """Correlation fields of its log lines."""
        return {"job": self.job_id, "request": self.custom_id, "tier": self.tier}

    @classmethod
    def probe(cls, job_id: str, custom_id: str, provider: str, body: dict, path: str,
              url: str | None = None) -> "Request":
        """The little of a line intake has before it is priced and tiered: enough for a path to say
        whether it serves it (its url, provider, model and body)."""
        return cls(job_id, custom_id, url or default_url(provider), provider, body.get("model", ""), path, "",
                   body, Bound(0, 0, Decimal(0), True))

    @classmethod
    def from_row(cls, row) -> "Request":
        """A ``requests`` row (a mapping), joined with its job's ``on_budget`` and
        ``fallback_model`` and its batch's ``mode`` as ``path`` where the query has them."""
        get = row.get
        bound = Bound(input_tokens=int(get("input_tokens") or 0),
                      # the row keeps the maximum cost, not the output tokens it was made of
                      max_output_tokens=int(get("max_output_tokens") or 0),
                      max_cost_usd=Decimal(str(get("max_cost_usd") or 0)),
                      tokens_exact=bool(get("tokens_exact", True)))
        return cls(
            job_id=row["job_id"], custom_id=row["custom_id"],
            endpoint=get("endpoint") or default_url(row["provider"]),   # requests.endpoint (migration 024)
            provider=row["provider"], model=row["model"], path=get("path") or get("mode") or DEFAULT_PATH,
            tier=row["tier"], body=get("body") or {}, bound=bound,
            priority=get("priority") if get("priority") is not None else 5,
            deadline=get("deadline"), metadata=get("metadata"), cache_key=get("cache_key"),
            line=get("line"), attempts=int(get("attempts") or 0), fallback_model=get("fallback_model"),
            on_budget=get("on_budget") or "defer", tier_reason=get("tier_reason") or "",
            published_at=get("published_at"),
            budget_period=str(get("budget_period")) if get("budget_period") is not None else None,
            batch_id=get("batch_id"), path_reason=get("path_reason") or "")

    def to_row(self, status: str) -> dict:
        """The ``requests`` row (batch_id as the request holds it) in state ``status``;
        ``mode`` is its path, for the batch it is grouped into."""
        return {
            "job_id": self.job_id, "custom_id": self.custom_id, "line": self.line, "batch_id": self.batch_id,
            "provider": self.provider, "model": self.model, "tier": self.tier, "tier_reason": self.tier_reason,
            "priority": self.priority, "deadline": _iso(self.deadline), "body": self.body,
            "metadata": self.metadata, "input_tokens": self.bound.input_tokens,
            "tokens_exact": bool(self.bound.tokens_exact), "max_cost_usd": str(self.bound.max_cost_usd),
            "status": status, "mode": self.path, "published_at": _iso(self.published_at),
            "cache_key": self.cache_key, "endpoint": self.endpoint, "path_reason": self.path_reason,
        }


@dataclass(frozen=True)
class Outcome:
    """How a request ended: what a path hands back. ``to_row`` is the one outcome dict."""

    job_id: str
    custom_id: str
    model: str                          # the model that answered (a fallback's, when it did)
    status: str                         # succeeded | failed | cancelled
    attempts: int = 0
    response: dict | None = None
    error: dict | None = None
    usage: Usage | None = None
    cost: Decimal = Decimal(0)          # at the path's price: the ledger's figure
    list_cost: Decimal = Decimal(0)     # the same usage at list price (what the lever saved is the difference)
    path: str | None = None
    lever: str | None = None            # the savings ledger's name for what the path saves
    service_tier: str | None = None     # the tier that answered ("flex", "default"), when the provider says
    key_alias: str | None = None        # the alias of the key that answered, never the key
    latency_ms: int | None = None
    status_code: int | None = None
    provider_request_id: str | None = None
    usage_missing: bool = False
    cache_key: str | None = None
    budget_period: str | None = None    # the period its cost was reserved in (one period per spend)
    #: what each lever saved of list_cost (pipeline/money/savings.py): adds up to list_cost - cost
    savings: dict | None = None
    from_cache: bool = False            # answered without a call: the exact cache, or an identical call in flight

    @property
    def key(self) -> str:
        return request_key(self.job_id, self.custom_id)

    @classmethod
    def failed(cls, req: Request, code: str, message: str, **kw) -> "Outcome":
        kw.setdefault("attempts", req.attempts)
        kw.setdefault("path", req.path)
        return cls(req.job_id, req.custom_id, req.model, "failed", error={"code": code, "message": message},
                   cache_key=req.cache_key, **kw)

    @classmethod
    def cancelled(cls, req: Request, message: str, **kw) -> "Outcome":
        kw.setdefault("attempts", req.attempts)
        return cls(req.job_id, req.custom_id, req.model, "cancelled", path=req.path,
                   error={"code": "cancelled", "message": message}, **kw)

    def with_cost(self, cost: Decimal) -> "Outcome":
        return replace(self, cost=cost)

    def to_row(self) -> dict:
        """The outcome as ``pipeline.stores.outcomes.write_outcomes`` takes it."""
        u = self.usage
        row = {
            "job_id": self.job_id, "custom_id": self.custom_id, "model": self.model, "status": self.status,
            "attempts": self.attempts, "response": self.response, "error": self.error,
            "input_tokens": u.input_tokens if u else None,
            "cached_input_tokens": u.cached_input_tokens if u else None,
            "output_tokens": u.output_tokens if u else None,
            "usage_missing": self.usage_missing, "cost_usd": str(self.cost),
            "list_cost_usd": str(self.list_cost), "path": self.path, "lever": self.lever,
            "service_tier": self.service_tier, "key_alias": self.key_alias,
            "provider_request_id": self.provider_request_id, "latency_ms": self.latency_ms,
            "status_code": self.status_code, "cache_key": self.cache_key,
            "savings": savings_json(self.savings or {}), "from_cache": self.from_cache,
            "saved_usd": str(self.list_cost - self.cost) if self.status == "succeeded" else "0",
        }
        if self.budget_period is not None:
            row["budget_period"] = self.budget_period
        return row
