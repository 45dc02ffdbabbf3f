"""The ``llmbatch`` command line: thin wiring; the work is in the modules it calls.

Verbs here: ``submit``, ``status JOB [--watch]``, ``jobs``, ``results JOB``,
``rejections JOB``, ``report``, ``sql``, ``doctor``. Their own modules: the local stack ``up``,
``down``, ``ps`` (llmbatch/cli/stack.py); the processes ``batcher``, ``worker``, ``simulator``
and ``db upgrade`` (llmbatch/cli/processes.py); ``budget``, ``schedule``/``scheduler``/``cancel``,
``kafka add-producer|remove-producer``, ``keys``, ``webhooks``.

Exit codes (every command):

* 0 success (``submit --wait``, ``status --watch``: the job is ``completed``,
  every request succeeded);
* 1 the job or command failed: ``submit --wait`` and ``status --watch`` when
  any request failed or was cancelled (``completed_with_errors``, ``failed``,
  ``cancelled``) or the job paused on its budget; a query error; a ``doctor``
  finding about settings or files;
* 2 bad usage or input (missing or empty file, unknown job, bad option);
* 3 a service is unreachable (Postgres, Redis, Kafka, workers: ``doctor``
  says which and how to fix it);
* 130 interrupted.

Every read command takes ``--json``. Logging handlers are set up here and
nowhere else (pipeline/logs.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.parse
from pathlib import Path

import click

from pipeline.paths.registry import modes as path_modes
from pipeline.config import get_settings
from pipeline import jsontext
from pipeline.constants import JOB_STATES, JOB_TERMINAL, SIMULATOR_LABEL, TIERS
from pipeline.stores import db, jobs as job_store, outcomes

from pipeline.errors import FileInputError, InfrastructureError, LLMBatchError
from llmbatch.cli.budget import CAP_USD as _CAP_USD  # the one validation of a typed cap
from llmbatch.cli.common import fail, setup_logging

log = logging.getLogger("llmbatch.cli")


def _provider_note() -> None:
    if get_settings().simulated:
        click.echo(f"provider: {SIMULATOR_LABEL}", err=True)


@click.group()
@click.option("--log-level", default="WARNING", show_default=True, help="Log level for this command.")
def main(log_level: str) -> None:
    """llmbatch: tiered, budgeted batch processing of LLM requests."""
    setup_logging(log_level)


# ------------------------------------------------------------------ jobs

def _progress_printer():
    tty = sys.stderr.isatty()

    def show(report):
        rate = report.lines_read / report.elapsed if report.elapsed > 0 else 0.0
        text = (f"read {report.lines_read}  accepted {report.accepted}  rejected {report.rejected}"
                f"  {rate:,.0f} lines/s")
        if tty:
            click.echo(f"\r{text}   ", err=True, nl=False)
    return show


def _wait(job_id: str, poll_s: float = 0.5) -> dict:
    """Follow the job until it ends: a progress line on a terminal, one line per change otherwise
    (llmbatch/cli/views.py ``follow``), with what is held and until when."""
    from llmbatch.cli import views
    engine = db.get_engine()
    with db.transaction(engine):   # waits out a Postgres restart, with one line
        pass
    return views.follow(engine, job_id, interval=poll_s)


def _print_status(status: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status))
        return
    c = status["counts"]
    click.echo(f"job {status['job_id']}  {status['status']}  (provider: {status['provider']})")
    click.echo(f"  lines {c['total']}  accepted {c['accepted']}  rejected {c['rejected']}")
    click.echo(f"  succeeded {c['succeeded']}  failed {c['failed']}  cancelled {c['cancelled']}"
               f"  pending {c['pending']}")
    from llmbatch.cli.views import money
    click.echo(f"  cost ${money(status['cost_usd'])}")
    from llmbatch.cli.views import savings_line
    if status.get("savings") and savings_line(status["savings"]):
        click.echo(f"  {savings_line(status['savings'])}")
    if status["budget"]["fallback_model"]:
        click.echo(f"  fallback {status['budget']['fallback_model']}: answered"
                   f" {status['budget']['answered_by_fallback']}")


@main.command()
@click.argument("file", type=click.Path(path_type=Path, allow_dash=True))
@click.option("--priority", type=click.IntRange(0, 9), help="Default priority for lines without one.")
@click.option("--tier", type=click.Choice(TIERS), help="Run every line in this tier.")
@click.option("--budget-usd", type=_CAP_USD, help="Cap on the job's spend (finite, 0 or more).")
@click.option("--on-budget", type=click.Choice(["defer", "fail"]), default="defer", show_default=True)
@click.option("--name", help="A name for the job (default: the file name).")
@click.option("--wait", is_flag=True, help="Wait until the job is finished (progress, and what is held until when).")
@click.option("--resume", "resume_job", metavar="JOB",
              help="Continue an interrupted submit of the same FILE into job JOB, from the line after its last.")
@click.option("--json", "as_json", is_flag=True, help="Print the job status as JSON.")
@click.option("--mode", type=click.Choice(list(path_modes())), default="auto", show_default=True,
              help="The path: auto (the cost engine: immediate and peak realtime, off-peak and background the cheapest"
                   " path expected by the deadline, 24 h without one); or forced: realtime; flex: service_tier flex at"
                   " the flex (batch) price, for the models that take it (standard when flex is unavailable);"
                   " provider_batch: through the provider's Batch API at half price (needs `llmbatch scheduler`);"
                   " window: held for the model's cheapest price window.")
@click.option("--batch-fallback", type=click.Choice(["realtime", "fail"]), default="realtime", show_default=True,
              help="provider_batch: what happens to requests the provider batch did not run (expired, failed).")
@click.option("--fallback-model", metavar="MODEL",
              help="A cheaper model of the same provider that answers when a line's model is over its "
                   "budget or rate limit; results.model records which model answered.")
def submit(file, priority, tier, budget_usd, on_budget, name, wait, resume_job, as_json, mode, batch_fallback,
           fallback_model):
    """Submit a JSONL file (OpenAI or Anthropic batch lines) as a job.

    FILE may be gzip-compressed (recognised by its content), or - to read standard input.
    """
    from pipeline.intake.producer import submit_file
    _provider_note()
    try:
        report = submit_file(file, priority=priority, tier=tier, budget_usd=budget_usd,
                             on_budget=on_budget, name=name, mode=mode, fallback_model=fallback_model,
                             job_id=resume_job, resume=bool(resume_job), on_progress=_progress_printer())
        if batch_fallback != "realtime":
            from pipeline.stores.jobs import set_batch_fallback
            set_batch_fallback(report.job_id, batch_fallback)
    except FileInputError as e:
        fail(str(e), 2)
    except InfrastructureError as e:
        fail(f"{e}; run `llmbatch doctor`", 3)
    if sys.stderr.isatty():
        click.echo("", err=True)
    resumed = f" (resumed after line {report.resumed_from})" if report.resumed_from else ""
    click.echo(f"job {report.job_id}: {report.lines_read} lines{resumed}, {report.accepted} accepted, "
               f"{report.rejected} rejected ({report.elapsed:.1f} s)", err=True)
    if report.unacknowledged:
        click.echo(f"Kafka did not acknowledge lines: {', '.join(map(str, report.unacknowledged))}", err=True)
    _print_rejections(report)
    if report.interrupted:
        click.echo(f"interrupted after line {report.last_line}: job {report.job_id} keeps the {report.accepted}"
                   f" published requests and runs them.\n"
                   f"  resume: llmbatch submit {file} --resume {report.job_id}\n"
                   f"  cancel: llmbatch cancel {report.job_id}", err=True)
        click.echo(report.job_id)
        sys.exit(130)
    if report.accepted == 0 and report.unacknowledged:
        fail(f"Kafka ({get_settings().kafka_bootstrap}) acknowledged none of the {len(report.unacknowledged)}"
              f" requests; job {report.job_id} failed; run `llmbatch doctor`", 3)
    if report.accepted == 0 and not report.resumed_from:
        common = report.most_common_reason()
        why = f"; most common reason ({common[1]} of {report.rejected} lines): {common[0]}" if common else ""
        fail(f"no line of {file} was accepted{why}; job {report.job_id} failed", 2)
    if wait:
        try:
            status = _wait(report.job_id)
        except KeyboardInterrupt:
            _stopped_waiting(report.job_id)
        _print_status(status, as_json)
        # 'completed' only when every request succeeded (pipeline/stores/jobs.py refresh_jobs)
        sys.exit(0 if status["status"] == "completed" else 1)
    if as_json:
        from llmbatch.cli import views
        with db.get_engine().connect() as conn:
            click.echo(jsontext.dumps(views.job_view(conn, report.job_id)))
    else:
        click.echo(report.job_id)
        _print_held_after_submit(report.job_id)


def _print_rejections(report) -> None:
    """The first few rejected lines and the command that lists every one."""
    if not report.rejected:
        return
    for r in report.first_rejections:
        click.echo(f"  line {r['line']}: {r['reason']}", err=True)
    more = report.rejected - len(report.first_rejections)
    click.echo(f"  {'… ' + str(more) + ' more; ' if more > 0 else ''}all rejected lines:"
               f" llmbatch rejections {report.job_id}", err=True)


def _print_held_after_submit(job_id: str) -> None:
    """A job with held work says so at once, not hours later (issue 15)."""
    from llmbatch.cli import views
    try:
        with db.get_engine().connect() as conn:
            st = views.job_view(conn, job_id)
    except Exception:   # the job id is printed; this is only a hint
        return
    for h in (st or {}).get("held") or []:
        click.echo(f"held: {h['text']}", err=True)


def _stopped_waiting(job_id: str) -> None:
    click.echo(f"\nstopped waiting: job {job_id} goes on (`llmbatch status {job_id} --watch` follows it,"
               f" `llmbatch cancel {job_id}` stops it)", err=True)
    sys.exit(130)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", "-w", is_flag=True, help="Refresh until the job ends (plain lines when not a terminal).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
def status(job_id, as_json, watch, interval):
    """Show a job per tier: queued, held, running, deferred, done, failed; spend, rate, ETA."""
    from llmbatch.cli import views
    engine = _engine_or_exit()
    with engine.connect() as conn:
        st = views.job_view(conn, job_id)
    if st is None:
        fail(f"no job {job_id}", 2)
    if watch:
        try:
            st = views.watch(engine, job_id, interval=interval) if not as_json else _watch_json(engine, job_id, interval)
        except KeyboardInterrupt:
            _stopped_waiting(job_id)
        sys.exit(0 if st["status"] == "completed" else 1)
    click.echo(jsontext.dumps(st) if as_json else views.format_status(st))


def _watch_json(engine, job_id: str, interval: float) -> dict:
    from llmbatch.cli import views
    while True:
        with engine.connect() as conn:
            st = views.job_view(conn, job_id)
        click.echo(jsontext.dumps(st))
        if st["status"] in JOB_TERMINAL:
            return st
        time.sleep(interval)


def _engine_or_exit():
    """The engine, or exit 3 when Postgres does not answer."""
    import sqlalchemy as sa
    engine = db.get_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        fail(f"cannot reach Postgres ({get_settings().database_url.split('@')[-1]}): {e.orig};"
              " run `llmbatch doctor`", 3)
    return engine


@main.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File to write (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["openai", "anthropic", "csv"]), default="openai",
              show_default=True, help="OpenAI Batch output lines, Anthropic Message Batches results, or CSV.")
@click.option("--partial", is_flag=True, help="The job is not finished: write only the requests that are.")
def results(job_id, output, fmt, partial):
    """Export a job's results, one line (or CSV row) per request, in input order."""
    from pipeline.stores.export import finished_only, write_results
    engine = _engine_or_exit()
    with engine.connect() as conn:
        st = job_store.job_status(conn, job_id)
        if st is None:
            fail(f"no job {job_id}", 2)
        unfinished = st["counts"]["pending"]
        if (st["status"] not in JOB_TERMINAL or unfinished) and not partial:
            fail(f"job {job_id} is {st['status']} with {unfinished} requests not finished: wait"
                  f" (`llmbatch status {job_id} --watch`), or write the finished ones with --partial", 2)
        rows = outcomes.iter_results(conn, job_id)
        if partial:
            rows = finished_only(rows)
        out = output.open("w", newline="" if fmt == "csv" else None) if output else sys.stdout
        try:
            n = write_results(rows, job_id, out, fmt)
        except ValueError as e:   # an endpoint with no such shape (pipeline/stores/export.py)
            fail(str(e), 2)
        finally:
            if output:
                out.close()
    note = f" (partial: {unfinished} not finished, left out)" if partial and unfinished else ""
    if output or note:
        click.echo(f"wrote {n} results{' to ' + str(output) if output else ''}{note}", err=True)


