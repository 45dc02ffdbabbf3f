"""Prometheus metrics: every name starts with ``llmbatch_``; each process serves /metrics.

Public surface (other modules touch only these):

- ``record_outcomes(outcomes, attempts)``: the one hook for request outcomes,
  called by ``OutcomeWriter._write`` (workers/writer.py) after the rows commit;
- ``record_savings(outcomes)``: dollars saved by lever (``llmbatch_saved_usd_total``), from the
  outcomes' ``savings`` (pipeline/money/savings.py): through ``record_outcomes``, and by the
  batcher (cache hits) and the scheduler (provider batches) after their writes commit;
- ``count_cache_from(stats)``: the batcher's cache counters (``cache_hits``,
  ``cache_misses`` in its ``stats``) exported as ``llmbatch_cache_hits_total`` /
  ``llmbatch_cache_misses_total``;
- ``budget_alert(scope, threshold)``: a cap crossed 80 % or 100 % (pipeline/money/admin.py);
- ``deadlines_missed(tier, n)`` / ``deadline_released(tier, n)``: the scheduler failed held
  requests at their deadline, or released held batches early to meet one (schedules/deadlines.py);
- ``window_collector(...)``: the scheduler's off-peak window state;
- ``BUDGET_DRIFT``: set by the budget reconcile (Redis counters against the ledger);
- ``LIMITER_WAIT`` (labels ``tier``, ``model``): observed by the rate limiter, seconds;
- ``KEY_CALLS`` (labels ``provider``, ``key``: the alias, ``status``): counted from the attempts
  by ``record_outcomes``; ``KEY_REVOKED``: a key out of the rotation (workers/limited.py);
- ``observe_consumer_lag(*consumers)``: the batcher's loop, throttled here;
- ``serve(role, settings)``: the CLI commands start the endpoint.

Processes and ports (``metrics_port`` = P, default 9100, shifted by ``port_offset``):
batcher P, worker-immediate P+1, worker-peak P+2, worker-offpeak P+3,
worker-background P+4, scheduler P+5; bound to ``metrics_host`` (127.0.0.1).
A Celery worker is a prefork pool: its processes write to files under
``var/metrics/worker-TIER`` (``PROMETHEUS_MULTIPROC_DIR``, which the worker
command sets, and empties, before this module is imported) and the parent
serves their sum.

Queue depth, held batches and the budget left per scope are read from
Postgres at scrape time by the batcher's endpoint (every batcher reports the same numbers: use ``max`` across
them). This module never raises into the caller: a metrics failure is logged
and the work goes on.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from pipeline.constants import REQUEST_OPEN, TIERS

log = logging.getLogger(__name__)

#: the metric objects of this module (the dashboards test reads their names from here)
REGISTRY = CollectorRegistry(auto_describe=True)

ROLE_PORT_OFFSET = {"batcher": 0, "worker-immediate": 1, "worker-peak": 2, "worker-offpeak": 3,
                    "worker-background": 4, "scheduler": 5}

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

REQUESTS = Counter("llmbatch_requests", "Requests finished, by tier, model and final status",
                   ["tier", "model", "status"], registry=REGISTRY)
TOKENS = Counter("llmbatch_tokens", "Tokens billed, by kind: input (incl. cached), cached, output",
                 ["tier", "model", "kind"], registry=REGISTRY)
COST = Counter("llmbatch_cost_usd", "Dollars spent, from provider usage and the price book",
               ["tier", "model"], registry=REGISTRY)
PROVIDER_LATENCY = Histogram("llmbatch_provider_latency_seconds",
                             "Provider latency of successful calls", ["tier", "model"],
                             buckets=_LATENCY_BUCKETS, registry=REGISTRY)
RETRIES = Counter("llmbatch_retries", "Provider attempts after the first", ["tier"], registry=REGISTRY)
RATE_LIMITED = Counter("llmbatch_provider_429", "429 (rate limited) answers from providers", ["tier"],
                       registry=REGISTRY)
BUDGET_ALERTS = Counter("llmbatch_budget_alerts", "Budget alerts raised: a cap crossed 80 or 100 percent",
                        ["scope", "threshold"], registry=REGISTRY)
DEADLINES_MISSED = Counter("llmbatch_deadlines_missed", "Requests failed deadline_missed: still held at their"
                           " deadline (tier they were held in)", ["tier"], registry=REGISTRY)
DEADLINE_RELEASES = Counter("llmbatch_deadline_releases", "Held batches released before the window to meet a"
                            " deadline (tier they were held in)", ["tier"], registry=REGISTRY)
UP = Gauge("llmbatch_up", "1 while this process serves metrics", ["role"], multiprocess_mode="max",
           registry=REGISTRY)
#: set by the scheduler's budget reconcile (pipeline/money/ledger.py ``reconcile``): 0 when Redis agrees with the ledger
BUDGET_DRIFT = Gauge("llmbatch_budget_drift_usd", "Dollars the budget counters differed from the ledger at the"
                     " last reconcile (then corrected)", multiprocess_mode="mostrecent", registry=REGISTRY)
LIMITER_WAIT = Histogram("llmbatch_limiter_wait_seconds", "Time a request waited for the rate limiter",
                         ["tier", "model"], buckets=_WAIT_BUCKETS, registry=REGISTRY)
KEY_CALLS = Counter("llmbatch_key_calls", "Provider calls by provider, key alias (never the key) and status code",
                    ["provider", "key", "status"], registry=REGISTRY)
KEY_REVOKED = Counter("llmbatch_key_revocations", "Provider keys taken out of the rotation after a 401/403,"
                      " by provider and key alias", ["provider", "key"], registry=REGISTRY)
SAVED = Counter("llmbatch_saved_usd", "Dollars saved against list price (the same usage, realtime, no cache),"
                " by lever: cache, coalesce, batch, flex, prompt_cache, price_window", ["lever"], registry=REGISTRY)
#: set every scheduler tick (schedules/pb_queue.py ``at_risk``): 0 unless results may be lost
PROVIDER_BATCH_RESULTS_AT_RISK = Gauge(
    "llmbatch_provider_batch_results_at_risk", "Provider batches whose results are not copied into Postgres"
    " and go within provider_batch_copy_margin_s", multiprocess_mode="mostrecent", registry=REGISTRY)
CONSUMER_LAG = Gauge("llmbatch_kafka_consumer_lag", "Messages behind the partition's end (batcher)",
                     ["partition"], multiprocess_mode="mostrecent", registry=REGISTRY)

#: gauges the batcher's endpoint computes from Postgres and Redis at scrape time
DB_GAUGES = {
    "llmbatch_queue_depth": "Requests not finished, by tier and state (queued, held, running, deferred)",
    "llmbatch_budget_remaining_usd": "Dollars left in a budget scope's period (global, tier:T, job:J of open"
                                     " jobs): the cap minus the ledger's spend",
    "llmbatch_held_batches": "Batches held in Postgres for the scheduler, by tier",
    "llmbatch_celery_queue_length": "Batch tasks waiting in a tier's Celery queue",
}

_context = {"tier": "unknown"}


def budget_alert(scope: str, threshold: int) -> None:
    """Count an alert (``scope``: global, tier or job; ``threshold``: 80 or 100). Never raises."""
    try:
        BUDGET_ALERTS.labels(scope, str(threshold)).inc()
    except Exception:
        log.exception("recording a budget alert metric failed")


def deadlines_missed(tier: str, n: int) -> None:
    """Count requests failed ``deadline_missed`` (schedules/deadlines.py). Never raises."""
    try:
        DEADLINES_MISSED.labels(tier).inc(n)
    except Exception:
        log.exception("recording a missed-deadline metric failed")


def deadline_released(tier: str, n: int) -> None:
    """Count held batches released early for a deadline. Never raises."""
    try:
        DEADLINE_RELEASES.labels(tier).inc(n)
    except Exception:
        log.exception("recording a deadline-release metric failed")


class _CacheCollector:
    """The batcher's response-cache counters, read from its ``stats`` when scraped."""

    def __init__(self):
        self.stats: dict | None = None

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        stats = self.stats or {}
        for name, key, text in (("llmbatch_cache_hits", "cache_hits", "Requests answered from the response cache"),
                                ("llmbatch_cache_misses", "cache_misses",
                                 "Cacheable requests the cache could not answer")):
            family = CounterMetricFamily(name, text)
            if self.stats is not None:
                family.add_metric([], stats.get(key, 0))
            yield family


