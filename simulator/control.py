"""The simulator's control endpoints: what tests and operators ask of it, not what SDKs call.

- ``GET /_stats``: ``stats.py``'s counters, plus ``providers``: per provider
  and per key alias, calls, successes, 429s, 401s, tokens, ``billed_usd`` (a
  plain decimal string), ``peak_calls_60s``, flex calls and flex 429s, batch
  lines, and the revoked keys;
- ``POST /_stats/batch_lines`` with ``{"custom_ids": […]}``: what the Batch API billed for those
  lines (``lines_billed``, ``billed_usd`` by the simulator's prices, ``unpriced_lines``);
- ``GET /metrics``: Prometheus text of the per-model counters;
- ``POST /_reset``: counters, prompt cache, limits and key revocations back to zero;
- ``GET /_config`` (keys shown by alias only), ``POST /_config`` (JSON of
  SimulatorConfig fields to change), ``DELETE /_config`` (back to the startup config);
- ``POST /_admin/keys/revoke`` and ``/_admin/keys/restore`` with ``{"key": …,
  "provider": …}`` (provider optional: every provider that lists the key, or if none does,
  every provider that takes any key);
  answers the providers it applied to, never the key;
- ``GET /healthz``.
"""

from __future__ import annotations

import dataclasses
import logging

from aiohttp import web

from pipeline.errors import LLMBatchError
from simulator.config import config_from_options
from simulator.providers import redacted
from simulator.server import Simulator, json_response

log = logging.getLogger(__name__)


def _config_view(sim: Simulator) -> dict:
    view = dataclasses.asdict(sim.config)
    view["providers"] = redacted(sim.config.providers)
    return view


def _changed(request: web.Request, what: str) -> None:
    """One log line per change of the configuration, naming who asked (``X-Caller``, which the test
    helpers set to the test running, else the client's address): a change from a place nobody
    expects (a test's leftover context, another process) then names itself."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    log.warning("simulator: configuration %s by %s", what, request.headers.get("X-Caller") or peer)


def add_control_routes(app: web.Application, sim: Simulator) -> None:
    async def get_stats(request):
        return json_response({**sim.stats.as_dict(request.query.get("key_prefix"), sim.unattended),
                              "providers": sim.accounts.as_dict()})

    async def post_batch_lines(request):
        body = await request.json()
        ids = body.get("custom_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            return json_response({"error": "expected {\"custom_ids\": [strings]}"}, 400)
        return json_response(sim.stats.batch_lines(ids))

    async def get_metrics(request):
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        by_model = sorted(sim.stats.by_model.items())
        lines = ["# HELP llmbatch_simulator_requests_total Requests the simulator received, by model",
                 "# TYPE llmbatch_simulator_requests_total counter",
                 *(f'llmbatch_simulator_requests_total{{model="{esc(m)}"}} {c.requests}' for m, c in by_model),
                 "# HELP llmbatch_simulator_errors_total Error answers the simulator gave, by model and kind",
                 "# TYPE llmbatch_simulator_errors_total counter",
                 *(f'llmbatch_simulator_errors_total{{model="{esc(m)}",kind="{esc(k)}"}} {n}'
                   for m, c in by_model for k, n in sorted(c.errors.items())),
                 "# HELP llmbatch_simulator_in_flight Requests being answered now",
                 "# TYPE llmbatch_simulator_in_flight gauge",
                 f"llmbatch_simulator_in_flight {sim.stats.total.in_flight}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def post_reset(request):
        sim.reset()
        return json_response({"reset": True})

    async def get_config(request):
        return json_response(_config_view(sim))

    async def post_config(request):
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of settings")
            sim.configure(config_from_options(None, **{**dataclasses.asdict(sim.config), **changes}))
        except (ValueError, TypeError, LLMBatchError) as e:
            return json_response({"error": str(e)}, status=400)
        _changed(request, f"changed ({', '.join(sorted(changes))})")
        return json_response(_config_view(sim))

    async def delete_config(request):
        sim.configure(sim.startup_config)
        _changed(request, "reset to the startup configuration")
        return json_response(_config_view(sim))

    def keys(restore: bool):
        async def handler(request):
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("key"), str) or not body["key"]:
                return json_response({"error": "send {\"key\": ..., \"provider\": ... (optional)}"}, 400)
            provider = body.get("provider")
            if provider is not None and provider not in sim.providers:
                return json_response({"error": f"unknown provider {provider!r}"}, 404)
            done = sim.accounts.revoke(body["key"], provider, restore=restore)
            if not done:
                return json_response({"error": "no provider accepts that key"}, 404)
            return json_response({"restored" if restore else "revoked": done})
        return handler

    async def healthz(request):
        return json_response({"ok": True, "simulator": True})

    r = app.router
    r.add_get("/_stats", get_stats)
    r.add_post("/_stats/batch_lines", post_batch_lines)
    r.add_get("/metrics", get_metrics)
    r.add_post("/_reset", post_reset)
    r.add_get("/_config", get_config)
    r.add_post("/_config", post_config)
    r.add_delete("/_config", delete_config)
    r.add_post("/_admin/keys/revoke", keys(False))
    r.add_post("/_admin/keys/restore", keys(True))
    r.add_get("/healthz", healthz)
