"""Issue 20's figures for providers as data and many keys, on the live stack against the simulator.

1. Three named OpenAI-compatible providers plus Anthropic in one job: each request priced at
   its own provider's price (the ledger against the simulator's billed USD, per provider), and
   each provider's limit held (the simulator's peak calls in 60 s against it, and no 429).
2. Two keys of one model at 300 and 150 rpm: calls split about 2 : 1, and no 429.
3. One of the two keys revoked at the simulator mid-job: the job completes on the other, the
   key leaves the rotation after a few 401s, and the alert row and the metric exist.

The windows: a peak call may fill ``rate_peak_share`` (0.7) of a key's limit, so a provider
of limit L serves 0.7 L calls in the first minute and the rest when the window slides.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipeline import metrics
from tests.integration.named_providers import (
    LLAMA, Named, chat, key, ledger_by_provider, named_stack, results, sim, since, submit, wait_job,
)

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
CLAUDE = "claude-3-5-haiku-latest"
#: provider -> rpm of its one key; the three named ones at prices of their own
THREE = [Named(f"tg-{RUN}", keys={"tg-1": key(120)}, input="0.88", output="0.88"),
         Named(f"fw-{RUN}", keys={"fw-1": key(90)}, input="0.90", output="0.95"),
         Named(f"di-{RUN}", keys={"di-1": key(60)}, input="0.35", output="0.40")]
ANTHROPIC_RPM = 60
DUO = Named(f"duo-{RUN}", keys={"big": key(300), "small": key(150)}, input="0.50", output="0.50")
REV = Named(f"rev-{RUN}", keys={"main": key(300), "spare": key(150)}, input="0.50", output="0.50")
AZURE = Named(f"az-{RUN}", kind="azure-openai", keys={"az-1": key()}, input="0.70", output="0.75")
WIN_RPM = 100
WIN = Named(f"win-{RUN}", keys={"w-1": key(WIN_RPM)}, input="0.10", output="0.10")
SHARE = 0.7   # rate_peak_share, the default


@pytest.fixture(scope="module")
def env(stack, tmp_path_factory):
    with named_stack(stack, tmp_path_factory.mktemp("providers"), THREE + [DUO, REV, AZURE, WIN],
                     anthropic_rpm=ANTHROPIC_RPM) as e:
        yield e


def _providers(stack) -> dict:
    return sim(stack, "GET", "/_stats")["providers"]


def test_three_named_providers_and_anthropic_each_priced_and_limited(stack, engine, env, tmp_path):
    limits = {p.name: next(iter(p.keys.values()))[2] for p in THREE} | {"anthropic": ANTHROPIC_RPM}
    # past each provider's share of its window: the window, not the job, sets the pace
    counts = {name: int(rpm * SHARE) + 20 for name, rpm in limits.items()}
    lines = [chat(f"{name}-{i}", CLAUDE if name == "anthropic" else f"{name}/{LLAMA}", f"question {i} for {name}")
             for name, n in counts.items() for i in range(n)]
    sim(stack, "POST", "/_reset")   # the built-in anthropic's tallies (its peak above all) are this job's alone
    before = _providers(stack).get("anthropic", {})
    t0 = time.monotonic()
    job = submit(env, tmp_path, lines)
    assert wait_job(engine, job, timeout=300) == "completed"
    took = since(t0)
    rows = results(engine, job)
    assert all(r["status"] == "succeeded" for r in rows), [r for r in rows if r["status"] != "succeeded"][:3]
    stats = _providers(stack)
    ledger = ledger_by_provider(rows)
    print(f"\njob {job}: {len(rows)} requests in {took} s")
    billed = {name: Decimal(stats[name]["billed_usd"])
              - (Decimal(before.get("billed_usd", "0")) if name == "anthropic" else 0) for name in limits}
    for name, rpm in limits.items():   # every provider's figures first, then the checks
        s = stats[name]
        print(f"  {name:12} requests {counts[name]:4} calls {s['calls']:4}  ledger ${ledger[name]}  simulator billed "
              f"${billed[name]}  peak {s['peak_calls_60s']}/min against {rpm} rpm (peak share {int(rpm * SHARE)})"
              f"  429s {s['429']}")
    for name, rpm in limits.items():
        s = stats[name]
        assert ledger[name] == billed[name], name                # priced at its own provider's price
        assert s["429"] == (before.get("429", 0) if name == "anthropic" else 0), name
        assert s["peak_calls_60s"] <= rpm, name                  # the limit held
        # and the pipeline's own share of it: a call counts from its send (74 against 62 before)
        assert s["peak_calls_60s"] <= int(rpm * SHARE) + 2, name
        assert s["peak_calls_60s"] >= int(rpm * SHARE) - 2, f"{name}: the window never bound"
    # the same model at three prices: each request's cost is its provider's price × its tokens
    for p in THREE:
        r = next(r for r in rows if r["provider"] == p.name)
        assert r["model"] == LLAMA and r["key_alias"] == next(iter(p.keys))
        assert r["cost_usd"] == (r["input_tokens"] * Decimal(p.input) + r["output_tokens"] * Decimal(p.output)) / 10**6
    assert took >= 55, "every provider got more calls than its first minute's share: the job must have waited"


def test_two_keys_split_calls_by_headroom_two_to_one(stack, engine, env, tmp_path):
    n = 300   # within the first minute's share of both keys (210 + 105)
    job = submit(env, tmp_path, [chat(f"d{i}", f"{DUO.name}/{LLAMA}", f"split {i}") for i in range(n)])
    assert wait_job(engine, job) == "completed"
    rows = results(engine, job)
    split = {alias: sum(r["key_alias"] == alias for r in rows) for alias in DUO.keys}
    keys = _providers(stack)[DUO.name]["keys"]
    print(f"\nsplit of {n} calls: {split} (ratio {split['big'] / max(1, split['small']):.2f}); simulator per key: "
          + ", ".join(f"{a}: {k['calls']} calls, {k['429']} 429s" for a, k in keys.items()))
    assert sum(split.values()) == n
    assert 1.7 <= split["big"] / split["small"] <= 2.3, split    # by headroom; round robin would give 1.0
    assert {a: k["calls"] for a, k in keys.items()} == split      # the simulator saw the same keys
    assert all(k["429"] == 0 for k in keys.values())


def _revocations(stack, provider: str, alias: str) -> float:
    total = 0.0
    for role in ("worker-immediate", "worker-peak"):
        text = urllib.request.urlopen(f"http://{stack.metrics_host}:{metrics.port_for(role, stack)}/metrics",
                                      timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("llmbatch_key_revocations_total{") and f'provider="{provider}"' in line \
                    and f'key="{alias}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_key_revoked_mid_job_leaves_the_rotation_and_the_job_completes(stack, engine, env, tmp_path):
    n = 400   # the first minute serves 315 (0.7 of 300 + 150): the rest waits for the windows to slide
    job = submit(env, tmp_path, [chat(f"r{i}", f"{REV.name}/{LLAMA}", f"revoke {i}") for i in range(n)])

    def served():
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job}).scalar()
    t0 = time.monotonic()
    while served() < 300:
        assert time.monotonic() - t0 < 120, f"only {served()} results after 120 s"
        time.sleep(0.2)
    _, main_secret, _ = REV.keys["main"]
    assert sim(stack, "POST", "/_admin/keys/revoke", {"key": main_secret, "provider": REV.name})["revoked"]
    revoked_at = served()
    assert wait_job(engine, job, timeout=300) == "completed"
    rows = results(engine, job)
    assert len(rows) == n and all(r["status"] == "succeeded" for r in rows)
    with engine.connect() as conn:
        alerts = conn.execute(sa.text("SELECT key_alias, status_code, reason FROM key_alerts WHERE provider = :p"),
                              {"p": REV.name}).mappings().all()
        refused = conn.execute(sa.text(
            "SELECT count(*) FROM attempts WHERE job_id = :j AND status_code = 401 AND key_alias = 'main'"),
            {"j": job}).scalar()
    on = {alias: sum(r["key_alias"] == alias for r in rows) for alias in REV.keys}
    stats = _providers(stack)[REV.name]
    print(f"\nrevoked 'main' at the simulator after {revoked_at} results; results by key {on}; "
          f"401s on record {refused}; alerts {[dict(a) for a in alerts]}; simulator per key: {stats['keys']}")
    assert [(a["key_alias"], a["status_code"]) for a in alerts] == [("main", 401)]   # one row, by alias
    # the calls its window admitted at once when it slid, before the first 401 was seen: at most
    # one window of it (28 and 50 in two runs), never the rest of the job
    assert 1 <= refused <= int(300 * SHARE), refused
    assert stats["revoked_keys"] == ["main"] and stats["keys"]["spare"]["401"] == 0
    assert stats["keys"]["main"]["401"] == refused
    # its first minute's share before the revocation, and not one call answered on it after
    assert stats["keys"]["main"]["successes"] == on["main"] <= int(300 * SHARE)
    assert on["spare"] == n - on["main"]
    assert _revocations(stack, REV.name, "main") == 1


def test_an_azure_deployment_answers_through_the_api_key_header(stack, engine, env, tmp_path):
    """kind azure-openai: the model's deployment in the path, ``api-key``, ``api-version``: the
    simulator's Azure routes answer only that shape."""
    job = submit(env, tmp_path, [chat(f"a{i}", f"{AZURE.name}/{LLAMA}", f"azure {i}") for i in range(10)])
    assert wait_job(engine, job) == "completed"
    rows = results(engine, job)
    stats = _providers(stack)[AZURE.name]
    print(f"\nazure: {len(rows)} succeeded, ledger ${ledger_by_provider(rows)[AZURE.name]}, "
          f"simulator billed ${stats['billed_usd']}, keys {list(stats['keys'])}")
    assert {r["key_alias"] for r in rows} == {"az-1"} and stats["keys"]["az-1"]["successes"] == 10
    assert ledger_by_provider(rows)[AZURE.name] == Decimal(stats["billed_usd"])


def test_immediate_work_fills_a_keys_whole_limit_and_never_more(stack, engine, env, tmp_path):
    """Immediate work may fill the whole limit of a key (peak only 0.7 of it): the provider sees
    at most its limit in any 60 s, and answers no 429."""
    lines = [dict(chat(f"w{i}", f"{WIN.name}/{LLAMA}", f"window {i}"), tier="immediate") for i in range(160)]
    job = submit(env, tmp_path, lines)
    assert wait_job(engine, job, timeout=300) == "completed"
    s = _providers(stack)[WIN.name]
    print(f"\nwindow: {s['calls']} calls, peak {s['peak_calls_60s']} in 60 s against {WIN_RPM} rpm, 429s {s['429']}")
    assert s["429"] == 0 and s["peak_calls_60s"] <= WIN_RPM
