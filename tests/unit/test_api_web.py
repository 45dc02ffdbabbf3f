"""The jobs page's pure parts (pipeline/api/web.py), no services: its templates escape what a
submitter wrote (a custom_id, a refusal reason, a job name), its figures, the streamed download,
and no page without a session secret. The page against the stack, in a browser:
tests/integration/test_api_web.py."""

from __future__ import annotations

import html
import threading
from decimal import Decimal

import markupsafe
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from pipeline.api import web
from pipeline.constants import REQUEST_STATES

HOSTILE = '<script>window.__pwned = 1</script>"><img src=x onerror=alert(1)>'


def job_context(custom_id: str, reason: str, name: str) -> dict:
    status = {"job_id": "job-1", "status": "running", "provider": "simulator", "name": name, "batch_id": "batch_1",
              "counts": {"total": 3, "accepted": 2, "rejected": 1, "succeeded": 1, "failed": 0, "cancelled": 0,
                         "pending": 1, "cached": 0, "refused": 0},
              "tiers": {"peak": 2}, "cost_usd": "0.0001", "unconfirmed_usd": "0", "unconfirmed_calls": 0,
              "cache_saved_usd": "0",
              "savings": {"list_cost_usd": "0.0002", "cost_usd": "0.0001", "saved_usd": "0.0001",
                          "by_lever": {"batch": "0.0001"}},
              "budget": {"cap_usd": "1", "on_budget": "defer", "deferred": 0, "fallback_model": None,
                         "answered_by_fallback": 0},
              "created_at": "2026-12-05T17:00:00+00:00", "finished_at": None}
    project = {"project": "p", "day": "2026-12-05", "cap_usd": Decimal("2"), "spent_usd": Decimal("0.5"),
               "unconfirmed_usd": Decimal(0), "pct": 25.0,
               "savings": [{"day": "2026-12-05", "requests": 1, "list_cost_usd": Decimal("0.0002"),
                            "cost_usd": Decimal("0.0001"), "saved_usd": Decimal("0.0001"),
                            "saved_cache_usd": 0, "saved_coalesce_usd": 0, "saved_batch_usd": Decimal("0.0001"),
                            "saved_flex_usd": 0, "saved_prompt_cache_usd": 0, "saved_price_window_usd": 0}]}
    return {"project": project, "job": status, "progress": web.progress(status),
            "tiers": [{"tier": "peak", "states": [0] * len(REQUEST_STATES), "total": 2, "cost_usd": Decimal("0.0001")}],
            "states": REQUEST_STATES, "rejected": [{"line": 3, "custom_id": custom_id, "reason": reason}],
            "rejections_shown": 500, "refresh": True, "refresh_s": 5,
            "jobs": [status | {"progress": web.progress(status)}], "page_no": 0, "more": False}


def render(name: str, context: dict) -> str:
    return web.environment().get_template(name).render(context)


def test_a_script_in_a_custom_id_a_reason_or_a_name_comes_out_as_text():
    ctx = job_context(HOSTILE, f"bad line: {HOSTILE}", HOSTILE)
    for name in ("job.html", "jobs.html"):
        page = render(name, ctx)
        assert "<script>" not in page and "<img" not in page, name
        assert str(markupsafe.escape(HOSTILE)) in page, name   # shown, as text


@hsettings(max_examples=200, deadline=None)
@given(custom_id=st.text(min_size=1, max_size=60), reason=st.text(max_size=60), name=st.text(max_size=40))
def test_no_text_a_submitter_writes_becomes_markup(custom_id, reason, name):
    """Whatever the text, what the page holds between tags is that text escaped: no ``<`` of the
    submitter's survives, and unescaping the page's cell gives the text back."""
    marker = "\u2063"   # brackets the custom_id so its cell is found again whatever it holds
    page = render("job.html", job_context(marker + custom_id + marker, reason, name))
    cell = page.split(marker)[1]
    assert "<" not in cell and ">" not in cell
    assert html.unescape(cell) == custom_id


def test_figures():
    assert web.usd(Decimal("0E-8")) == "0" and web.usd(Decimal("1.20000000")) == "1.2" and web.usd(None) == "—"
    assert web.usd("0.00001230") == "0.0000123"
    assert web.pct(1, 4) == 25.0 and web.pct(5, 4) == 100.0 and web.pct(1, 0) == 0.0 and web.pct(1, None) == 0.0
    st_ = {"status": "running", "counts": {"accepted": 10, "refused": 2, "succeeded": 3, "failed": 1,
                                           "cancelled": 0, "pending": 4}}
    assert web.progress(st_) == {"finished": 4, "expected": 8, "pct": 50.0, "open": True}
    assert web.progress(st_ | {"status": "completed"})["open"] is False


def test_a_download_streams_what_is_written_in_pieces():
    text = "".join(f'{{"custom_id": "c{i}"}}\n' for i in range(50_000))

    def produce(out):
        for i in range(0, len(text), 1000):
            out.write(text[i:i + 1000])

    pieces = list(web.streamed(produce))
    assert b"".join(pieces).decode() == text and len(pieces) > 5


def test_a_download_its_reader_leaves_stops_its_writer():
    """A client that goes away mid-download: the writer's thread stops (it is not left blocked on a
    full queue, holding its Postgres connection)."""
    stopped = threading.Event()

    def produce(out):
        try:
            while True:
                out.write("x" * 10_000)
        finally:
            stopped.set()

    it = web.streamed(produce)
    next(it)
    it.close()
    assert stopped.wait(5)


def test_a_download_that_fails_fails_its_response():
    def produce(out):
        out.write("a line\n")
        raise RuntimeError("Postgres went away")

    with pytest.raises(RuntimeError, match="went away"):
        list(web.streamed(produce))


def test_without_a_session_secret_the_page_says_so_and_the_api_is_untouched(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.config import load_settings

    app = FastAPI()
    web.mount(app, engine=None, settings=load_settings(env={"LLMBATCH_VAR_DIR": str(tmp_path)}))
    r = TestClient(app).get("/")
    assert r.status_code == 503 and "LLMBATCH_API_SESSION_SECRET" in r.text
    assert not any(m.cls.__name__ == "SessionMiddleware" for m in app.user_middleware)


def test_the_session_cookie_is_signed_httponly_and_samesite_lax(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.config import load_settings

    app = FastAPI()
    settings = load_settings(env={"LLMBATCH_VAR_DIR": str(tmp_path), "LLMBATCH_API_SESSION_SECRET": "s" * 48})
    web.mount(app, engine=None, settings=settings)

    @app.get("/_set")
    def _set(request: web.Request):
        request.session["key_id"] = "key_x"
        return {}

    r = TestClient(app).get("/_set")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(web.SESSION_COOKIE + "=") and "httponly" in cookie.lower()
    assert "samesite=lax" in cookie.lower()
    value = cookie.split(";")[0].split("=", 1)[1]
    assert "key_x" not in value or "." in value   # signed by itsdangerous: a payload and its signature
    # another secret does not accept it: the session is empty and / sends to the login
    other = FastAPI()
    web.mount(other, engine=None,
              settings=load_settings(env={"LLMBATCH_VAR_DIR": str(tmp_path), "LLMBATCH_API_SESSION_SECRET": "t" * 48}))
    browser = TestClient(other, follow_redirects=False)
    browser.cookies.set(web.SESSION_COOKIE, value)
    r = browser.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login"
