"""Issue 25 item 1: a cancel is a state the scheduler carries out, whatever the provider batch's
state; lines the provider had not run are not billed, lines it ran are in the ledger, once.

States: ``creating`` (the provider paused with SIGSTOP while the creation request waits in it),
``submitted`` (in progress at the provider), ``ended`` (ended at the provider, not yet ingested:
the scheduler paused with SIGSTOP). The stack's scheduler (or one started for the module)
carries the cancel out. The provider's listing is the witness.
"""

from __future__ import annotations

import time

import pytest

from pipeline.stores.jobs import cancel_job
from tests.integration import provider_witness as pw
from tests.integration.conftest import wait_for
from tests.integration.execution_helpers import calls_of, simulator_config
from tests.integration.test_scheduler import _leader_pid, scheduler  # noqa: F401  (the fixture)

N = 100


def _terminal(engine, job: str) -> bool:
    c = pw.counts(engine, job)
    return bool(c) and not (set(c) - {"succeeded", "failed", "cancelled"})


def _ran(stack, provider: str, since: float) -> int:
    return sum(pw.provider_counts(stack, provider, since).values())


def _check(stack, engine, provider, job, since, at_return, state, out) -> dict:
    wait_for(lambda: _terminal(engine, job), timeout=120, what="the cancelled job's requests finished")
    seen = pw.provider_lines(stack, provider, pw.pids_of(job, N), since)
    billed = seen["billed"]
    c = pw.counts(engine, job)
    figures = {"state": state, "provider": provider, "ran_before_cancel_returned": at_return,
               "billed_by_provider": sum(billed.values()), "billed_after_cancel_returned":
               sum(billed.values()) - at_return, "ledger": pw.ledger_lines(engine, job), "requests": c,
               "cancel": out["provider_batches"]}
    print(f"\ncancel while {state} ({provider}): {figures}")
    assert all(v == 1 for v in billed.values()), f"a line billed twice: {figures}"
    assert figures["ledger"] == len(billed), f"the ledger is not the provider's bill: {figures}"
    assert c.get("succeeded", 0) == len(billed) and c.get("cancelled", 0) == N - len(billed), figures
    assert calls_of(stack, job) == 0, "lines the provider did not run were sent again (realtime)"
    return figures


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_cancel_while_creating(scheduler, stack, provider):
    """The issue's reproduction: 0 provider batches cancelled, then every line billed."""
    engine = scheduler
    since = time.time()
    with pw.paused(pw.stack_pid(stack, "simulator")):
        job = pw.held_job(engine, provider, N, tag="cancel-creating")
        wait_for(lambda: any(r["status"] == "creating" for r in pw.pb_rows(engine, job)), timeout=30,
                 what="the provider batch in 'creating'")
        # the creation request (OpenAI: its file upload) waits in the paused provider's socket
        wait_for(lambda: pw.bytes_waiting(stack) > 0, timeout=30, every=0.05, what="the request sent")
        time.sleep(0.2)
        out = cancel_job(job)
        at_return = 0     # the provider is stopped: it has run nothing
    f = _check(stack, engine, provider, job, since, at_return, "creating", out)
    # the provider created the batch from the request it held, then received the cancel: only the
    # lines it ran in between are billed (and ingested), never the whole batch
    assert f["billed_by_provider"] < N // 4, f


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_cancel_while_in_progress(scheduler, stack, provider):
    engine = scheduler
    since = time.time()
    with simulator_config(stack, batch_processing_s=30.0):
        job = pw.held_job(engine, provider, N, tag="cancel-running")
        wait_for(lambda: any(r["status"] == "submitted" for r in pw.pb_rows(engine, job)), timeout=60,
                 every=0.05, what="the provider batch submitted")
        out = cancel_job(job)
        at_return = _ran(stack, provider, since)
        f = _check(stack, engine, provider, job, since, at_return, "submitted", out)
    assert f["billed_after_cancel_returned"] == 0, f
    assert f["billed_by_provider"] < N, f


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_cancel_after_the_provider_ended_before_the_ingest(scheduler, stack, provider):
    engine = scheduler
    since = time.time()
    job = pw.held_job(engine, provider, N, tag="cancel-ended")
    wait_for(lambda: any(r["status"] == "submitted" for r in pw.pb_rows(engine, job)), timeout=60,
             every=0.05, what="the provider batch submitted")
    with pw.paused(_leader_pid(engine)):   # the scheduler stops before it sees the batch end
        wait_for(lambda: pw.provider_lines(stack, provider, pw.pids_of(job, N), since, timeout=60), timeout=70)
        out = cancel_job(job)
        at_return = _ran(stack, provider, since)
    f = _check(stack, engine, provider, job, since, at_return, "ended, not ingested", out)
    assert f["billed_after_cancel_returned"] == 0 and f["billed_by_provider"] == N == f["ledger"], f
