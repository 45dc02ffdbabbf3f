"""What a call costs in USD, by the simulator's own price table: never the pipeline's.

The simulator is the witness of the pipeline's money (see ``billing.py``): it
keeps its own table of the providers' published prices, written out again
here, and turns each billed usage object into dollars with its own rules. A
named provider (``providers.py``) brings its own prices in the config; a
model of the built-in OpenAI or Anthropic provider not listed here is served
but counted as ``unpriced`` in ``/_stats``.

Prices are USD per 1M tokens, exact decimals. Rules:

- OpenAI shapes (chat, completions, responses, embeddings): uncached input at
  ``input``, cached input at ``cached_input``, output (reasoning included) at
  ``output``;
- Anthropic: input at ``input``, cache writes at 1.25 × input (5-minute TTL)
  or 2 × input (1-hour TTL), cache reads at ``cached_input`` (0.1 × input),
  output at ``output``;
- moderations are free;
- the Batch API and flex processing (``service_tier: "flex"``, billed at
  Batch prices) take ``batch_discount`` off the whole call, and the prompt-cache
  discount stacks with it;
- the Batch API does not take the models of ``NO_BATCH`` (batches.py refuses their lines);
- time-of-day prices: a model of ``PEAK_HOURS`` is billed at its table price inside its peak
  hours (UTC, on the listed weekdays) and at ``OFF_PEAK_SHARE`` of it at every other hour, by the
  simulator's clock when the call arrives (``time_multiplier``). Written here from DeepSeek's
  pricing page (api-docs.deepseek.com/quick_start/pricing: peak 01:00-04:00 and 06:00-10:00 UTC,
  Monday to Friday; off-peak half the peak price), not from the pipeline's price book.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

MILLION = Decimal(1_000_000)
#: Anthropic prompt caching, × the input price: 5-minute writes 1.25, 1-hour writes 2, reads 0.1 (the
#: ``cached_input`` column below); docs.claude.com/en/docs/about-claude/pricing, "Prompt caching" (read
#: December 2026). OpenAI's cached input is its own column per model (platform.openai.com/docs/pricing:
#: gpt-4o 0.5 ×, gpt-4.1 0.25 ×, gpt-5 0.1 ×). Which tokens are cached is ``caching.py``'s.
CACHE_WRITE_5M = Decimal("1.25")
CACHE_WRITE_1H = Decimal("2")
#: tiers that take ``batch_discount`` off
DISCOUNTED_TIERS = ("batch", "flex")


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. ``cached_input`` defaults to ``input`` (no cache discount)."""

    input: Decimal
    output: Decimal = Decimal(0)
    cached_input: Decimal | None = None
    batch_discount: Decimal = Decimal("0.5")

    @classmethod
    def of(cls, input, output="0", cached_input=None, batch_discount="0.5") -> "Price":
        return cls(Decimal(str(input)), Decimal(str(output)),
                   None if cached_input is None else Decimal(str(cached_input)), Decimal(str(batch_discount)))


FREE = Price.of("0", "0", "0")

#: Published list prices (USD / 1M tokens), November 2026: platform.openai.com/docs/pricing,
#: docs.anthropic.com/en/docs/about-claude/pricing
OPENAI_PRICES: dict[str, Price] = {
    "gpt-4o": Price.of("2.50", "10.00", "1.25"),
    "gpt-4o-mini": Price.of("0.15", "0.60", "0.075"),
    "gpt-4.1": Price.of("2.00", "8.00", "0.50"),
    "gpt-4.1-mini": Price.of("0.40", "1.60", "0.10"),
    "gpt-4.1-nano": Price.of("0.10", "0.40", "0.025"),
    "o1": Price.of("15.00", "60.00", "7.50"),
    "o3": Price.of("2.00", "8.00", "0.50"),
    "o3-mini": Price.of("1.10", "4.40", "0.55"),
    "o4-mini": Price.of("1.10", "4.40", "0.275"),
    "gpt-5": Price.of("1.25", "10.00", "0.125"),
    "gpt-5-mini": Price.of("0.25", "2.00", "0.025"),
    "gpt-5-nano": Price.of("0.05", "0.40", "0.005"),
    # legacy completions: no Batch API (NO_BATCH), so no batch price
    "gpt-3.5-turbo-instruct": Price.of("1.50", "2.00", batch_discount="0"),
    "davinci-002": Price.of("2.00", "2.00", batch_discount="0"),
    "babbage-002": Price.of("0.40", "0.40", batch_discount="0"),
    # DeepSeek (served by a named provider of kind openai): the peak price; see PEAK_HOURS
    "deepseek-flash": Price.of("0.30", "1.20", "0.006", batch_discount="0"),
    "deepseek-v4-flash": Price.of("0.30", "1.20", "0.006", batch_discount="0"),
    "deepseek-v4-pro": Price.of("1.32", "3.96", "0.044", batch_discount="0"),
    # embeddings: input only
    "text-embedding-3-small": Price.of("0.02"),
    "text-embedding-3-large": Price.of("0.13"),
    "text-embedding-ada-002": Price.of("0.10"),
    # moderations: free
    "omni-moderation-latest": FREE,
    "text-moderation-latest": FREE,
}