@main.command()
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (default: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rejected line.")
def rejections(job_id, limit, as_json):
    """The lines of a job that were rejected, with their line number and reason."""
    from llmbatch.cli import views
    with _engine_or_exit().connect() as conn:
        if job_store.job_status(conn, job_id) is None:
            fail(f"no job {job_id}", 2)
        rows = job_store.list_rejections(conn, job_id, limit=limit)
    if as_json:
        for r in rows:
            click.echo(jsontext.dumps(r))
        return
    click.echo(views.format_table(["line", "custom_id", "reason"],
                                  [[r["line"], r["custom_id"], r["reason"]] for r in rows]))


@main.command()
@click.option("--status", "status_", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.option("--since", help="Only jobs created since: 30m, 6h, 7d, or an ISO 8601 time.")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job, one per line.")
def jobs(status_, since, limit, as_json):
    """List jobs, newest first."""
    from llmbatch.cli import views
    try:
        since_at = views.parse_since(since)
    except ValueError as e:
        fail(str(e), 2)
    with _engine_or_exit().connect() as conn:
        rows = views.list_jobs(conn, status=status_, since=since_at, limit=limit)
    if as_json:
        for r in rows:
            click.echo(jsontext.dumps(r))
        return
    cols = ["job_id", "name", "status", "accepted", "succeeded", "failed", "pending", "cost_usd", "created_at"]
    click.echo(views.format_table(cols, [[r[c] for c in cols] for r in rows]))


READER_ROLE = "llmbatch_reader"

#: who the connection is, and whether it may do more than read: a superuser, a role that can
#: make roles or databases or bypass row security, or a member of the role owning the database
#: or the tables (a member of the owner can write whatever the owner can)
_WHO_AM_I = """
SELECT current_user,
       r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls,
       pg_has_role(current_user, d.datdba, 'MEMBER')
         OR coalesce(pg_has_role(current_user, (SELECT relowner FROM pg_class
                                                 WHERE oid = to_regclass('public.jobs')), 'MEMBER'), false)
FROM pg_roles r, pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()
"""


def _refuse_unless_reader(conn) -> None:
    """Exit 2 unless the connection is the read-only role: the query would otherwise run with the
    owner's (or a superuser's) rights, e.g. when the URL names no user and libpq logs in as the
    OS user. The URL is the user's input, so this is bad usage, not a failed command."""
    user, powerful, owner = conn.execute(_WHO_AM_I).fetchone()
    if user != READER_ROLE or powerful or owner:
        why = ("a superuser or a role that manages roles/databases" if powerful
               else "the owner of the database or its tables (or a member of it)" if owner
               else f"not {READER_ROLE}")
        fail(f"refusing to run: `llmbatch sql` connects as {user!r}, {why}; it runs only as the"
              f" read-only role {READER_ROLE} (set LLMBATCH_READER_DATABASE_URL to"
              f" postgresql+psycopg://{READER_ROLE}:PASSWORD@HOST:PORT/DB, or unset it)", 2)


@main.command("sql")
@click.argument("query", required=False)
@click.option("-f", "--file", "file_", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the query from a file (e.g. sql/queries/recent_jobs.sql).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row.")
@click.option("--url", "print_url", is_flag=True,
              help="Print the read-only role's connection string (no password) for psql or any"
                   " client, e.g. psql \"$(llmbatch sql --url)\", and exit.")
def sql_cmd(query, file_, as_json, print_url):
    """Run a query as the read-only role llmbatch_reader and print a table.

    Refuses (exit 2) when the configured connection is any other role: the
    owner, a superuser, or whoever libpq picks for a URL without a user.
    """
    import psycopg

    from llmbatch.cli import views
    if print_url:
        # the host and port this stack really uses (LLMBATCH_PORT_OFFSET included), so examples
        # need no hard-coded port; the password stays out of it (PGPASSWORD, ~/.pgpass)
        parts = urllib.parse.urlsplit(get_settings().reader_url.replace("postgresql+psycopg://", "postgresql://"))
        user, _, host = parts.netloc.rpartition("@")
        click.echo(urllib.parse.urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}@{host}")))
        return
    if bool(query) == bool(file_):
        fail('give a query ("select ...") or --file, not both', 2)
    text = file_.read_text() if file_ else query
    url = get_settings().reader_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.read_only = True
            _refuse_unless_reader(conn)
            cur = conn.execute(text)
            if cur.description is None:
                click.echo(cur.statusmessage or "OK")
                return
            cols = [d.name for d in cur.description]
            rows = cur.fetchall()
    except psycopg.OperationalError as e:
        fail(f"cannot connect as {READER_ROLE}: {e}; run `llmbatch doctor`", 3)
    except psycopg.Error as e:
        fail(str(e).strip(), 1)
    if as_json:
        for row in rows:
            click.echo(jsontext.dumps(dict(zip(cols, row))))
    else:
        click.echo(views.format_table(cols, rows))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json):
    """Check every service and setting; say what is wrong and how to fix it."""
    from llmbatch.cli import doctor as doc
    checks = doc.run_checks(get_settings())
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks]))
    else:
        click.echo(doc.render(checks))
    sys.exit(doc.exit_code(checks))