_CACHE = _CacheCollector()
REGISTRY.register(_CACHE)


def count_cache_from(stats: dict) -> None:
    """Export the batcher's ``stats["cache_hits"]`` / ``["cache_misses"]`` (pipeline/intake/batcher.py)."""
    _CACHE.stats = stats


class WindowCollector:
    """The off-peak window as the scheduler sees it: open (1/0) and the next change (Unix time).

    Built by the scheduler's command from its window (pipeline/intake/windows.py) and
    clock, passed in as callables: pipeline imports no schedules code.
    """

    def __init__(self, is_open, next_change, now):
        self.is_open, self.next_change, self.now = is_open, next_change, now

    def describe(self):
        return []

    def collect(self):
        opened = GaugeMetricFamily("llmbatch_offpeak_window_open", "1 while the off-peak window is open")
        change = GaugeMetricFamily("llmbatch_offpeak_window_next_change_timestamp_seconds",
                                   "When the off-peak window next opens or closes (Unix time)")
        try:
            now = self.now()
            opened.add_metric([], 1 if self.is_open(now) else 0)
            nxt = self.next_change(now)
            if nxt is not None:
                change.add_metric([], nxt.timestamp())
        except Exception as e:
            log.warning("off-peak window state not read: %s", e)
            return []
        return [opened, change]


