"""``llmbatch budget show|set|apply-config|reconcile``: see and change cost caps (logic in pipeline/money/admin.py and ledger.py).

The caps in force live in Postgres: ``budget set`` writes them, ``apply-config``
copies the ones written in the settings there once, on purpose. No other
process's settings or environment changes them. ``CAP_USD`` is the one
validation of a cap typed on any command line (``submit``, ``schedule add``).
"""

from __future__ import annotations

import json

import click

from llmbatch.cli.common import fail
from pipeline.paths.registry import scheduler_paths
from pipeline import errors
from pipeline.config import get_settings
from pipeline.constants import TIERS
from pipeline.errors import BudgetError, ConfigError
from pipeline.money import admin, deferral, ledger, units
from pipeline.stores import db


def _redis():
    import redis
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=2)


class CapUSD(click.ParamType):
    """A cap in USD on the command line: finite, 0 … MAX_CAP_USD, else exit 2 with the reason."""

    name = "usd"

    def convert(self, value, param, ctx):
        try:
            cap = units.parse_cap(value, "amount")
        except ConfigError as e:
            self.fail(f"{value!r} is not a cap: give a finite amount in USD from 0 to {units.MAX_CAP_USD}"
                      f" ({e})", param, ctx)
        if cap is None:
            self.fail("an empty amount is not a cap", param, ctx)
        return cap


CAP_USD = CapUSD()


@click.group()
def budget():
    """Cost caps: global and per tier per UTC day, and per job."""


@budget.command("show")
@click.option("--json", "as_json", is_flag=True)
def show(as_json):
    """Caps, today's spend, reservations held, paused jobs and recent alerts."""
    try:
        data = admin.show(db.get_engine(), _redis(), get_settings())
    except errors.BudgetUnavailable as e:
        fail(str(e), 3)
    if as_json:
        click.echo(json.dumps(data))
        return
    from llmbatch.cli.views import money
    click.echo(f"period {data['period']} (UTC)  counters: {data['counters']}")
    click.echo("  spent: settled in the live counters (Redis) that caps are enforced on;"
               " held: reserved for calls in flight;\n  ledger: the cost of the results stored in Postgres,"
               " the durable record the counters are rebuilt from;\n  unconfirmed: calls that got no answer"
               " (timeout, dropped connection, worker killed) and may have been billed:\n  counted at their maximum"
               " against every cap until the provider confirms them.\n  They differ while calls are in flight"
               " or their results are being written; a lasting difference is worth a look.")

    def line(name, s):
        cap = f"${money(s['cap_usd'])}" if s["cap_usd"] is not None else "no cap"
        live = (f"spent ${money(s['spent_usd'])}  held ${money(s['held_usd'])}  "
                if s["spent_usd"] is not None else "")
        click.echo(f"  {name:<12} {cap:<14} {live}ledger ${money(s['ledger_usd'])}"
                   f" + unconfirmed ${money(s['unconfirmed_usd'])}")
    line("global", data["global"])
    for t in TIERS:
        line(t, data["tiers"][t])
    for p, s in data.get("projects", {}).items():
        line(f"project {p}", s)
    if data["jobs"]:
        click.echo("jobs:")
        for j in data["jobs"]:
            cap = f"${money(j['cap_usd'])}" if j["cap_usd"] is not None else "no cap"
            click.echo(f"  {j['job_id']}  {j['status']:<14} {cap:<12} spent ${money(j['spent_usd'])}"
                       f" + unconfirmed ${money(j['unconfirmed_usd'])}"
                       f"  deferred {j['deferred']}  on budget: {j['on_budget']}")
    if data["alerts"]:
        click.echo("recent alerts:")
        for a in data["alerts"]:
            click.echo(f"  {a['created_at']}  {a['scope']} {a['period']}  {a['threshold']} %"
                       f"  ${money(a['spent_usd'])} of ${money(a['cap_usd'])}")


@budget.command("set")
@click.argument("scope_arg", metavar="[SCOPE]", required=False)
@click.argument("usd_arg", metavar="[USD]", type=CAP_USD, required=False)
@click.option("--global", "global_", is_flag=True, help="The daily cap over everything.")
@click.option("--tier", type=click.Choice(TIERS), help="The daily cap of one tier.")
@click.option("--job", "job_id", help="The cap of one job (resumes it if its cap paused it).")
@click.option("--project", help="The daily cap of one API project (its keys' batches, `llmbatch api`).")
@click.option("--usd", type=CAP_USD, help="The cap in USD, e.g. 25 or 0.5.")
def set_(scope_arg, usd_arg, global_, tier, job_id, project, usd):
    """Set a cap; requests it deferred resume at once if they now fit.

    Either ``budget set global 20`` / ``budget set tier:peak 5`` / ``budget set job:JOB 1`` /
    ``budget set project:P 10``, or the options ``--global`` / ``--tier T`` / ``--job JOB`` /
    ``--project P`` with ``--usd``.
    """
    if scope_arg is not None and usd_arg is None and usd is None:
        fail("give the amount: budget set SCOPE USD", 2)
    amount = usd_arg if usd_arg is not None else usd
    if amount is None:
        fail("give the amount (--usd, or budget set SCOPE USD)", 2)
    if scope_arg is not None:
        if global_ or tier or job_id or project:
            fail("give the scope either as SCOPE or as --global/--tier/--job/--project, not both", 2)
        scope = scope_arg
        if scope in TIERS:
            scope = f"tier:{scope}"
    else:
        if sum(bool(x) for x in (global_, tier, job_id, project)) != 1:
            fail("give exactly one of --global, --tier T, --job JOB, --project P", 2)
        scope = ("global" if global_ else f"tier:{tier}" if tier else f"job:{job_id}" if job_id
                 else f"project:{project}")
    engine = db.get_engine()
    try:
        result = admin.set_cap(engine, _redis(), get_settings(), scope, amount)
    except errors.BudgetUnavailable as e:
        fail(str(e), 3)
    except (BudgetError, ConfigError) as e:
        fail(str(e), 2)
    from pipeline.intake.dispatch import enqueue_batch
    resumed = deferral.resume_due_batches(engine, enqueue_batch, scheduler_paths())
    click.echo(f"{scope}: cap ${result['usd']}; {resumed} deferred batches resumed")


@budget.command("apply-config")
def apply_config():
    """Write the daily caps in the settings (llmbatch.toml, LLMBATCH_BUDGET_*) to Postgres, once."""
    settings = get_settings()
    try:
        done = admin.apply_config(db.get_engine(), _redis(), settings)
    except errors.BudgetUnavailable as e:
        fail(str(e), 3)
    except (BudgetError, ConfigError) as e:
        fail(str(e), 2)
    if not done:
        click.echo("no caps in the settings; the caps in force are unchanged")
    for d in done:
        click.echo(f"{d['scope']}: cap ${d['usd']}")


@budget.command("reconcile")
@click.option("--json", "as_json", is_flag=True)
def reconcile(as_json):
    """Compare the Redis counters with the Postgres ledger now; rebuild them if they drifted."""
    try:
        out = ledger.reconcile(db.get_engine(), _redis(), get_settings())
    except errors.BudgetUnavailable as e:
        fail(str(e), 3)
    if as_json:
        click.echo(json.dumps({**out, "drift_usd": {f: str(units.from_units(d))
                                                    for f, d in out["drift_units"].items()}}))
        return
    if out["rebuilt"]:
        click.echo(f"counters rebuilt from the ledger ({out.get('reason')}); drift:"
                   f" {({f: str(units.from_units(d)) for f, d in out['drift_units'].items()})}")
    else:
        click.echo("counters agree with the ledger")
