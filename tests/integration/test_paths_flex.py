"""``--mode flex`` end to end on the stack (submit, batcher, workers, simulator), against the
simulator's own bill (``/_stats``: it prices with its own table, never the pipeline's).

1. A flex job is billed at the flex price: every request answered by flex, the ledger equal to what
   the simulator billed, and half the list price (gpt-5-mini's batch discount).
2. With 30 % of flex calls answered 429 "resource unavailable": every request still completes (at
   standard, at once), those 429s are not billed by the simulator nor counted by the ledger, and
   the results that standard answered say so (``results.service_tier``).
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import sqlalchemy as sa

from tests.integration.conftest import chat_line, llmbatch, wait_for, write_jsonl
from tests.integration.execution_helpers import sim_stats, simulator_config

MODEL = "gpt-5-mini"   # the price book marks it flex; its batch discount is 0.5
#: results.cost_usd is numeric(18, 8): each row's exact cost is rounded (half up) to 1e-8 when stored
ROUNDING = Decimal("0.000000005")


def _openai(settings) -> dict:
    return sim_stats(settings)["providers"]["openai"]


def _job(tmp_path, n: int, tag: str, *args: str, deadline: str | None = None) -> str:
    lines = [chat_line(f"{tag}{i}", f"Flex {tag} {uuid.uuid4().hex[:8]}: name a city with {i + 3} letters.",
                       model=MODEL, max_tokens=24) for i in range(n)]
    if deadline:
        for line in lines:
            line["deadline"] = deadline
    path = write_jsonl(tmp_path / f"{tag}.jsonl", lines)
    proc = llmbatch("submit", path, "--json", *(args or ("--mode", "flex")), check=True)
    return json.loads(proc.stdout)["job_id"]


def _finished(engine, job: str, n: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND status IN ('succeeded', 'failed', 'cancelled')"),
            {"j": job}).scalar() == n


def _results(engine, job: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT q.status, x.path, x.lever, x.service_tier, x.cost_usd, x.list_cost_usd"
            " FROM requests q LEFT JOIN results x USING (job_id, custom_id) WHERE q.job_id = :j"),
            {"j": job}).mappings()]


def _run(stack, engine, tmp_path, n: int, tag: str, *args: str,
         deadline: str | None = None) -> tuple[list[dict], dict, dict]:
    before = _openai(stack)
    job = _job(tmp_path, n, tag, *args, deadline=deadline)
    wait_for(lambda: _finished(engine, job, n), timeout=180, every=0.5, what=f"{n} flex requests finished")
    return _results(engine, job), before, _openai(stack)


def test_a_flex_job_is_billed_at_the_flex_price(stack, engine, tmp_path):
    n = 60
    rows, before, after = _run(stack, engine, tmp_path, n, "fx")
    assert [r["status"] for r in rows] == ["succeeded"] * n, rows[:3]
    assert {(r["path"], r["service_tier"], r["lever"]) for r in rows} == {("flex", "flex", "flex")}
    ledger = sum(r["cost_usd"] for r in rows)
    listed = sum(r["list_cost_usd"] for r in rows)
    billed = Decimal(after["billed_usd"]) - Decimal(before["billed_usd"])
    assert after["flex_calls"] - before["flex_calls"] == n
    assert abs(ledger - billed) <= n * ROUNDING, f"ledger ${ledger} vs simulator billed ${billed}"
    assert abs(ledger - listed / 2) <= n * ROUNDING and ledger > 0, f"ledger ${ledger}, list ${listed}"
    print(f"\nFLEX n={n} ledger=${ledger} simulator_billed=${billed} list=${listed}"
          f" flex_calls={after['flex_calls'] - before['flex_calls']}")


def test_flex_unavailable_goes_on_at_standard_and_is_not_billed(stack, engine, tmp_path):
    n = 100
    with simulator_config(stack, flex_unavailable_rate=0.3):
        rows, before, after = _run(stack, engine, tmp_path, n, "fu")
    assert [r["status"] for r in rows] == ["succeeded"] * n, rows[:3]
    refused = after["flex_unavailable_429"] - before["flex_unavailable_429"]
    standard = [r for r in rows if r["service_tier"] == "default"]
    flex = [r for r in rows if r["service_tier"] == "flex"]
    assert len(standard) + len(flex) == n
    assert 15 <= refused <= 45, refused   # about 30 % of n
    assert len(standard) == refused, f"{len(standard)} answered at standard, {refused} flex 429s"
    assert after["flex_calls"] - before["flex_calls"] == n   # one flex try per request (no other errors here)
    ledger = sum(r["cost_usd"] for r in rows)
    billed = Decimal(after["billed_usd"]) - Decimal(before["billed_usd"])
    assert abs(ledger - billed) <= n * ROUNDING, f"ledger ${ledger} vs simulator billed ${billed} (a 429 billed?)"
    assert all(r["cost_usd"] == r["list_cost_usd"] and r["lever"] is None for r in standard)
    assert all(abs(r["cost_usd"] * 2 - r["list_cost_usd"]) <= 3 * ROUNDING for r in flex)
    print(f"\nFLEX-429 n={n} flex_429={refused} standard={len(standard)} ledger=${ledger} "
          f"simulator_billed=${billed} calls={after['calls'] - before['calls']}")


def test_under_auto_a_near_deadline_takes_flex_and_its_429s_go_on_at_standard_in_time(stack, engine, tmp_path):
    """Issue 21's flex figure under the cost engine: a background job under ``--mode auto`` due in 40
    minutes (too near for a provider batch) takes flex, the cheapest path that meets it; with 30 %
    of flex calls answered 429, every request still ends before its deadline, and the 429s are not
    billed."""
    from datetime import datetime, timedelta, timezone
    n = 60
    due = datetime.now(timezone.utc) + timedelta(minutes=40)
    with simulator_config(stack, flex_unavailable_rate=0.3):
        rows, before, after = _run(stack, engine, tmp_path, n, "fa", "--mode", "auto", "--tier", "background",
                                   deadline=due.isoformat())
    with engine.connect() as conn:
        late = conn.execute(sa.text(
            "SELECT count(*) FROM requests q JOIN results x USING (job_id, custom_id)"
            " WHERE q.job_id = (SELECT job_id FROM requests WHERE custom_id = 'fa0' ORDER BY created_at DESC LIMIT 1)"
            " AND x.created_at > q.deadline")).scalar()
    refused = after["flex_unavailable_429"] - before["flex_unavailable_429"]
    standard = [r for r in rows if r["service_tier"] == "default"]
    assert [r["status"] for r in rows] == ["succeeded"] * n, rows[:3]
    assert {r["path"] for r in rows} == {"flex"}, {r["path"] for r in rows}   # the chooser's pick
    assert refused > 0 and len(standard) == refused and late == 0, (refused, len(standard), late)
    ledger = sum(r["cost_usd"] for r in rows)
    billed = Decimal(after["billed_usd"]) - Decimal(before["billed_usd"])
    assert abs(ledger - billed) <= n * ROUNDING, f"ledger ${ledger} vs simulator billed ${billed} (a 429 billed?)"
    print(f"\nAUTO-FLEX n={n} path=flex flex_429={refused} standard={len(standard)} late=0 ledger=${ledger} "
          f"simulator_billed=${billed}")
