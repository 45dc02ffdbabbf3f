"""The jobs page at ``/``: a project's jobs, server-rendered, behind a login with its API key.

Routes: ``GET/POST /login``, ``POST /logout``, ``GET /`` (the project's jobs: progress, spend
against the job's and the project's cap, savings, tiers; the project's savings by day),
``GET /jobs/{job_id}`` (one job: its tiers, savings by lever, rejected lines, downloads) and
``GET /jobs/{job_id}/download`` (its results or its errors, streamed in the shape ``llmbatch
results`` writes: pipeline/stores/export.py). Static files: ``/static`` (one stylesheet).

The login takes a project's API key (checked as a ``/v1`` call checks it, pipeline/api/keys.py)
and keeps its key id, never the key, in a session cookie signed with ``api_session_secret``
(Starlette's SessionMiddleware: itsdangerous, HttpOnly, SameSite=Lax). Every page reads the key
again: revoking it ends its sessions. A job of another project, like a job that does not exist,
answers 404.

Everything shown passes through Jinja2 with autoescaping on: a custom_id or a refusal reason is
the submitter's text, never markup. Nothing here writes to the pipeline's tables.
"""

from __future__ import annotations

import logging
import queue
import threading
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.middleware.sessions import SessionMiddleware

from pipeline.api import keys
from pipeline.api.shapes import is_output_line
from pipeline.config import Settings
from pipeline.constants import JOB_TERMINAL, REQUEST_STATES
from pipeline.money.admin import project_spend
from pipeline.money.caps import caps_for, period
from pipeline.stores import jobs, outcomes
from pipeline.stores.export import finished_only, openai_line, write_results

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "llmbatch_session"
#: a session's life; a revoked key ends it at once
SESSION_MAX_AGE_S = 8 * 3600
#: jobs on one page of the list
PAGE = 25
#: rejected lines shown on a job's page (``llmbatch rejections JOB`` lists every one)
REJECTIONS_SHOWN = 500
#: days of the project's savings ledger on its page
SAVINGS_DAYS = 14
#: seconds between refreshes of a page while a job on it is open (a meta refresh: no script)
REFRESH_S = 5
#: what a download may be: (which rows, their format) → (file suffix, media type)
FORMATS = {"openai": ("jsonl", "application/jsonl"), "anthropic": ("jsonl", "application/jsonl"),
           "csv": ("csv", "text/csv")}


def environment() -> Environment:
    """The templates' Jinja2 environment: autoescaping on for everything it renders."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters["usd"] = usd
    env.globals["pct"] = pct
    return env


def usd(value) -> str:
    """Dollars as a plain decimal: ``0``, ``0.0235`` (never ``0E-8``); ``—`` for none."""
    if value is None:
        return "—"
    d = Decimal(str(value)).normalize()
    return format(d, "f") if d else "0"


def pct(part, whole) -> float:
    """``part`` as a percentage of ``whole``, 0–100 (0 for no whole)."""
    whole = Decimal(str(whole or 0))
    return float(min(Decimal(100), max(Decimal(0), Decimal(str(part or 0)) * 100 / whole))) if whole else 0.0


def progress(st: dict) -> dict:
    """A job's progress from ``jobs.job_status``: what is finished of what was accepted."""
    c = st["counts"]
    finished = c["succeeded"] + c["failed"] + c["cancelled"]
    expected = max(c["accepted"] - c.get("refused", 0), finished + c["pending"])
    return {"finished": finished, "expected": expected, "pct": pct(finished, expected),
            "open": st["status"] not in JOB_TERMINAL}


def tier_rows(conn, job_id: str) -> list[dict]:
    """One row per tier of the job: its requests in each state and what they cost."""
    states, cost = jobs.tier_breakdown(conn, job_id)
    return [{"tier": t, "states": [s.get(x, 0) for x in REQUEST_STATES], "total": sum(s.values()),
             "cost_usd": cost.get(t) or 0} for t, s in sorted(states.items())]


