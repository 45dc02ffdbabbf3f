"""The cost engine's choice (pipeline/paths/chooser.py) over generated requests: never a path that
misses the deadline when one meets it, never a dearer path than needed, never one that cannot
serve the request; and the price windows it plans by (pipeline/money/price_windows.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.constants import ANTHROPIC_MESSAGES_URL, CHAT_URL, COMPLETIONS_URL
from pipeline.errors import ConfigError, LineError
from pipeline.money.bounds import Bound
from pipeline.money.price_windows import PriceWindow, cheapest_start, multiplier_at
from pipeline.money.pricing import PriceBook, Usage, cost
from pipeline.paths.chooser import NO_DEADLINE, choose, options
from pipeline.paths.registry import all_paths, choose_path
from pipeline.request import Request

BOOK = PriceBook.load(kinds={"openai": "openai", "anthropic": "anthropic", "deepseek": "openai"})
CHAT_MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-5-mini", "o3", "claude-haiku-4-5", "claude-sonnet-4-5",
               "deepseek-flash", "deepseek-v4-pro"]
#: Monday 2026-12-07 02:00 UTC = 10:00 Beijing: peak at DeepSeek until 12:00 Beijing (04:00 UTC)
MONDAY_PEAK = datetime(2026, 12, 7, 2, 0, tzinfo=timezone.utc)


def request(model: str, tier: str = "offpeak", deadline: datetime | None = None, *, url: str | None = None,
            input_tokens: int = 1500, output_tokens: int = 200, body: dict | None = None) -> Request:
    price = BOOK.resolve(model)
    url = url or (ANTHROPIC_MESSAGES_URL if price.kind == "anthropic" else CHAT_URL)
    body = body or {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": output_tokens}
    return Request("job_1", "c-1", url, price.provider, model, "", tier, body,
                   Bound(input_tokens, output_tokens, Decimal(1), True), deadline=deadline)


MARGIN = timedelta(minutes=15)


def chosen(req: Request, now: datetime, tier_opens: datetime | None = None):
    return choose(req, BOOK.resolve(req.model), now, all_paths(), tier_opens=tier_opens, margin=MARGIN)


# ---------------------------------------------------------------- properties over generated requests

instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31),
                        timezones=st.just(timezone.utc))


@settings(max_examples=400, deadline=None)
@given(model=st.sampled_from(CHAT_MODELS), tier=st.sampled_from(["offpeak", "background"]), now=instants,
       deadline_s=st.one_of(st.none(), st.integers(min_value=0, max_value=72 * 3600)),
       inp=st.integers(min_value=0, max_value=200_000), out=st.integers(min_value=0, max_value=16_000),
       opens_s=st.one_of(st.none(), st.integers(min_value=0, max_value=24 * 3600)))
def test_the_choice_meets_the_deadline_when_a_path_can_and_is_never_dearer_than_needed(
        model, tier, now, deadline_s, inp, out, opens_s):
    deadline = None if deadline_s is None else now + timedelta(seconds=deadline_s)
    opens = None if opens_s is None else now + timedelta(seconds=opens_s)   # the off-peak window's opening
    req = request(model, tier, deadline, input_tokens=inp, output_tokens=out)
    price = BOOK.resolve(model)
    choice = chosen(req, now, opens)
    by = deadline or now + NO_DEADLINE
    found = options(req, price, now, all_paths(), by, tier_opens=opens, margin=MARGIN)
    assert choice.path.why_not(req, price) is None, "it chose a path that cannot serve the request"
    mine = next(o for o in found if o.path is choice.path)
    meeting = [o for o in found if o.done <= by]
    if meeting:
        assert mine.done <= by, f"{choice.path.name} misses {by} while {meeting[0].path.name} meets it"
        assert mine.quote == min(o.quote for o in meeting), "a cheaper path met the deadline"
    else:
        assert mine.done == min(o.done for o in found), "none meets it: the fastest is taken"
    if deadline is not None and deadline - now < timedelta(hours=1):
        assert choice.path.name != "provider_batch"
    assert choice.reason.startswith("auto: ") and len(choice.reason) <= 300


@settings(max_examples=200, deadline=None)
@given(model=st.sampled_from(CHAT_MODELS), tier=st.sampled_from(["immediate", "peak"]), now=instants,
       deadline_s=st.one_of(st.none(), st.integers(min_value=0, max_value=72 * 3600)))
def test_immediate_and_peak_stay_realtime(model, tier, now, deadline_s):
    deadline = None if deadline_s is None else now + timedelta(seconds=deadline_s)
    assert chosen(request(model, tier, deadline), now).path.name == "realtime"


# ---------------------------------------------------------------- what it picks, by name

@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "claude-sonnet-4-5"])
def test_off_peak_without_a_deadline_goes_to_the_provider_batch(model):
    choice = chosen(request(model), MONDAY_PEAK)
    assert choice.path.name == "provider_batch", choice.reason
    assert "0.50×" in choice.reason and "no deadline" in choice.reason


@pytest.mark.parametrize("hours", [0.1, 0.5, 0.99, 12, 23.9])
def test_a_deadline_under_a_day_never_goes_to_the_provider_batch(hours):
    choice = chosen(request("gpt-4o-mini", deadline=MONDAY_PEAK + timedelta(hours=hours)), MONDAY_PEAK)
    assert choice.path.name == "realtime", choice.reason
    assert "cheaper provider_batch would miss it" in choice.reason


def test_a_flex_model_takes_flex_at_the_batch_price_sooner_than_a_batch():
    assert chosen(request("gpt-5-mini"), MONDAY_PEAK).path.name == "flex"
    # a deadline under flex's 15 minutes: realtime
    assert chosen(request("gpt-5-mini", deadline=MONDAY_PEAK + timedelta(minutes=10)), MONDAY_PEAK).path.name \
        == "realtime"


def test_a_model_without_a_batch_api_is_never_sent_to_one():
    body = {"model": "davinci-002", "prompt": "hi", "max_tokens": 10}
    choice = chosen(request("davinci-002", url=COMPLETIONS_URL, body=body), MONDAY_PEAK)
    assert choice.path.name == "realtime", choice.reason


def test_deepseek_waits_for_its_off_peak_window_when_the_deadline_allows():
    # 10:00 Beijing on a Monday is peak; the window opens at 12:00 Beijing (04:00 UTC)
    choice = chosen(request("deepseek-flash", deadline=MONDAY_PEAK + timedelta(hours=6)), MONDAY_PEAK)
    assert choice.path.name == "window", choice.reason
    assert "0.50×" in choice.reason and "2026-12-07T04:01" in choice.reason
    # a deadline before the window opens: realtime at list price
    choice = chosen(request("deepseek-flash", deadline=MONDAY_PEAK + timedelta(hours=1)), MONDAY_PEAK)
    assert choice.path.name == "realtime" and "cheaper window would miss it" in choice.reason
    # inside a window already: it goes now, at the window's price
    inside = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)   # 20:00 Beijing
    choice = chosen(request("deepseek-flash"), inside)
    assert choice.path.name in ("realtime", "window") and "0.50× list price" in choice.reason
    assert "2026-12-07T12:01" in choice.reason


def test_an_offpeak_realtime_option_starts_when_the_offpeak_window_opens():
    """Realtime off-peak work waits for the off-peak window: it is quoted and expected from then."""
    req = request("deepseek-flash", deadline=MONDAY_PEAK + timedelta(hours=30))
    opens = MONDAY_PEAK.replace(hour=22)   # 06:00 Beijing on Tuesday: off-peak at DeepSeek too
    found = {o.path.name: o for o in options(req, BOOK.resolve("deepseek-flash"), MONDAY_PEAK, all_paths(),
                                             req.deadline, tier_opens=opens, margin=MARGIN)}
    assert found["realtime"].done == opens + timedelta(minutes=1)
    assert found["realtime"].quote == found["window"].quote   # both at the off-peak price
    assert found["window"].done == MONDAY_PEAK.replace(hour=4, minute=1)
    assert chosen(req, MONDAY_PEAK, opens).path.name == "window"   # as cheap, and sooner
    # a deadline before the window opens: the scheduler releases it at its latest start
    short = request("gpt-4o-mini", deadline=MONDAY_PEAK + timedelta(hours=3))
    o = {x.path.name: x for x in options(short, BOOK.resolve("gpt-4o-mini"), MONDAY_PEAK, all_paths(),
                                          short.deadline, tier_opens=opens, margin=MARGIN)}
    assert o["realtime"].done == short.deadline - MARGIN + timedelta(minutes=1)


def test_a_job_mode_other_than_auto_is_kept_and_a_flex_body_takes_flex():
    req = request("gpt-4o-mini")
    assert choose_path("realtime", req, BOOK.resolve("gpt-4o-mini"), MONDAY_PEAK)[0].name == "realtime"
    flexed = request("gpt-5-mini", body={"model": "gpt-5-mini", "messages": [], "service_tier": "flex"})
    path, why = choose_path("auto", flexed, BOOK.resolve("gpt-5-mini"), MONDAY_PEAK)
    assert path.name == "flex" and "body" in why


# ---------------------------------------------------------------- price windows

def test_deepseek_windows_say_what_its_page_says_in_utc():
    """Peak (list price) 01:00-04:00 and 06:00-10:00 UTC Monday to Friday; half price otherwise."""
    price = BOOK.resolve("deepseek-flash")
    for day in range(7, 14):   # Monday 7 December to Sunday 13 December 2026
        for hour in range(24):
            at = datetime(2026, 12, day, hour, 30, tzinfo=timezone.utc)
            peak = at.weekday() < 5 and (1 <= hour < 4 or 6 <= hour < 10)
            assert price.multiplier_at(at) == (Decimal(1) if peak else Decimal("0.5")), at


def test_a_call_in_a_window_costs_the_multiplier_times_every_part_of_the_list_price():
    price = BOOK.resolve("deepseek-flash")
    usage = Usage(2_000_000, 1_000_000, cached_input_tokens=1_000_000)
    listed = cost(price, usage)
    assert listed == Decimal("0.30") + Decimal("0.006") + Decimal("1.20")
    assert cost(price, usage, multiplier=price.multiplier_at(datetime(2026, 12, 12, 3, tzinfo=timezone.utc))) \
        == listed / 2


def test_cheapest_start_is_the_earliest_lowest_within_the_deadline():
    w = (PriceWindow.parse({"timezone": "UTC", "start": "22:00", "end": "24:00", "multiplier": "0.5"}, "t"),
         PriceWindow.parse({"timezone": "UTC", "start": "23:00", "end": "24:00", "multiplier": "0.25"}, "t"))
    now = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
    assert cheapest_start(w, now, now + timedelta(hours=10, minutes=30)) == (now.replace(hour=22), Decimal("0.5"))
    assert cheapest_start(w, now, now + timedelta(hours=12)) == (now.replace(hour=23), Decimal("0.25"))
    assert cheapest_start(w, now, now + timedelta(hours=1)) == (now, Decimal(1))
    assert multiplier_at(w, now.replace(hour=23, minute=30)) == Decimal("0.25")


@pytest.mark.parametrize("raw,match", [
    ({"start": "10:00", "end": "09:00", "multiplier": "0.5"}, "after start"),
    ({"start": "10:00", "end": "11:00", "multiplier": "1.5"}, "within 0..1"),
    ({"start": "10:00", "end": "11:00", "multiplier": 0.5}, "decimal string"),
    ({"start": "25:00", "end": "26:00", "multiplier": "0.5"}, "time of day"),
    ({"start": "10:00", "end": "11:00", "multiplier": "0.5", "timezone": "Mars/Olympus"}, "IANA"),
    ({"start": "10:00", "end": "11:00", "multiplier": "0.5", "days": ["someday"]}, "days"),
])
def test_a_bad_window_is_refused_with_the_reason(raw, match):
    with pytest.raises(ConfigError, match=match):
        PriceWindow.parse(raw, "pricing.json: model 'x'")


# ---------------------------------------------------------------- pricing as data

def test_batch_support_limits_cache_minimums_and_ratios_are_data():
    assert BOOK.resolve("gpt-4o").batch == "openai" and BOOK.resolve("claude-haiku-4-5").batch == "anthropic"
    assert (BOOK.resolve("gpt-4o").batch_max_requests, BOOK.resolve("gpt-4o").batch_max_bytes) == (50_000, 200_000_000)
    assert BOOK.resolve("claude-sonnet-4-5").batch_max_requests == 100_000
    for model in ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002", "deepseek-flash"):
        assert BOOK.resolve(model).batch is None, model
    assert {m: BOOK.resolve(m).cached_ratio for m in ("gpt-4o", "gpt-4.1", "gpt-5", "claude-haiku-4-5")} == {
        "gpt-4o": Decimal("0.5"), "gpt-4.1": Decimal("0.25"), "gpt-5": Decimal("0.1"),
        "claude-haiku-4-5": Decimal("0.1")}
    assert {m: BOOK.resolve(m).min_cache_tokens for m in (
        "gpt-4o-mini", "claude-sonnet-4-5", "claude-opus-4-1", "claude-3-5-haiku-latest", "claude-haiku-4-5",
        "claude-opus-4-5")} == {"gpt-4o-mini": 1024, "claude-sonnet-4-5": 1024, "claude-opus-4-1": 1024,
                                "claude-3-5-haiku-latest": 2048, "claude-haiku-4-5": 4096, "claude-opus-4-5": 4096}
    assert [m for m in ("gpt-5", "gpt-5-mini", "o3", "gpt-4o") if BOOK.resolve(m).flex] == ["gpt-5", "gpt-5-mini", "o3"]


def test_deepseek_is_priced_only_where_a_deepseek_provider_is_configured():
    assert "deepseek-flash" not in PriceBook.load()
    assert BOOK.resolve("deepseek-v4-flash") is BOOK.resolve("deepseek-flash")


# ---------------------------------------------------------------- in the batcher's decode, and at submit

def _message(tier: str, mode: str | None, deadline: datetime | None = None, model: str = "gpt-4o-mini",
             url: str = CHAT_URL, body: dict | None = None) -> bytes:
    import json

    from pipeline.intake.formats import parse_request
    from pipeline.intake.producer import to_message
    body = body or {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "x1", "method": "POST", "url": url, "body": body}
    req = parse_request(line, PriceBook.load())
    m = json.loads(to_message("job_1", 3, req, tier=tier, **({"mode": mode} if mode else {})))
    if deadline is not None:
        m["deadline"] = deadline.isoformat()
    return json.dumps(m).encode()


@pytest.mark.parametrize("tier,mode,deadline_h,path", [
    ("offpeak", None, None, "provider_batch"),       # auto is the default
    ("background", "auto", None, "provider_batch"),
    ("offpeak", "auto", 0.5, "realtime"),
    ("offpeak", "auto", 30, "provider_batch"),
    ("peak", None, None, "realtime"),
    ("immediate", "auto", None, "realtime"),
    ("offpeak", "realtime", None, "realtime"),         # a job that asks keeps its path
    ("peak", "provider_batch", None, "provider_batch"),
])
def test_the_batcher_gives_each_request_its_path_and_the_reason(tier, mode, deadline_h, path):
    from pipeline.intake.messages import decode
    deadline = None if deadline_h is None else MONDAY_PEAK + timedelta(hours=deadline_h)
    row = decode(_message(tier, mode, deadline), MONDAY_PEAK, PriceBook.load())
    assert row["mode"] == path and row["path_reason"], row["path_reason"]
    assert row["path_reason"].startswith("auto: ") == (mode in (None, "auto"))


def test_a_model_without_a_batch_api_is_refused_provider_batch_naming_the_reason():
    from pipeline.intake.messages import decode
    body = {"model": "davinci-002", "prompt": "hi", "max_tokens": 5}
    with pytest.raises(LineError, match="provider_batch path cannot serve.*davinci-002 has no Batch API"):
        decode(_message("offpeak", "provider_batch", model="davinci-002", url=COMPLETIONS_URL, body=body),
               MONDAY_PEAK, PriceBook.load())
    row = decode(_message("offpeak", "auto", model="davinci-002", url=COMPLETIONS_URL, body=body), MONDAY_PEAK,
                 PriceBook.load())
    assert row["mode"] == "realtime"


def test_a_provider_whose_registry_entry_has_no_batch_api_is_refused_a_provider_batch(monkeypatch):
    from types import SimpleNamespace

    from pipeline.paths import provider_batch
    monkeypatch.setattr(provider_batch, "get_registry",
                        lambda: SimpleNamespace(get=lambda name: SimpleNamespace(batch=None)))
    req = request("gpt-4o-mini")
    assert "provider openai has no Batch API" in provider_batch.PROVIDER_BATCH.why_not(req, BOOK.resolve("gpt-4o-mini"))
    assert chosen(req, MONDAY_PEAK).path.name == "realtime"
