"""Flex: our workers call with ``service_tier: "flex"``, billed at the batch price.

OpenAI's flex processing (Chat Completions and Responses, the models the price book
marks ``"flex": true``) is slower and sometimes refuses with 429 "Resource
Unavailable", which is not billed. So:

* **reserve** at the standard price: a request flex refuses goes on at once at
  standard (``FlexCaller``), under the same hold;
* **call** with ``service_tier: "flex"`` and a long client timeout
  (``flex_timeout_s``, OpenAI recommends 15 minutes), and a hold that outlives its
  last renewal at least that long (``hold_ttl_s``): a dead worker's flex call can
  still be billed until then;
* **price** at the flex price when flex answered, at list price when standard did;
  the outcome records which (``results.service_tier``).

A model without flex is refused at intake with the reason (an unsupported model is
an error at the provider, not a silent fallback). A line that sets
``service_tier: "flex"`` itself takes this path (``claims``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from pipeline.config import Settings
from pipeline.constants import CHAT_URL, RESPONSES_URL
from pipeline.errors import LLMBatchError, RetryableProviderError
from pipeline.money.pricing import ModelPrice, get_price_book
from pipeline.paths.base import Path
from pipeline.request import Request

log = logging.getLogger(__name__)

#: the urls OpenAI serves flex on
FLEX_URLS = (CHAT_URL, RESPONSES_URL)


def is_unavailable(e: Exception) -> bool:
    """A flex 429 "Resource Unavailable" (not billed), as opposed to a rate limit."""
    if not isinstance(e, RetryableProviderError) or e.status_code != 429:
        return False
    text = str(e).lower()
    return "resource unavailable" in text or "resource_unavailable" in text


def _takes_flex(model, provider: str | None = None) -> bool:
    try:
        return isinstance(model, str) and get_price_book().resolve(model, provider).flex
    except LLMBatchError:
        return False


def claims(body: dict) -> bool:
    """A body that asks for flex itself."""
    return isinstance(body, dict) and body.get("service_tier") == "flex"


class FlexCaller:
    """The provider as the flex path calls it: flex first, with its long timeout; standard at once
    when flex answers "resource unavailable". ``served`` is the tier that answered the last call;
    ``unavailable`` counts flex refusals (not billed)."""

    def __init__(self, provider, timeout_s: float):
        self.provider, self.timeout_s = provider, timeout_s
        self.name = provider.name
        self.served: str | None = None
        self.unavailable = 0

    def __getattr__(self, name):
        return getattr(self.provider, name)

    async def call(self, body: dict, *, headers: dict, **kw):
        """``kw``: what the caller passes on to the provider (the key chosen, the endpoint's url)."""
        if not _takes_flex(body.get("model"), self.name):   # a fallback model without flex: standard, as it is
            answer = await self.provider.call({k: v for k, v in body.items() if k != "service_tier"},
                                              headers=headers, **kw)
            self.served = "default"
            return answer
        flex = {**body, "service_tier": "flex"}
        try:
            answer = await self.provider.call(flex, headers=headers, timeout=self.timeout_s, **kw)
            self.served = "flex"
            return answer
        except RetryableProviderError as e:
            if not is_unavailable(e):
                raise
            self.unavailable += 1
            log.info("flex unavailable (not billed): sent at standard instead")
        standard = {k: v for k, v in body.items() if k != "service_tier"}
        answer = await self.provider.call(standard, headers=headers, **kw)
        self.served = "default"
        return answer


class Flex(Path):
    name = "flex"
    lever = "flex"
    runs_in = "worker"
    fast_lane = False

    def why_not(self, req: Request, price: ModelPrice) -> str | None:
        if req.endpoint not in FLEX_URLS:
            return f"flex processing serves {' and '.join(FLEX_URLS)}, not {req.endpoint}"
        if not price.flex:
            return (f"model {price.model} does not take flex processing (the price book marks the models"
                    f" that do with \"flex\": true)")
        return None

    quoted_tier = "flex"

    def hold_ttl_s(self, settings: Settings) -> float | None:
        return settings.flex_timeout_s + settings.budget_reservation_margin_s

    def expected_done(self, req: Request, now: datetime, price: ModelPrice | None = None,
                      by: datetime | None = None) -> datetime:
        # the long client timeout OpenAI recommends; a 429 "resource unavailable" goes on at standard at once
        return now + timedelta(minutes=15)

    def caller(self, provider, settings: Settings):
        return FlexCaller(provider, settings.flex_timeout_s)


FLEX = Flex()
