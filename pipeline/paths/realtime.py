"""Realtime: our workers call the provider per request, at list price.

Its call is the provider's own (``Path.caller``). A request whose body asks for
``service_tier: "flex"`` itself goes on the flex path instead (``flex.FLEX``
``claims``), so it is priced at the flex price when flex answers.
"""

from __future__ import annotations

from pipeline.paths.base import Path


class Realtime(Path):
    name = "realtime"
    lever = None
    runs_in = "worker"
    fast_lane = True


REALTIME = Realtime()