ANTHROPIC_PRICES: dict[str, Price] = {
    "claude-3-5-haiku": Price.of("0.80", "4.00", "0.08"),
    "claude-3-5-sonnet": Price.of("3.00", "15.00", "0.30"),
    "claude-3-7-sonnet": Price.of("3.00", "15.00", "0.30"),
    "claude-sonnet-4-0": Price.of("3.00", "15.00", "0.30"),
    "claude-sonnet-4-5": Price.of("3.00", "15.00", "0.30"),
    "claude-opus-4-0": Price.of("15.00", "75.00", "1.50"),
    "claude-opus-4-1": Price.of("15.00", "75.00", "1.50"),
    "claude-opus-4-5": Price.of("5.00", "25.00", "0.50"),
    "claude-haiku-4-5": Price.of("1.00", "5.00", "0.10"),
}


#: models the OpenAI Batch API does not take (gpt-3.5-turbo-instruct's model page: Batch "Not
#: supported"; the base models list no batch support or price): a batch line of one is refused
NO_BATCH = frozenset({"gpt-3.5-turbo-instruct", "davinci-002", "babbage-002"})

#: model -> (weekdays 0 = Monday, ((from hour, to hour) UTC, ...)): the hours billed at the table price
PEAK_HOURS: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = {
    m: ((0, 1, 2, 3, 4), ((1, 4), (6, 10))) for m in ("deepseek-flash", "deepseek-v4-flash", "deepseek-v4-pro")}
OFF_PEAK_SHARE = Decimal("0.5")


def time_multiplier(model: str, at: datetime) -> Decimal:
    """The share of the table price billed for a call of ``model`` arriving at ``at`` (UTC)."""
    hours = PEAK_HOURS.get(model.lower())
    if hours is None:
        return Decimal(1)
    days, spans = hours
    peak = at.weekday() in days and any(lo <= at.hour < hi for lo, hi in spans)
    return Decimal(1) if peak else OFF_PEAK_SHARE


def builtin_price(kind: str, model: str) -> Price | None:
    """The built-in price of ``model`` for a provider kind; dated snapshots and ``-latest`` resolve
    to their family (``gpt-4o-2024-08-06`` → ``gpt-4o``, ``claude-3-5-haiku-latest`` →
    ``claude-3-5-haiku``)."""
    table = ANTHROPIC_PRICES if kind == "anthropic" else OPENAI_PRICES
    m = model.lower()
    if m in table:
        return table[m]
    best = None
    for name in table:
        if m.startswith(name + "-") and (best is None or len(name) > len(best)):
            rest = m[len(name) + 1:]
            if rest[:1].isdigit() or rest in ("latest", "preview"):
                best = name
    return table[best] if best else None


def usd(price: Price, usage: dict, tier: str = "standard", share: Decimal = Decimal(1)) -> Decimal:
    """Dollars for one billed usage object (any of the providers' usage shapes); ``share``: the
    time-of-day share in force (``time_multiplier``)."""
    cached_rate = price.input if price.cached_input is None else price.cached_input
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:   # Anthropic
        creation = usage.get("cache_creation") or {}
        w5 = creation.get("ephemeral_5m_input_tokens", usage.get("cache_creation_input_tokens", 0))
        w1 = creation.get("ephemeral_1h_input_tokens", 0)
        units = (usage.get("input_tokens", 0) * price.input + w5 * price.input * CACHE_WRITE_5M
                 + w1 * price.input * CACHE_WRITE_1H + usage.get("cache_read_input_tokens", 0) * cached_rate
                 + usage.get("output_tokens", 0) * price.output)
    elif "input_tokens" in usage:   # Responses API
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
        units = ((usage["input_tokens"] - cached) * price.input + cached * cached_rate
                 + usage.get("output_tokens", 0) * price.output)
    else:   # chat, completions, embeddings (no completion_tokens)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        units = ((usage.get("prompt_tokens", 0) - cached) * price.input + cached * cached_rate
                 + usage.get("completion_tokens", 0) * price.output)
    dollars = Decimal(units) * share / MILLION
    if tier in DISCOUNTED_TIERS:
        dollars *= 1 - price.batch_discount
    return dollars


def plain(amount: Decimal) -> str:
    """A plain decimal string (never ``0E-8``), as ``/_stats`` prints money."""
    text = format(amount.normalize(), "f") if amount else "0"
    return text
