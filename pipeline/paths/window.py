"""Window: our workers call the provider per request, inside the model's cheapest price window.

A model whose price book entry has ``windows`` (pipeline/money/price_windows.py; DeepSeek's
off-peak hours) is billed less for a call sent inside one. A request on this path is held
(whatever its tier) until its model's cheapest window that still meets its deadline opens
(``schedules/release.py`` ``release_price_windows``), then dispatched to our workers like a
realtime batch; a deadline that comes first releases it at its latest start, as any held request
(schedules/deadlines.py). Whenever it is sent, it is priced at the multiplier in force when the
call was sent (``Path.price`` with the send time), so a call that misses the window pays what
the provider bills then: list price, and reserved at list price, never less.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pipeline.money.price_windows import cheapest_start
from pipeline.money.pricing import ModelPrice
from pipeline.paths.base import Path
from pipeline.request import Request


class Window(Path):
    name = "window"
    lever = "window"
    runs_in = "worker"
    fast_lane = False
    waits_for_tier_window = False

    def why_not(self, req: Request, price: ModelPrice) -> str | None:
        if not any(w.multiplier < 1 for w in price.windows):
            return f"model {price.model} has no price window (the price book lists no \"windows\" for it)"
        return None

    def planned_start(self, req: Request, price: ModelPrice, now: datetime, by: datetime) -> datetime:
        """The cheapest window's opening by ``by``; with none by then, the next one within a day
        (so the chooser sees it miss the deadline rather than a window at list price)."""
        start, mult = cheapest_start(price.windows, now, by)
        return start if mult < 1 else cheapest_start(price.windows, now, max(by, now + timedelta(days=1)))[0]

    def initial_status(self, tier: str) -> str:
        return "held"   # until the window opens (or the deadline's latest start comes)


WINDOW = Window()