@main.command()
@click.argument("job_id", required=False)
@click.option("--since", help="Everything since: 30m, 6h, 7d (default 7d), or an ISO 8601 time.")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the PNG (default: var/reports/cost-….png).")
@click.option("--no-chart", is_flag=True, help="Only the table.")
@click.option("--json", "as_json", is_flag=True)
def report(job_id, since, chart, no_chart, as_json):
    """Cost per tier and model, as a table and a chart (PNG) over time."""
    from llmbatch.cli import report as rep
    from llmbatch.cli import views
    if job_id and since:
        fail("give a job or --since, not both", 2)
    try:
        since_at = None if job_id else views.parse_since(since or "7d")
    except ValueError as e:
        fail(str(e), 2)
    with _engine_or_exit().connect() as conn:
        if job_id and job_store.job_status(conn, job_id) is None:
            fail(f"no job {job_id}", 2)
        data = rep.cost_rows(conn, job_id=job_id, since=since_at)
    title = f"job {job_id}" if job_id else f"since {since_at:%Y-%m-%d %H:%M} UTC"
    path = None
    if not no_chart:
        path = rep.chart(data, chart or rep.default_chart_path(get_settings(), job_id), title)
    table = rep.totals(data["rows"])
    if as_json:
        cols = ["tier", "model", "requests", "input_tokens", "output_tokens", "cost_usd", "share"]
        click.echo(jsontext.dumps({"scope": title, "step": data["step"], "chart": str(path) if path else None,
                               "totals": [dict(zip(cols, r)) for r in table],
                               "savings": dict(rep.savings_table(data)), "series": data["rows"]}))
        return
    _provider_note()
    click.echo(f"cost report, {title} (per {data['step']})")
    click.echo(views.format_table(["tier", "model", "requests", "input_tokens", "output_tokens", "cost_usd",
                                   "share"], table, footer=False))
    click.echo(views.format_table(["savings", "usd"], rep.savings_table(data), footer=False))
    if path:
        click.echo(f"chart: {path}")


