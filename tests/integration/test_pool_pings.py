"""A pooled connection is pinged only after sitting idle, and a dead one never reaches a caller
twice (issue 23).

``pool_pre_ping`` pinged at every checkout: one round trip in five of an immediate request's to
Postgres. ``db.ping_when_idle`` pings only a connection idle for ``idle_s``; these tests run it on
an engine of their own, on the stack's Postgres, with a clock they move.
"""

from __future__ import annotations

import sqlalchemy as sa

from pipeline.stores import db


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine(url, clock: Clock, pings: list) -> sa.Engine:
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    db.ping_when_idle(engine, idle_s=2.0, clock=clock)
    ping = engine.dialect.do_ping

    def counted(dbapi_connection):
        pings.append(clock())
        return ping(dbapi_connection)
    engine.dialect.do_ping = counted
    return engine


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()


def _terminate(admin, pid: int) -> None:
    with admin.begin() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


def test_a_connection_back_moments_ago_goes_out_unpinged_and_an_idle_one_is_pinged(stack, engine):
    clock, pings = Clock(), []
    mine = _engine(engine.url, clock, pings)
    try:
        first = _backend_pid(mine)       # a new connection: just made, not pinged
        clock.now += 1.9
        assert _backend_pid(mine) == first
        clock.now += 1.9
        assert _backend_pid(mine) == first
        assert pings == [], "a connection checked in under 2 s ago was pinged"
        clock.now += 2.0
        assert _backend_pid(mine) == first
        assert pings == [clock.now], "a connection idle for 2 s went out unpinged"
    finally:
        mine.dispose()


def test_a_connection_that_died_while_idle_is_replaced_at_checkout(stack, engine):
    clock, pings = Clock(), []
    mine = _engine(engine.url, clock, pings)
    try:
        dead = _backend_pid(mine)
        _terminate(engine, dead)         # Postgres restarted, or an operator ended the session
        clock.now += 5.0
        assert _backend_pid(mine) != dead   # no error reached the caller
        assert len(pings) == 1
    finally:
        mine.dispose()


def test_a_connection_that_died_moments_after_use_fails_once_and_retrying_gets_through(stack, engine):
    clock, pings = Clock(), []
    mine = _engine(engine.url, clock, pings)
    try:
        dead = _backend_pid(mine)
        _terminate(engine, dead)
        waits = []
        pid = db.retrying(mine, lambda conn: conn.execute(sa.text("SELECT pg_backend_pid()")).scalar(),
                          what="a statement on a connection killed unpinged", patience_s=10, sleep=waits.append)
        assert pid != dead
        assert len(waits) == 1, "the dead connection should fail exactly one try, then be replaced"
        assert pings == []
    finally:
        mine.dispose()


def test_a_transaction_block_that_runs_once_never_gets_a_connection_that_died_just_after_use(stack, engine):
    """``db.transaction`` retries only its connect, never its block (a submit's checkpoint, a
    purge): its connection is pinged whatever its idle time, as ``pool_pre_ping`` did for all."""
    clock, pings = Clock(), []
    mine = _engine(engine.url, clock, pings)
    try:
        dead = _backend_pid(mine)
        _terminate(engine, dead)   # moments after its use: the pool hands it out unpinged
        with db.transaction(mine, patience_s=10) as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() != dead
        assert len(pings) == 1
    finally:
        mine.dispose()


def test_the_process_engine_does_not_ping_a_connection_it_just_had_back(stack, monkeypatch):
    engine = db.get_engine()
    with engine.connect() as conn:   # one connection in the pool, just checked in
        conn.execute(sa.text("SELECT 1"))
    pings = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(1) or ping(c))
    for _ in range(5):
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT 1"))
    assert len(pings) == 0, f"{len(pings)} pings for 5 transactions back to back: a round trip each"


def test_each_statement_work_runs_without_a_transaction_around_it(stack, engine):
    """``retrying(each_statement=True)`` sends no BEGIN: each statement is a transaction of its
    own (two reads of the transaction id differ; in one transaction they are the same)."""
    xids = db.retrying(engine, lambda conn: [conn.execute(sa.text("SELECT pg_current_xact_id()")).scalar()
                                             for _ in range(2)], what="two statements", each_statement=True)
    assert xids[0] != xids[1]
    together = db.retrying(engine, lambda conn: [conn.execute(sa.text("SELECT pg_current_xact_id()")).scalar()
                                                 for _ in range(2)], what="two statements")
    assert together[0] == together[1]
