"""The ``api`` process stopped for a block, and a probe of a batch row's lock while its files are
written (tests/integration/test_api.py, test_api_anthropic.py)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import sqlalchemy as sa

from pipeline.stores import outcomes
from tests.integration.named_providers import _stack_sh

#: how long the probe waits for the row: a healthy transaction's lock is held for milliseconds
PROBE_WAIT = "5s"


@contextmanager
def api_stopped():
    """The stack's ``api`` stopped for the block (its mover would move the batch the test moves),
    started again after (``up`` waits until it answers)."""
    _stack_sh(dict(os.environ), "down", "api")
    try:
        yield
    finally:
        _stack_sh(dict(os.environ), "up", "api")


def probe_lock_while_writing(monkeypatch, engine, batch_id: str) -> dict:
    """Before the first result row is read for a file, lock ``batch_id``'s row from a connection of
    its own; ``{"lock": "free"}`` when it got it, else Postgres's refusal."""
    seen: dict = {}
    real = outcomes.iter_results

    def iter_results(conn, job_id):
        if "lock" not in seen:
            with engine.connect() as probe:
                probe.execute(sa.text(f"SET lock_timeout = '{PROBE_WAIT}'"))
                try:
                    probe.execute(sa.text("SELECT 1 FROM api_batches WHERE batch_id = :b FOR UPDATE"),
                                  {"b": batch_id}).all()
                    seen["lock"] = "free"
                except sa.exc.OperationalError as e:
                    seen["lock"] = str(e.orig).strip().splitlines()[0]
                probe.rollback()
        yield from real(conn, job_id)
    monkeypatch.setattr(outcomes, "iter_results", iter_results)
    return seen