def set_tier(tier: str) -> None:
    """The tier this worker process is executing (labels the outcomes it records)."""
    _context["tier"] = tier


def record_outcomes(outcomes: list[dict], attempts: list[dict]) -> None:
    """Count finished requests, tokens, cost, latency, retries and 429s. Never raises."""
    try:
        tier = _context["tier"]
        for o in outcomes:
            model = o.get("model") or "unknown"
            REQUESTS.labels(tier, model, o.get("status") or "unknown").inc()
            for kind, key in (("input", "input_tokens"), ("cached", "cached_input_tokens"),
                              ("output", "output_tokens")):
                if o.get(key):
                    TOKENS.labels(tier, model, kind).inc(o[key])
            spent = float(o.get("cost_usd") or 0)
            if spent:
                COST.labels(tier, model).inc(spent)
            if o.get("latency_ms") is not None and o.get("response") is not None and not o.get("from_cache"):
                PROVIDER_LATENCY.labels(tier, model).observe(o["latency_ms"] / 1000)
        record_savings(outcomes)
        for a in attempts:
            if (a.get("attempt") or 1) > 1:
                RETRIES.labels(tier).inc()
            if a.get("status_code") == 429:
                RATE_LIMITED.labels(tier).inc()
            if a.get("key_alias"):
                KEY_CALLS.labels(a.get("provider") or "unknown", a["key_alias"],
                                 str(a.get("status_code") or "none")).inc()
    except Exception:  # metrics must never fail a batch
        log.exception("recording metrics failed")


def record_savings(outcomes: list[dict]) -> None:
    """Count what each lever saved (``savings`` of ``Outcome.to_row()``s, once durable): the workers'
    outcomes through ``record_outcomes``, the batcher's cache hits and the scheduler's provider
    batches directly. Never raises."""
    try:
        for o in outcomes:
            for lever, usd in (o.get("savings") or {}).items():
                # a counter only grows: a lever that cost more (a prompt-cache write) is in the ledger only
                if float(usd) > 0:
                    SAVED.labels(lever).inc(float(usd))
    except Exception:  # metrics must never fail a write
        log.exception("recording savings metrics failed")


_lag_checked = [0.0]


def observe_consumer_lag(*consumers, every_s: float = 5.0) -> None:
    """Set ``llmbatch_kafka_consumer_lag`` per assigned partition, at most every ``every_s``.

    Only from what the consumer already knows (its positions, and the high
    watermarks its fetches brought back): a request to the broker here waits
    behind the consumer's own long-poll fetch on the same connection, and
    stalled the batcher, and every immediate request, for seconds.
    A partition not fetched from yet is left out until it is.
    """
    now = time.monotonic()
    if now - _lag_checked[0] < every_s:
        return
    _lag_checked[0] = now
    for consumer in consumers:
        try:
            for tp in consumer.position(consumer.assignment()):
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    CONSUMER_LAG.labels(f"{tp.topic}[{tp.partition}]").set(max(0, high - tp.offset))
        except Exception as e:  # a rebalance in progress: try again next time
            log.debug("consumer lag not measured: %s", e)


# ------------------------------------------------------------------ serving

