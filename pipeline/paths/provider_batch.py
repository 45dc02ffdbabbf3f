"""Provider batch: the scheduler sends requests to the provider's Batch API at the batch price.

The sequence is the one of every path (pipeline/paths/base.py), run by the scheduler
(schedules/pb_submit.py, schedules/pb_ingest.py) on its one event loop:

1. **reserve** each request's maximum *at the batch price* in the same async
   ``Budget`` the workers use, held for the batch's whole window (``hold_ttl_s``,
   not renewed: the scheduler may restart while the provider runs it), in the
   period of the tick that sends it;
2. **call**: the request lines (``request_line``, the provider's format by the
   endpoint's ``line_format``) are created at the provider and polled until it
   ends (pipeline/providers/batch_api.py);
3. **price**: each result line becomes an ``Outcome`` at the batch price
   (``outcome_of_line``); lines the provider did not run (expired, cancelled) say why;
4. **write outcome**, then 5. **settle** each hold by the fields it recorded.

Provider custom_ids are ``q`` + a hash of (job, custom_id) (``provider_custom_id``):
unique across the jobs that share a provider batch and valid for Anthropic's pattern.
Identical deterministic requests (one cache key) in one provider batch are sent as one line
(``lines_to_send``); their twins take its answer at cost 0 when it is ingested (``twins``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal

from pipeline.config import Settings
from pipeline.endpoints import endpoint_for
from pipeline.money.pricing import ModelPrice, PriceBook, Usage, cost, get_price_book
from pipeline.money.scripts import PROVIDER_BATCH_HOLD_S
from pipeline.errors import LLMBatchError
from pipeline.paths.base import Path, answered
from pipeline.providers.registry import get_registry
from pipeline.request import Outcome, Request

#: Anthropic's error types → the HTTP status the synchronous API would have answered
_ANTHROPIC_STATUS = {"invalid_request_error": 400, "not_found_error": 404, "authentication_error": 401,
                     "permission_error": 403, "overloaded_error": 529}


def provider_custom_id(req: Request) -> str:
    return "q" + hashlib.blake2b(f"{req.job_id}\x00{req.custom_id}".encode(), digest_size=16).hexdigest()


def lines_to_send(reqs: list[Request]) -> list[Request]:
    """The requests whose lines a provider batch sends: one per distinct cache key (the first, in
    ``reqs``' order), every request without one. Identical deterministic requests in one provider
    batch are sent once; their twins take the answer (``twins``)."""
    seen: set[str] = set()
    out = []
    for r in reqs:
        if r.cache_key is None or r.cache_key not in seen:
            out.append(r)
            if r.cache_key is not None:
                seen.add(r.cache_key)
    return out


def twins(reqs: list[Request]) -> dict[str, list[Request]]:
    """The requests ``lines_to_send`` leaves out, by the provider custom_id of the line sent for them."""
    lead: dict[str, str] = {}
    out: dict[str, list[Request]] = {}
    for r in reqs:
        if r.cache_key is None:
            continue
        if r.cache_key not in lead:
            lead[r.cache_key] = provider_custom_id(r)
        else:
            out.setdefault(lead[r.cache_key], []).append(r)
    return out


def request_line(req: Request) -> bytes:
    """The request's line of the provider's batch input, in the format of its endpoint."""
    pid = provider_custom_id(req)
    if endpoint_for(req.endpoint).line_format == "openai":
        line = {"custom_id": pid, "method": "POST", "url": req.endpoint, "body": req.body}
    else:
        line = {"custom_id": pid, "params": req.body}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class ProviderBatch(Path):
    name = "provider_batch"
    lever = "batch"
    runs_in = "scheduler"
    fast_lane = False

    def why_not(self, req: Request, price: ModelPrice) -> str | None:
        if price.batch is None:
            return f"model {price.model} has no Batch API (the price book says \"batch\": \"none\")"
        try:
            spec = get_registry().get(req.provider)
        except LLMBatchError:   # a provider this process cannot build: the price book's word stands
            return None
        if spec.batch is None:
            return f"provider {req.provider} has no Batch API (its entry in the registry sets no batch)"
        return None

    def price(self, price: ModelPrice, usage: Usage, at: datetime | None = None,
              served: str | None = None) -> Decimal:
        return cost(price, usage, batch=True)

    def discount(self, served: str | None = None) -> str | None:
        return "batch"

    def reservation(self, req: Request) -> Decimal:
        """The most a request can cost through a Batch API: its maximum at the batch price."""
        price = get_price_book().resolve(req.model, req.provider)
        return req.bound.max_cost_usd * (1 - price.batch_discount)

    def hold_ttl_s(self, settings: Settings) -> float | None:
        return PROVIDER_BATCH_HOLD_S

    def expected_done(self, req: Request, now: datetime, price: ModelPrice | None = None,
                      by: datetime | None = None) -> datetime:
        # the providers' completion window: results within 24 h (OpenAI "24h", Anthropic's expiry)
        return now + timedelta(hours=24)


PROVIDER_BATCH = ProviderBatch()


def outcome_of_line(req: Request, line: dict, prices: PriceBook,
                    key_alias: str | None = None) -> tuple[Outcome | None, dict | None, str | None]:
    """``(outcome, attempt row, not_run_reason)`` of one result line (OpenAI's ``response``/``error``
    shape or Anthropic's ``result``); a line the provider did not run gives only the reason.
    ``key_alias``: the key the batch went out on, on the outcome and the attempt."""
    out, attempt, why = _outcome_of_line(req, line, prices)
    if out is None:
        return out, attempt, why
    return replace(out, key_alias=key_alias), {**attempt, "key_alias": key_alias}, why


def _outcome_of_line(req: Request, line: dict, prices: PriceBook) -> tuple[Outcome | None, dict | None, str | None]:
    attempt_no = req.attempts + 1
    attempt = {"job_id": req.job_id, "custom_id": req.custom_id, "attempt": attempt_no, "status_code": None,
               "error": None, "latency_ms": None, "provider_request_id": None, "cost_usd": "0"}
    period = req.budget_period
    if "result" in line:   # Anthropic Message Batches
        result = line.get("result") or {}
        kind = result.get("type")
        if kind in ("canceled", "expired"):
            return None, None, kind
        if kind == "succeeded":
            body = result.get("message") or {}
            out = answered(PROVIDER_BATCH, req, body, prices, attempts=attempt_no,
                           provider_request_id=body.get("id"), budget_period=period)
            attempt.update(status_code=200, cost_usd=str(out.cost))
            return out, attempt, None
        error = (result.get("error") or {}).get("error") or {"type": "errored"}
        code = _ANTHROPIC_STATUS.get(error.get("type"), 500)
        request_id = None
    else:                  # OpenAI Batch API
        resp, err = line.get("response"), line.get("error")
        if resp is None:
            return None, None, (err or {}).get("code") or "not_run"
        code, body, request_id = resp.get("status_code"), resp.get("body") or {}, resp.get("request_id")
        attempt.update(provider_request_id=request_id)
        if code == 200:
            out = answered(PROVIDER_BATCH, req, body, prices, attempts=attempt_no, status_code=code,
                           provider_request_id=request_id, budget_period=period)
            attempt.update(status_code=200, cost_usd=str(out.cost))
            return out, attempt, None
        error = body.get("error") or {"code": "provider_error", "message": f"status {code}"}
    message = error.get("message") if isinstance(error, dict) else str(error)
    attempt.update(status_code=code, error=(message or "")[:500])
    out = Outcome.failed(req, "provider_error", message, attempts=attempt_no, status_code=code,
                         provider_request_id=request_id, budget_period=period)
    return replace(out, error={**out.error, "provider_error": error}), attempt, None
