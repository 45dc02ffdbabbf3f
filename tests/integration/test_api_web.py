"""The jobs page of ``llmbatch api`` (pipeline/api/web.py) on the running stack.

In a real headless browser (Debian's chromium and chromium-driver, driven by selenium): log in with
a project's key, open a job mid-run, see its progress, its spend against the project's cap, its
rejected lines (a ``<script>`` in a custom_id shown as text, never run), and download its results
and check the file. Without a browser: another project's job answers 404, a wrong key 401, a revoked
key ends its session, logging out does too, and the session cookie is HttpOnly and SameSite=Lax.

A job stays mid-run deterministically, whatever the hour: its project's daily cap lets a few lines
run and defers the rest to the next day (a project's cap defers; it does not pause the job).

Under CI a missing chromium fails the test (infra/setup.sh installs it); elsewhere it skips.
``LLMBATCH_WEB_SCREENSHOT=docs/jobs-page.png`` writes the jobs page's screenshot mid-job there.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.api import keys as api_keys
from pipeline.api.web import usd
from pipeline.intake.formats import parse_request
from pipeline.money.pricing import get_price_book
from pipeline.stores import jobs
from tests.conftest import require
from tests.integration.conftest import llmbatch, wait_for, write_jsonl
from tests.integration.test_api import api, client, new_key  # noqa: F401  (api is a fixture)

HOSTILE_ID = '<script>window.__pwned = 1</script>"><img src=x onerror="window.__pwned = 2">'
PROMPT = "Summarise the following text in one word. " + "The weather is mild and the sea is calm. " * 30


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    require("chromium", bool(chromium and driver),
            f"chromium {chromium or 'missing'}, chromedriver {driver or 'missing'}: infra/setup.sh installs"
            f" Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,900",
                "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    d.set_page_load_timeout(60)
    d.downloads = downloads
    yield d
    d.quit()


def line(custom_id: str, i: int, model: str = "gpt-4o-mini") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"{i}. {PROMPT}"}]}}


def job_of(engine, batch_id: str) -> str | None:
    """The batch's job once its row exists: the service names the job before its submit writes the
    row, and a page asked for it in between answers 404 (CI run 19)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT j.job_id FROM api_batches b JOIN jobs j USING (job_id)"
                                    " WHERE b.batch_id = :b"), {"b": batch_id}).scalar()


def counts(engine, job_id: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM requests WHERE job_id = :j GROUP BY 1"), {"j": job_id}).all())


def repeats_job(c, engine, tmp_path, n: int = 8) -> tuple[str, str]:
    """A batch whose lines ask the same four things twice (temperature 0): the repeats are answered
    without a call, and the savings ledger records what they saved. (batch id, job id), once ended."""
    tag = time.time_ns()   # asked for the first time: four calls, four repeats answered without one
    lines = [line(f"rep-{i}", i % 4) for i in range(n)]
    for x in lines:
        x["body"]["temperature"] = 0
        x["body"]["messages"][0]["content"] += f" ({tag})"
    f = c.files.create(file=write_jsonl(tmp_path / "repeats.jsonl", lines).open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"llmbatch_tier": "peak"})
    wait_for(lambda: c.batches.retrieve(b.id).status == "completed", timeout=300, every=1, what=f"{b.id} completed")
    return b.id, job_of(engine, b.id)


def capped_job(stack, engine, api, tmp_path, project: str, n: int = 24, runs: int = 5, key: str | None = None,
               spent_before: Decimal = Decimal(0)):
    """A batch of ``n`` lines (one with a hostile custom_id, two rejected) in a project whose daily cap
    is what it spent before and ``runs`` lines' maximum: some run, the rest are deferred and the job
    stays running."""
    key = key or new_key(engine, project)
    c = client(api, key)
    lines = [line(HOSTILE_ID if i == 0 else f"ok-{i}", i) for i in range(n)]
    lines += [{"custom_id": "bad-<b>model</b>", "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "<script>window.__pwned = 3</script>", "messages": []}},
              {"custom_id": "bad-url", "method": "POST", "url": "/v1/<i>nowhere</i>", "body": {}}]
    one_max = parse_request(lines[1], get_price_book()).max_cost_usd
    cap = (spent_before + one_max * runs).quantize(Decimal("0.00000001"))
    assert llmbatch("budget", "set", "--project", project, "--usd", str(cap)).returncode == 0
    f = c.files.create(file=write_jsonl(tmp_path / f"{project}.jsonl", lines).open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"llmbatch_tier": "peak"})
    job_id = wait_for(lambda: job_of(engine, b.id), timeout=60, what="the batch's job")

    def settled():   # every line either finished or deferred by the project's cap
        c_ = counts(engine, job_id)
        return sum(c_.values()) == n and c_.get("deferred") and \
            not set(c_) - {"succeeded", "failed", "deferred"} and c_
    final = wait_for(settled, timeout=300, every=1, what="the job's lines run or deferred")
    return key, c, b, job_id, final, cap