class _StateCollector:
    """Queue depth, held batches and Celery queue lengths, read when Prometheus scrapes."""

    def __init__(self, settings, engine, cache_s: float = 5.0):
        self.settings = settings
        self.engine = engine   # a callable returning the Postgres engine: this module imports no store
        self.cache_s = cache_s
        self._cached: tuple[float, list] = (0.0, [])

    def describe(self):
        return []

    def collect(self):
        now = time.monotonic()
        if now - self._cached[0] > self.cache_s:
            self._cached = (now, self._read())
        return self._cached[1]

    def _read(self) -> list:
        import sqlalchemy as sa

        depth = GaugeMetricFamily("llmbatch_queue_depth", DB_GAUGES["llmbatch_queue_depth"],
                                  labels=["tier", "state"])
        held = GaugeMetricFamily("llmbatch_held_batches", DB_GAUGES["llmbatch_held_batches"], labels=["tier"])
        celery_q = GaugeMetricFamily("llmbatch_celery_queue_length", DB_GAUGES["llmbatch_celery_queue_length"],
                                     labels=["tier"])
        try:
            with self.engine().connect() as conn:
                counts = {(t, s): n for t, s, n in conn.execute(sa.text(
                    "SELECT tier, status, count(*) FROM requests"
                    " WHERE status <> ALL(llmbatch_states('request_terminal')) GROUP BY 1, 2"))}
                batches = dict(conn.execute(sa.text(
                    "SELECT tier, count(*) FROM batches WHERE status = 'held' GROUP BY 1")).all())
                budgets = self._budgets(conn)
            for tier in TIERS:
                for state in REQUEST_OPEN:
                    depth.add_metric([tier, state], counts.get((tier, state), 0))
                held.add_metric([tier], batches.get(tier, 0))
            remaining = GaugeMetricFamily("llmbatch_budget_remaining_usd", DB_GAUGES["llmbatch_budget_remaining_usd"],
                                          labels=["scope"])
            for scope, left in sorted(budgets.items()):
                remaining.add_metric([scope], float(left))
        except Exception as e:
            log.warning("queue depth not read from Postgres: %s", e)
            return []
        try:
            import redis

            from pipeline.constants import queue_for
            r = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2)
            for tier in TIERS:
                celery_q.add_metric([tier], r.llen(queue_for(tier)))
        except Exception as e:
            log.warning("Celery queue lengths not read from Redis: %s", e)
            return [depth, held, remaining]
        return [depth, held, celery_q, remaining]

    def _budgets(self, conn) -> dict:
        """Cap minus spend: caps set with ``budget set`` and open jobs' caps (the budget_status view),
        and the daily caps from the settings that ``budget set`` did not override."""
        import sqlalchemy as sa
        from decimal import Decimal
        out = {scope: cap - spent for scope, cap, spent in conn.execute(sa.text(
            "SELECT scope, cap_usd, spent_usd FROM budget_status WHERE scope NOT LIKE 'job:%'"
            " OR substr(scope, 5) IN (SELECT job_id FROM jobs"
            "   WHERE status = ANY(llmbatch_states('job_open')))"))}
        configured = {"global": self.settings.budget_global_daily_usd or None}
        configured.update({f"tier:{t}": v for t, v in (self.settings.budget_tier_daily_usd or {}).items()})
        missing = {k: v for k, v in configured.items() if v not in (None, "") and k not in out}
        if missing:
            today = dict(conn.execute(sa.text(
                "SELECT q.tier, sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id)"
                " WHERE x.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
                " GROUP BY 1")).all())
            for scope, cap in missing.items():
                spent = sum(today.values(), Decimal(0)) if scope == "global" else today.get(scope[5:], Decimal(0))
                out[scope] = Decimal(str(cap)) - (spent or Decimal(0))
        return out


def port_for(role: str, settings) -> int:
    return settings.metrics_port + ROLE_PORT_OFFSET[role]


def multiprocess_enabled() -> bool:
    from prometheus_client import values
    return getattr(values.ValueClass, "_multiprocess", False)


def serve(role: str, settings, *, state_engine=None, collectors=()) -> int | None:
    """Start this process's /metrics endpoint on a daemon thread; returns the port (None: off).

    ``state_engine`` (a callable returning the Postgres engine): also serve the queue depth,
    held batches, Celery queue lengths and budgets, read when Prometheus scrapes (the batcher).

    Every endpoint answers with samples from its start: ``llmbatch_up``, and for a
    worker its tier's retry and 429 counters at 0 (a worker that has not run a
    batch yet has nothing else to say, and an empty body looks like a fault).
    """
    from prometheus_client import start_http_server
    if not settings.metrics_port:
        return None
    UP.labels(role).set(1)
    if role.startswith("worker-"):
        tier = role[len("worker-"):]
        RETRIES.labels(tier)
        RATE_LIMITED.labels(tier)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    if state_engine is not None:
        registry.register(_StateCollector(settings, state_engine))
    for collector in collectors:
        registry.register(collector)
    port = port_for(role, settings)
    try:
        start_http_server(port, addr=settings.metrics_host, registry=registry)
    except OSError as e:
        log.warning("metrics endpoint %s:%d not started: %s", settings.metrics_host, port, e)
        return None
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    return port


def mark_process_dead(pid: int) -> None:
    """A pool process ended: drop its live gauges (counters keep their totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def exported_names() -> set[str]:
    """Every sample name the endpoints can expose (``_total``, ``_bucket`` … included)."""
    names = set(DB_GAUGES) | {"llmbatch_offpeak_window_open",
                               "llmbatch_offpeak_window_next_change_timestamp_seconds"}
    for metric in REGISTRY.collect():
        base = metric.name
        if metric.type == "counter":
            names.update({f"{base}_total", f"{base}_created"})
        elif metric.type == "histogram":
            names.update({f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"})
        else:
            names.add(base)
    return names
