"""``llmbatch report``: cost per tier and model, as a table and as a chart (PNG).

The rows come from ``results`` joined with ``requests`` (the same numbers as
the ``cost_daily`` view), for one job or for everything since a time. The
time step adapts to the span: minutes up to two hours, hours up to two days,
days beyond. The chart is stacked bars per (tier, model) on a time axis (a
quiet stretch shows as a gap), spent against list price (a dashed mark over each bar: the same usage,
realtime, no cache), with both totals in the title; the savings table says what each lever saved; matplotlib draws it off-screen (Agg), no display needed.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.constants import TIERS

TIER_COLOURS = {"immediate": "#d62728", "peak": "#ff7f0e", "offpeak": "#1f77b4", "background": "#2ca02c"}


#: (longest span, step name, Postgres interval): the first that covers the span wins
STEPS = ((timedelta(minutes=10), "10 s", "10 seconds"), (timedelta(hours=2), "minute", "1 minute"),
         (timedelta(days=2), "hour", "1 hour"), (timedelta.max, "day", "1 day"))


def step_for(span: timedelta) -> tuple[str, str]:
    for longest, name, interval in STEPS:
        if span <= longest:
            return name, interval
    return STEPS[-1][1:]


def cost_rows(conn: Connection, *, job_id: str | None = None, since: datetime | None = None) -> dict:
    """``{"step", "rows": [{bucket, tier, model, requests, input_tokens, output_tokens, cost_usd}]}``."""
    where = "x.job_id = :job" if job_id else "x.created_at >= :since"
    params = {"job": job_id, "since": since}
    first, last = conn.execute(sa.text(
        f"SELECT min(x.created_at), max(x.created_at) FROM results x WHERE {where}"), params).one()
    if first is None:
        return {"step": "hour", "rows": [], "from": None, "to": None}
    step, interval = step_for(last - first)
    rows = conn.execute(sa.text(
        f"SELECT date_bin(CAST('{interval}' AS interval), x.created_at, TIMESTAMPTZ '2000-01-01') AS bucket, q.tier, x.model, count(*) AS requests,"
        " coalesce(sum(x.input_tokens), 0) AS input_tokens, coalesce(sum(x.output_tokens), 0) AS output_tokens,"
        " sum(x.cost_usd) AS cost_usd, sum(coalesce(x.list_cost_usd, x.cost_usd)) AS list_cost_usd"
        f" FROM results x JOIN requests q USING (job_id, custom_id) WHERE {where}"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"), params).mappings().all()
    levers = dict(conn.execute(sa.text(
        "SELECT s.lever, sum(s.usd::numeric) FROM results x, jsonb_each_text(x.savings) AS s(lever, usd)"
        f" WHERE {where} GROUP BY 1"), params).all())
    return {"step": step, "rows": [dict(r) for r in rows], "from": first, "to": last, "savings": levers}


def savings_table(data: dict) -> list[list]:
    """The savings ledger of the range: list price, spent, and what each lever saved (sql/029_savings.sql)."""
    from pipeline.money.savings import LEVERS
    listed = sum((r.get("list_cost_usd") or r["cost_usd"] or Decimal(0) for r in data["rows"]), Decimal(0))
    spent = sum((r["cost_usd"] or Decimal(0) for r in data["rows"]), Decimal(0))
    levers = data.get("savings") or {}
    rows = [[f"saved by {k}", levers[k]] for k in LEVERS if levers.get(k)]
    return [["list price", listed], ["spent", spent], ["saved", listed - spent], *rows]


def totals(rows: list[dict]) -> list[list]:
    """Table rows: tier, model, requests, input tokens, output tokens, cost, share of the total."""
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, Decimal(0)])
    for r in rows:
        a = acc[(r["tier"], r["model"])]
        a[0] += r["requests"]
        a[1] += r["input_tokens"]
        a[2] += r["output_tokens"]
        a[3] += r["cost_usd"] or Decimal(0)
    grand = sum((a[3] for a in acc.values()), Decimal(0))
    order = sorted(acc, key=lambda k: (TIERS.index(k[0]) if k[0] in TIERS else 9, k[1]))
    out = [[t, m, *acc[(t, m)][:3], acc[(t, m)][3],
            f"{(acc[(t, m)][3] / grand * 100 if grand else 0):.1f}%"] for t, m in order]
    out.append(["total", "", sum(a[0] for a in acc.values()), sum(a[1] for a in acc.values()),
                sum(a[2] for a in acc.values()), grand, "100.0%" if grand else "0.0%"])
    return out


#: the width of one time step, for bars on a time axis
STEP_LENGTH = {"10 s": timedelta(seconds=10), "minute": timedelta(minutes=1), "hour": timedelta(hours=1),
               "day": timedelta(days=1)}


def time_axis(buckets: list[datetime], step: str) -> tuple[list[float], float]:
    """Bar positions on a real time axis (matplotlib date numbers, days) and the bar width.

    A gap in time stays a gap on the chart: two steps five minutes apart are
    drawn five minutes apart, not as neighbouring bars.
    """
    from matplotlib import dates as mdates
    xs = [float(mdates.date2num(b.astimezone(timezone.utc))) for b in buckets]
    return xs, STEP_LENGTH[step] / timedelta(days=1) * 0.8


def chart(data: dict, path: Path, title: str) -> Path:
    """Stacked bars of cost per (tier, model) per time step, written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    buckets = sorted({r["bucket"] for r in rows})
    series: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        series[(r["tier"], r["model"])][r["bucket"]] = float(r["cost_usd"] or 0)
    keys = sorted(series, key=lambda k: (TIERS.index(k[0]) if k[0] in TIERS else 9, k[1]))
    xs, width = time_axis(buckets, data["step"])

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    bottom = [0.0] * len(buckets)
    hatches = ["", "//", "..", "xx", "\\\\", "++"]
    models = sorted({k[1] for k in keys})
    for tier, model in keys:
        values = [series[(tier, model)].get(b, 0.0) for b in buckets]
        ax.bar(xs, values, width=width, bottom=bottom, label=f"{tier} / {model}",
               color=TIER_COLOURS.get(tier, "#7f7f7f"), hatch=hatches[models.index(model) % len(hatches)],
               edgecolor="white", linewidth=0.6)
        bottom = [b + v for b, v in zip(bottom, values)]
    total = sum(bottom)
    # spent against list price (the same usage, realtime, no cache): the gap is what the levers saved
    listed = [sum(float(r.get("list_cost_usd") or r["cost_usd"] or 0) for r in rows if r["bucket"] == b)
              for b in buckets]
    if xs:   # a mark over each bar: a gap in time stays a gap
        ax.hlines(listed, [x - width / 2 for x in xs], [x + width / 2 for x in xs], colors="black",
                  linewidth=1.6, linestyles="--", label="list price", zorder=3)
        ax.set_ylim(0, max(max(bottom), max(listed)) * 1.08 or 1.0)
    # "\$": two dollar signs in one title would be read as mathtext
    saved = f"; list price \\${sum(listed):,.4f}, saved {1 - total / sum(listed):.0%}" if sum(listed) else ""
    ax.set_title(f"{title}\ncost per tier and model, per {data['step']} — spent \\${total:,.4f}{saved}",
                 fontsize=12)
    ax.set_ylabel("cost (USD)")
    ax.set_xlabel(f"time (UTC, per {data['step']})")
    ax.yaxis.set_major_formatter(lambda v, _: f"${v:,.4f}" if total < 1 else f"${v:,.2f}")
    from matplotlib import dates as mdates
    fmt = {"10 s": "%H:%M:%S", "minute": "%m-%d %H:%M", "hour": "%m-%d %H:00", "day": "%Y-%m-%d"}[data["step"]]
    ax.xaxis_date(tz=timezone.utc)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=timezone.utc, maxticks=16))
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=timezone.utc))
    if xs:   # a single step still reads as one bar, with room either side
        pad = max(width * 2, (max(xs) - min(xs)) * 0.03)
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
    fig.autofmt_xdate()
    ax.grid(axis="y", alpha=0.3)
    if keys:
        ax.legend(title="tier / model", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    else:
        ax.text(0.5, 0.5, "no results in this range", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def default_chart_path(settings, job_id: str | None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return Path(settings.var_dir) / "reports" / f"cost-{job_id or 'since'}-{stamp}.png"