def project_header(conn, settings: Settings, engine, project_id: str) -> dict:
    """The project's daily cap and today's spend (pipeline/money/admin.py), and its savings ledger by
    day (``savings_daily_project``, sql/036_savings_by_project.sql)."""
    today = period(settings, engine)
    ledger, unconfirmed = project_spend(conn, today, project_id)
    cap = caps_for(conn).get(f"project:{project_id}")
    spent = ledger.get(project_id, Decimal(0)) + unconfirmed.get(project_id, Decimal(0))
    savings = [dict(r) for r in conn.execute(sa.text(
        "SELECT day, requests, list_cost_usd, cost_usd, saved_usd, saved_cache_usd, saved_coalesce_usd,"
        " saved_batch_usd, saved_flex_usd, saved_prompt_cache_usd, saved_price_window_usd"
        " FROM savings_daily_project WHERE project_id = :p AND day > CAST(:d AS date) - :n"
        " ORDER BY day DESC"), {"p": project_id, "d": today, "n": SAVINGS_DAYS}).mappings()]
    return {"project": project_id, "day": today, "cap_usd": cap, "spent_usd": spent,
            "unconfirmed_usd": unconfirmed.get(project_id, Decimal(0)), "pct": pct(spent, cap),
            "savings": savings}


def project_jobs(conn, project_id: str, page: int) -> tuple[list[dict], bool]:
    """The project's jobs, newest first, one page of them: (their ``job_status`` with progress and
    their API batch id, whether there is a next page)."""
    rows = conn.execute(sa.text(
        "SELECT j.job_id, j.name, b.batch_id FROM jobs j LEFT JOIN api_batches b USING (job_id)"
        " WHERE j.project_id = :p ORDER BY j.created_at DESC, j.job_id DESC LIMIT :n OFFSET :o"),
        {"p": project_id, "n": PAGE + 1, "o": page * PAGE}).mappings().all()
    out = []
    for r in rows[:PAGE]:
        st = jobs.job_status(conn, r["job_id"])
        if st is not None:
            out.append(st | {"name": r["name"], "batch_id": r["batch_id"], "progress": progress(st)})
    return out, len(rows) > PAGE


def owned(conn, project_id: str, job_id: str) -> dict | None:
    """The job's row if it is the project's; None for another project's job or no such job."""
    row = conn.execute(sa.text(
        "SELECT j.job_id, j.name, b.batch_id FROM jobs j LEFT JOIN api_batches b USING (job_id)"
        " WHERE j.job_id = :j AND j.project_id = :p"), {"j": job_id, "p": project_id}).mappings().first()
    return dict(row) if row else None


class _Pipe:
    """A text file's ``write`` that hands what is written to a streamed response in pieces of about
    ``size`` characters, blocking while the reader is ``depth`` pieces behind (so a large export
    never sits in memory), and giving up once the reader has gone (``closed``)."""

    def __init__(self, size: int = 64 * 1024, depth: int = 8):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.closed = threading.Event()
        self.size, self.buf, self.n = size, [], 0

    def _put(self, item) -> None:
        while not self.closed.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise ConnectionAbortedError("the download was closed by its reader")

    def write(self, text: str) -> int:
        self.buf.append(text)
        self.n += len(text)
        if self.n >= self.size:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self.buf:
            self._put("".join(self.buf).encode())
            self.buf, self.n = [], 0


_END = object()


def streamed(produce) -> "iter[bytes]":
    """The bytes ``produce(out)`` writes to ``out``, as an iterator a StreamingResponse reads (in its
    thread pool): ``produce`` runs in a thread of its own, at the pace the client reads."""
    pipe = _Pipe()

    def run():
        try:
            produce(pipe)
            pipe.flush()
            pipe._put(_END)
        except ConnectionAbortedError:
            pass
        except Exception as e:   # handed to the reader, which fails the response
            log.warning("a download failed: %s", e)
            try:
                pipe._put(e)
            except ConnectionAbortedError:
                pass

    threading.Thread(target=run, name="download", daemon=True).start()
    try:
        while True:
            item = pipe.q.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        pipe.closed.set()


def export(engine, job_id: str, kind: str, fmt: str):
    """What ``produce`` writes for a download: the job's finished requests (``kind`` ``results``)
    or those of them that are errors (``errors``: the lines of an OpenAI error file), written by
    ``write_results`` as ``llmbatch results --partial`` writes them."""
    def produce(out):
        with engine.connect() as conn:
            rows = finished_only(outcomes.iter_results(conn, job_id))
            if kind == "errors":
                rows = (r for r in rows if not is_output_line(openai_line(job_id, r)))
            write_results(rows, job_id, out, fmt)
    return produce


