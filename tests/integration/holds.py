"""A batch kept in progress whatever the hour, for the tests that cancel, expire or list open batches.

The hold is the job's own cap (``llmbatch_budget_usd``): it fits one line's maximum and half of
another, so one line runs and the others are deferred by the job's cap, which parks them until the
cap is raised (``deferral.defer_batch``: no ``deferred_until``), and the job pauses on its budget
(``paused_budget``: in progress to the API). Nothing but a cap raise, a cancel or the end of the
batch's 24 hours moves it on. Not the off-peak tier on the realtime path: its window opens by
itself at 22:00 UTC (``offpeak_open_cron``) and a run at night would run the batch. Not a project's
daily cap either: its day ends at 00:00 UTC. Not a cap of $0: a line whose maximum is above its
cap can never fit and fails at once (``BudgetNeverFits``) instead of waiting.
"""

from __future__ import annotations

import time
from decimal import ROUND_UP, Decimal

import sqlalchemy as sa

from pipeline.intake.formats import parse_request
from pipeline.money.pricing import get_price_book
from tests.integration.conftest import wait_for

#: lines of a held batch that run before its cap holds the rest
RUNS = 1


def held_metadata(lines: list[dict]) -> dict:
    """llmbatch metadata that holds a batch of ``lines`` (OpenAI batch lines or Anthropic requests,
    of about the same size: the cheapest must cost more than two thirds of the dearest)."""
    book = get_price_book()
    dearest = max(parse_request(x, book).max_cost_usd for x in lines)
    cap = (dearest * (RUNS + Decimal("0.5"))).quantize(Decimal("1E-10"), rounding=ROUND_UP)
    return {"llmbatch_tier": "peak", "llmbatch_mode": "realtime", "llmbatch_budget_usd": str(cap)}


def states(engine, batch_id: str) -> dict[str, int]:
    """The API batch's requests by state."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT q.status, count(*) FROM requests q JOIN api_batches a USING (job_id)"
            " WHERE a.batch_id = :b GROUP BY 1"), {"b": batch_id}).all())


def wait_held(engine, batch_id: str, n: int, settle_s: float = 3.0) -> None:
    """Until ``RUNS`` of the batch's ``n`` lines have run and the others wait on the job's cap; then
    still so after ``settle_s`` (a few scheduler ticks: a hold that opened by itself would show)."""
    want = {"succeeded": RUNS, "deferred": n - RUNS}
    wait_for(lambda: states(engine, batch_id) == want, timeout=180, every=0.5,
             what=f"{RUNS} of {n} lines run, the others deferred by the job's cap")
    time.sleep(settle_s)
    assert states(engine, batch_id) == want
