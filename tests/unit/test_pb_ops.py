"""Provider batches as an operator runs them (schedules/pb_queue.py, schedules/pb_submit.py ``pack``,
schedules/pb_ingest.py ``read_lines``): the combinatorial parts, as properties (no services)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings as hsettings, strategies as st

from pipeline.config import Settings
from pipeline.money.pricing import get_price_book
from pipeline.paths.provider_batch import lines_to_send, provider_custom_id
from pipeline.request import Request
from schedules.pb_ingest import read_lines
from schedules.pb_queue import NOT_RESUBMITTED, RETRYABLE_STATUS, NotRun, admit, split_not_run
from schedules.pb_submit import pack, pack_by_endpoint

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
SETTINGS = Settings()


# ------------------------------------------------------------------ splitting by count and bytes

@hsettings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 5_000), max_size=300), max_requests=st.integers(1, 60),
       max_bytes=st.integers(1, 20_000), weighted=st.booleans(), data=st.data())
def test_pack_covers_every_line_once_in_order_within_both_limits_and_never_splits_early(
        sizes, max_requests, max_bytes, weighted, data):
    weights = data.draw(st.lists(st.integers(1, 5), min_size=len(sizes), max_size=len(sizes))) if weighted else None
    w = weights or [1] * len(sizes)
    chunks = pack(sizes, max_requests, max_bytes, weights)
    # consecutive, covering, non-empty
    assert [i for s, e in chunks for i in range(s, e)] == list(range(len(sizes)))
    assert all(e > s for s, e in chunks)
    for k, (s, e) in enumerate(chunks):
        count, size = sum(w[s:e]), sum(sizes[s:e])
        if e - s > 1:   # a line alone over a limit still goes alone (the provider says why)
            assert count <= max_requests and size <= max_bytes
        if k + 1 < len(chunks):   # greedy: the next line would not have fitted
            assert count + w[e] > max_requests or size + sizes[e] > max_bytes


def test_pack_at_the_providers_limits():
    # OpenAI: 50,000 requests or 200 MB; Anthropic: 100,000 or 256 MB. 120,000 lines of 3,000 bytes:
    openai = pack([3_000] * 120_000, 50_000, 200_000_000)
    anthropic = pack([3_000] * 120_000, 100_000, 256_000_000)
    assert [e - s for s, e in openai] == [50_000, 50_000, 20_000]          # the count binds
    assert [e - s for s, e in anthropic] == [85_333, 34_667]               # the bytes bind


def _req(i: int, endpoint: str = "/v1/chat/completions", cache_key: str | None = None, **over) -> Request:
    row = {"job_id": "job_t", "custom_id": f"c{i}", "provider": "openai", "model": "gpt-4o-mini",
           "tier": "background", "attempts": 0, "max_cost_usd": "0.001", "mode": "provider_batch",
           "endpoint": endpoint, "cache_key": cache_key, "input_tokens": 10,
           "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}}
    return Request.from_row({**row, **over})


@hsettings(max_examples=150, deadline=None)
@given(endpoints=st.lists(st.sampled_from(["/v1/chat/completions", "/v1/responses"]), max_size=80),
       max_requests=st.integers(1, 10))
def test_a_provider_batch_holds_one_endpoint(endpoints, max_requests):
    reqs = sorted((_req(i, e) for i, e in enumerate(endpoints)), key=lambda r: r.endpoint)
    chunks = pack_by_endpoint(reqs, [100] * len(reqs), max_requests, 10**9)
    assert [i for s, e in chunks for i in range(s, e)] == list(range(len(reqs)))
    assert all(len({r.endpoint for r in reqs[s:e]}) == 1 and e - s <= max_requests for s, e in chunks)


# ------------------------------------------------------------------ the batch queue

@hsettings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 5_000), max_size=60), limit=st.integers(1, 20_000), data=st.data())
def test_admitted_work_never_overfills_the_queue_and_takes_all_the_room_it_can_in_order(tokens, limit, data):
    room = data.draw(st.integers(0, limit))
    admitted, too_big = admit(tokens, room, limit)
    assert sum(tokens[i] for i in admitted) <= room
    assert too_big == [i for i, t in enumerate(tokens) if t > limit]
    fits = [i for i in range(len(tokens)) if i not in too_big]
    assert admitted == fits[:len(admitted)], "in order, no line jumps the queue"
    if len(admitted) < len(fits):   # the next one did not fit
        assert sum(tokens[i] for i in admitted) + tokens[fits[len(admitted)]] > room
    assert admit(tokens, None, None) == (list(range(len(tokens))), [])
    # a limit learnt from a refusal (none told): the room applies, nothing is too big
    learnt, none = admit(tokens, room, None)
    assert none == [] and sum(tokens[i] for i in learnt) <= room and learnt == list(range(len(learnt)))


# ------------------------------------------------------------------ lines not run

@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["expired", "batch_expired", "batch_failed", "error_500", "canceled",
                                           "batch_cancelled", "error_429"]),
                          st.one_of(st.none(), st.integers(-5, 200)), st.integers(0, 4)), max_size=40))
def test_only_lines_a_new_batch_can_still_answer_in_time_are_resubmitted(items):
    lead = timedelta(seconds=SETTINGS.provider_batch_deadline_lead_s)
    nr = [NotRun(i, why, None if h is None else NOW + timedelta(hours=h), n) for i, (why, h, n) in enumerate(items)]
    again, back = split_not_run(nr, NOW, SETTINGS)
    assert sorted(again + back) == list(range(len(items)))
    for it in nr:
        in_time = it.deadline is None or it.deadline >= NOW + timedelta(hours=24) + lead
        expect = it.why not in NOT_RESUBMITTED and it.resubmits < SETTINGS.provider_batch_resubmits and in_time
        assert (it.key in again) == expect, it


def _line(req: Request, kind: str) -> dict | None:
    pid = provider_custom_id(req)
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    if kind == "ok":
        return {"custom_id": pid, "response": {"status_code": 200, "request_id": "r", "body": {
            "id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}]}},
            "error": None}
    if kind == "missing":
        return None
    if kind == "expired":
        return {"custom_id": pid, "response": None, "error": {"code": "batch_expired", "message": "m"}}
    status = int(kind)
    return {"custom_id": pid, "response": {"status_code": status, "request_id": "r", "body": {
        "error": {"message": "no", "type": "t", "code": "c"}}}, "error": None}


@hsettings(max_examples=250, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["ok", "missing", "expired", "400", "404", "429",
                                                              "500", "503", "529"])), min_size=1, max_size=40))
def test_the_resubmission_set_is_exactly_the_lines_without_a_billed_or_final_answer(spec):
    # some requests share a cache key (sent once: their twins take the answer)
    reqs = [_req(i, cache_key=f"k{key}" if key < 3 else None) for i, (key, _) in enumerate(spec)]
    sent = lines_to_send(reqs)
    kinds = {provider_custom_id(r): spec[int(r.custom_id[1:])][1] for r in sent}
    lines = [x for r in sent if (x := _line(r, kinds[provider_custom_id(r)])) is not None]
    outcomes, attempts, seen, not_run, counts = read_lines(reqs, lines, get_price_book())
    pids = {provider_custom_id(r) for r in reqs}
    assert seen | set(not_run) == pids and not seen & set(not_run), "each request answered or not run, never both"
    lead_of = {}
    for r in reqs:
        lead = next(x for x in sent if x.cache_key is not None and x.cache_key == r.cache_key) \
            if r.cache_key is not None else r
        lead_of[provider_custom_id(r)] = kinds[provider_custom_id(lead)]
    for pid, kind in lead_of.items():
        final = kind == "ok" or (kind not in ("missing", "expired") and int(kind) not in RETRYABLE_STATUS)
        is_lead = pid in kinds
        if is_lead:
            assert (pid in seen) == final, (pid, kind)
        else:   # a twin: answered only by its line's success
            assert (pid in seen) == (kind == "ok"), (pid, kind)
    billed = {o.custom_id for o in outcomes if o.cost}
    assert not {provider_custom_id(_req(int(c[1:]))) for c in billed} & set(not_run), "a billed line is never sent again"
    assert len(outcomes) == len(seen) == len({(o.job_id, o.custom_id) for o in outcomes})