def test_the_jobs_page_in_a_browser_mid_job(stack, engine, api, tmp_path, browser):
    from selenium.webdriver.common.by import By
    project = f"web{time.time_ns() % 10**9}"
    key = new_key(engine, project)
    first_batch, first_job = repeats_job(client(api, key), engine, tmp_path)
    with engine.connect() as conn:
        first = jobs.job_savings(conn, first_job)
    assert Decimal(first["saved_usd"]) > 0, first
    key, c, b, job_id, n_by_status, cap = capped_job(stack, engine, api, tmp_path, project, key=key,
                                                     spent_before=Decimal(first["cost_usd"]))
    done, deferred = n_by_status.get("succeeded", 0), n_by_status["deferred"]
    assert done > 0 and deferred > 0
    try:
        browser.get(api + "/")
        assert browser.current_url.endswith("/login")   # behind a login
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "login").click()
        wait_for(lambda: browser.current_url.rstrip("/") == api, timeout=30, what="the jobs page")
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
        assert "running" in row.text and f"{done} / {done + deferred} done" in row.text, row.text
        assert b.id in row.text and "2 rejected" in row.text
        assert f"of ${cap.normalize():f} cap" in browser.find_element(By.ID, "project-spend").text
        ended = browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{first_job}"]').text
        assert "completed" in ended and "8 / 8 done" in ended and f"${usd(first['saved_usd'])}" in ended, ended
        shot = Path(os.environ.get("LLMBATCH_WEB_SCREENSHOT") or tmp_path / "jobs-page.png")
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"\njobs page mid-job: {row.text!r}; screenshot {shot}")

        row.find_element(By.TAG_NAME, "a").click()
        wait_for(lambda: browser.current_url.endswith(f"/jobs/{job_id}"), timeout=30, what="the job's page")
        assert browser.find_element(By.ID, "job-status").text == "running"
        assert browser.find_element(By.ID, "progress").text.startswith(f"{done} / {done + deferred} done")
        tiers = browser.find_element(By.ID, "tiers").text
        assert tiers.splitlines()[1].startswith("peak") and "deferred" in tiers
        rejected = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    for tr in browser.find_elements(By.CSS_SELECTOR, "#rejected tbody tr")]
        assert [r[1] for r in rejected] == ["bad-<b>model</b>", "bad-url"]   # shown as text
        assert any("<script>window.__pwned = 3</script>" in r[2] or "nowhere" in r[2] for r in rejected)
        assert browser.execute_script("return window.__pwned === undefined")   # nothing of theirs ran
        browser.save_screenshot(str(shot.with_name(shot.stem + "-job.png")))
        assert not browser.find_elements(By.CSS_SELECTOR, "main img, main b, main i")

        browser.find_element(By.ID, "download-results").click()
        target = browser.downloads / f"{job_id}_results.jsonl"
        wait_for(lambda: target.exists() and not list(browser.downloads.glob("*.crdownload")), timeout=60,
                 what="the downloaded results")
        got = [json.loads(x) for x in target.read_text().splitlines()]
        with engine.connect() as conn:
            finished = set(conn.execute(sa.text(
                "SELECT custom_id FROM requests WHERE job_id = :j AND status = 'succeeded'"), {"j": job_id}).scalars())
        assert {x["custom_id"] for x in got} == finished and len(got) == done
        assert all(x["error"] is None and x["response"]["status_code"] == 200 and x["id"].startswith("batch_req_")
                   for x in got)
        assert any(x["custom_id"] == HOSTILE_ID for x in got) == (HOSTILE_ID in finished)
        print(f"downloaded {target.name}: {len(got)} lines, {done} succeeded and {deferred} deferred in the job")
        browser.get(f"{api}/jobs/{first_job}")   # the ended job's savings by lever
        saved = browser.find_element(By.ID, "saved").text
        assert saved.startswith(f"${usd(first['saved_usd'])} saved of ${usd(first['list_cost_usd'])}"), saved
        levers = browser.find_element(By.ID, "levers").text
        assert all(f"{k} ${usd(v)}" in levers for k, v in first["by_lever"].items()), levers
    finally:
        c.batches.cancel(b.id)