def router(engine, settings: Settings) -> APIRouter:
    r = APIRouter()
    templates = Jinja2Templates(env=environment())

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context | {"refresh_s": REFRESH_S},
                                          status_code=status_code)

    def logged_in(request: Request) -> str | None:
        """The session's project while its key is live; a revoked key's session is cleared."""
        key_id = request.session.get("key_id")
        if not key_id:
            return None
        with engine.connect() as conn:
            project_id = keys.project_of_key_id(conn, key_id)
        if project_id is None:
            request.session.clear()
        return project_id

    def to_login() -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @r.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return page(request, "login.html")

    @r.post("/login", response_class=HTMLResponse)
    def login(request: Request, key: str = Form("")):
        with engine.connect() as conn:
            found = keys.key_of(conn, key.strip())
        if found is None:
            log.info("jobs page: a login with an unknown or revoked key")
            return page(request, "login.html", status_code=401, error="That key is unknown or revoked.")
        request.session.clear()
        request.session.update({"key_id": found[0], "project": found[1]})
        return RedirectResponse("/", status_code=303)

    @r.post("/logout")
    def logout(request: Request):
        request.session.clear()
        return to_login()

    @r.get("/", response_class=HTMLResponse)
    def jobs_page(request: Request, page_no: int = 0):
        project_id = logged_in(request)
        if project_id is None:
            return to_login()
        page_no = max(0, page_no)
        with engine.connect() as conn:
            header = project_header(conn, settings, engine, project_id)
            listed, more = project_jobs(conn, project_id, page_no)
        return page(request, "jobs.html", project=header, jobs=listed, page_no=page_no, more=more,
                    refresh=any(j["progress"]["open"] for j in listed))

    @r.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str):
        project_id = logged_in(request)
        if project_id is None:
            return to_login()
        with engine.connect() as conn:
            row = owned(conn, project_id, job_id)
            if row is None:
                return page(request, "not_found.html", status_code=404, project={"project": project_id},
                            job_id=job_id)
            st = jobs.job_status(conn, job_id)
            header = project_header(conn, settings, engine, project_id)
            rejected = jobs.list_rejections(conn, job_id, limit=REJECTIONS_SHOWN)
            tiers = tier_rows(conn, job_id)
        return page(request, "job.html", project=header, job=st | row, progress=progress(st), tiers=tiers,
                    states=REQUEST_STATES, rejected=rejected, rejections_shown=REJECTIONS_SHOWN,
                    refresh=progress(st)["open"])

    @r.get("/jobs/{job_id}/download")
    def download(request: Request, job_id: str, kind: str = "results", format: str = "openai"):
        project_id = logged_in(request)
        if project_id is None:
            return to_login()
        if kind not in ("results", "errors") or format not in FORMATS:
            return page(request, "not_found.html", status_code=404, project={"project": project_id},
                        job_id=job_id)
        with engine.connect() as conn:
            if owned(conn, project_id, job_id) is None:
                return page(request, "not_found.html", status_code=404, project={"project": project_id},
                            job_id=job_id)
        suffix, media = FORMATS[format]
        return StreamingResponse(streamed(export(engine, job_id, kind, format)), media_type=media,
                                 headers={"Content-Disposition":
                                          f'attachment; filename="{job_id}_{kind}.{suffix}"'})

    return r


def mount(app: FastAPI, engine, settings: Settings) -> None:
    """Serve the jobs page from ``app``: its session middleware, its stylesheet and its routes. No
    ``api_session_secret``: ``/`` answers 503 and says so (there is no default secret)."""
    secret = str.__str__(settings.api_session_secret)
    if not secret:
        @app.get("/", response_class=HTMLResponse)
        def no_page():
            return HTMLResponse("<p>The jobs page needs LLMBATCH_API_SESSION_SECRET"
                                " (the local stack generates it into its secrets file).</p>", status_code=503)
        return
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie=SESSION_COOKIE,
                       max_age=SESSION_MAX_AGE_S, same_site="lax", https_only=False)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router(engine, settings))