from llmbatch.cli.budget import budget  # noqa: E402  (the command group lives beside its logic)

main.add_command(budget)

from llmbatch.cli.schedule import cancel, schedule, scheduler  # noqa: E402  (issue 6: the scheduler's commands)

main.add_command(scheduler)
main.add_command(schedule)
main.add_command(cancel)

from llmbatch.cli.kafka import kafka  # noqa: E402  (Kafka producers for services)

main.add_command(kafka)

from llmbatch.cli.keys import keys  # noqa: E402  (API keys: create, list, revoke; provider keys: restore)

main.add_command(keys)

from llmbatch.cli.retention import purge  # noqa: E402  (retention of ended jobs' rows)

main.add_command(purge)

from llmbatch.cli.webhooks import webhooks  # noqa: E402  (a project's webhook of the API)

main.add_command(webhooks)

from llmbatch.cli.stack import down, ps, up  # noqa: E402  (the local stack)
from llmbatch.cli.processes import api, batcher, db_group, simulator, worker  # noqa: E402  (the processes)

for command in (up, down, ps, db_group, api, batcher, worker, simulator):
    main.add_command(command)


def run() -> None:
    try:
        main()
    except InfrastructureError as e:
        fail(f"{e}; run `llmbatch doctor`", 3)
    except LLMBatchError as e:
        fail(str(e), 1)


if __name__ == "__main__":
    run()