class Session:
    """A browser without a browser: cookies kept, redirects followed (or not)."""

    def __init__(self, api: str):
        self.api, self.jar = api, http.cookiejar.CookieJar()
        self.open = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar)).open
        self.set_cookie = ""

    def get(self, path: str) -> tuple[int, str, str]:
        try:
            with self.open(self.api + path, timeout=60) as r:
                return r.status, r.geturl(), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.geturl(), e.read().decode()

    def post(self, path: str, form: dict | None = None) -> tuple[int, str, str]:
        data = urllib.parse.urlencode(form or {}).encode()
        try:
            with self.open(urllib.request.Request(self.api + path, data=data, method="POST"), timeout=60) as r:
                return r.status, r.geturl(), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.geturl(), e.read().decode()

    def login(self, key: str) -> int:
        class Keep(urllib.request.HTTPRedirectHandler):   # the login's own answer, its Set-Cookie
            def redirect_request(self, *a, **k):
                return None
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), Keep())
        req = urllib.request.Request(self.api + "/login", data=urllib.parse.urlencode({"key": key}).encode(),
                                     method="POST")
        try:
            with opener.open(req, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            self.set_cookie = e.headers.get("set-cookie") or ""
            return e.code


def test_a_project_sees_only_its_own_jobs_and_a_session_ends_with_its_key(stack, engine, api, tmp_path):
    ns = time.time_ns() % 10**9
    key_a = new_key(engine, f"weba{ns}")
    key_b = new_key(engine, f"webb{ns}")
    c = client(api, key_a)
    f = c.files.create(file=write_jsonl(tmp_path / "a.jsonl", [line(f"a-{i}", i) for i in range(2)]).open("rb"),
                       purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    job_a = wait_for(lambda: job_of(engine, b.id), timeout=60, what="the batch's job")

    a, other = Session(api), Session(api)
    assert other.login("lb-not-a-key") == 401
    assert other.login(key_b) == 303
    cookie = other.set_cookie.lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and key_b.lower() not in cookie
    assert other.get(f"/jobs/{job_a}")[0] == 404
    assert other.get(f"/jobs/{job_a}/download?kind=results")[0] == 404
    assert other.get(f"/jobs/no-such-job")[0] == 404
    status, _, page = other.get("/")
    assert status == 200 and job_a not in page

    assert a.login(key_a) == 303
    status, _, page = a.get(f"/jobs/{job_a}")
    assert status == 200 and job_a in page
    assert job_a in a.get("/")[2]
    # logging out ends the session
    assert a.post("/logout")[1].endswith("/login")
    assert a.get("/")[1].endswith("/login")
    # revoking the key ends its sessions at once
    with engine.begin() as conn:
        key_id = api_keys.key_of(conn, key_b)[0]
        assert api_keys.revoke_key(conn, key_id)
    status, url, _ = other.get("/")
    assert url.endswith("/login") and status == 200
    assert other.get(f"/jobs/{job_a}")[1].endswith("/login")


def test_savings_daily_is_the_sum_of_its_projects_rows_as_029_defined_it(stack, engine, api, tmp_path):
    """sql/036 rewrote ``savings_daily`` as the sum of ``savings_daily_project`` over projects: it
    answers as 029's literal definition did, and a project's rows are its jobs' results alone."""
    from tests.integration.test_states import _old_view
    project = f"websav{time.time_ns() % 10**9}"
    c = client(api, new_key(engine, project))
    _, job_id = repeats_job(c, engine, tmp_path, n=4)
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT * FROM savings_daily ORDER BY day")).all()
        want = conn.execute(sa.text(f"SELECT * FROM ({_old_view('029_savings.sql', 'savings_daily')}) v"
                                    " ORDER BY day")).all()
        mine = conn.execute(sa.text(
            "SELECT requests, list_cost_usd, cost_usd, saved_usd FROM savings_daily_project WHERE project_id = :p"),
            {"p": project}).all()
        ledger = jobs.job_savings(conn, job_id)
    assert got and got == want
    assert len(mine) == 1 and mine[0].requests == 4
    assert (mine[0].list_cost_usd, mine[0].cost_usd, mine[0].saved_usd) == \
        tuple(Decimal(ledger[k]) for k in ("list_cost_usd", "cost_usd", "saved_usd"))
