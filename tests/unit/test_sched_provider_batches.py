"""Provider batch packing and result mapping (pure: no services)."""

import json
import re

from pipeline.money.pricing import Usage, cost, get_price_book
from pipeline.paths.provider_batch import lines_to_send, outcome_of_line, provider_custom_id, request_line, twins
from pipeline.request import Request
from schedules.pb_submit import pack


def test_pack_respects_request_and_byte_limits():
    assert pack([10] * 7, max_requests=3, max_bytes=10_000) == [(0, 3), (3, 6), (6, 7)]
    assert pack([40, 40, 40, 10], max_requests=100, max_bytes=90) == [(0, 2), (2, 4)]
    # an item over the byte limit alone still gets a chunk (the provider will say why)
    assert pack([200, 10], max_requests=100, max_bytes=90) == [(0, 1), (1, 2)]
    assert pack([], 10, 10) == []


def test_pack_limits_at_provider_scale():
    chunks = pack([100] * 120_000, max_requests=50_000, max_bytes=200_000_000)
    assert [e - s for s, e in chunks] == [50_000, 50_000, 20_000]


def _req(**over) -> Request:
    row = {"job_id": "j", "custom_id": "c", "provider": "openai", "model": "gpt-4o-mini", "tier": "background",
           "attempts": 0, "max_cost_usd": "0.001", "mode": "provider_batch",
           "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    return Request.from_row({**row, **over})


def test_provider_custom_id_is_unique_and_valid_for_anthropic():
    a = provider_custom_id(_req(job_id="job_1", custom_id="x"))
    assert a != provider_custom_id(_req(job_id="job_2", custom_id="x"))
    assert a == provider_custom_id(_req(job_id="job_1", custom_id="x"))
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", a)


def test_request_lines_in_provider_shapes():
    req = _req()
    oa = json.loads(request_line(req))
    assert oa == {"custom_id": provider_custom_id(req), "method": "POST", "url": "/v1/chat/completions",
                  "body": req.body}
    an = json.loads(request_line(_req(provider="anthropic")))
    assert an == {"custom_id": provider_custom_id(req), "params": req.body}


REQ = _req()


def test_openai_success_costs_half():
    body = {"object": "chat.completion", "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    line = {"custom_id": "q", "response": {"status_code": 200, "request_id": "req_1", "body": body}, "error": None}
    outcome, attempt, not_run = outcome_of_line(REQ, line, get_price_book())
    price = get_price_book().resolve("gpt-4o-mini")
    full = cost(price, Usage(1000, 500, 0))
    assert not_run is None and outcome.status == "succeeded" and outcome.response == body
    assert outcome.cost * 2 == full and outcome.list_cost == full and outcome.lever == "batch"
    assert attempt["cost_usd"] == outcome.to_row()["cost_usd"] and attempt["attempt"] == 1


def test_openai_error_and_not_run():
    err = {"custom_id": "q", "response": {"status_code": 400, "request_id": "r",
                                          "body": {"error": {"message": "bad", "type": "invalid_request_error"}}},
           "error": None}
    outcome, _, _ = outcome_of_line(REQ, err, get_price_book())
    assert outcome.status == "failed" and outcome.status_code == 400 and outcome.to_row()["cost_usd"] == "0"
    never = {"custom_id": "q", "response": None, "error": {"code": "batch_expired", "message": "x"}}
    assert outcome_of_line(REQ, never, get_price_book()) == (None, None, "batch_expired")


def test_anthropic_results():
    model = next(m for m in get_price_book().known_models() if get_price_book().resolve(m).provider == "anthropic")
    req = _req(provider="anthropic", model=model, body={"model": model, "max_tokens": 10, "messages": []})
    msg = {"id": "msg_1", "type": "message", "usage": {"input_tokens": 100, "output_tokens": 20}}
    ok, _, _ = outcome_of_line(req, {"custom_id": "q", "result": {"type": "succeeded", "message": msg}},
                               get_price_book())
    assert ok.status == "succeeded" and ok.response == msg and ok.provider_request_id == "msg_1"
    assert ok.cost * 2 == cost(get_price_book().resolve(model), Usage(100, 20, 0))
    bad, _, _ = outcome_of_line(req, {"custom_id": "q", "result": {"type": "errored", "error": {
        "type": "error", "error": {"type": "invalid_request_error", "message": "no"}}}}, get_price_book())
    assert bad.status == "failed" and bad.status_code == 400
    assert outcome_of_line(req, {"custom_id": "q", "result": {"type": "expired"}}, get_price_book())[2] == "expired"


# ------------------------------------------------------------------ finding a lost Anthropic creation

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

from pipeline.providers.batch_api import match_anthropic  # noqa: E402


@st.composite
def worlds(draw):
    """Unconfirmed creations (intents) and the provider's batches no row of ours owns: for each
    intent, maybe the batch its lost attempt made (inside its window, running or ended), plus
    foreign batches of any count, time and content."""
    intents, batches, truth = [], [], {}
    for k in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 4))
        start = draw(st.integers(0, 100))
        intent = {"id": f"pb{k}", "requests": n, "pids": {f"q{k}_{j}" for j in range(n)},
                  "start": start, "end": start + draw(st.integers(0, 50))}
        intents.append(intent)
        if draw(st.booleans()):
            ended = draw(st.booleans())
            b = {"id": f"made{k}", "total": n, "created": draw(st.integers(intent["start"], intent["end"])),
                 "status": "ended" if ended else "in_progress", "pids": intent["pids"] if ended else None}
            batches.append(b)
            truth[intent["id"]] = b["id"]
    for k in range(draw(st.integers(0, 4))):
        n = draw(st.integers(1, 4))
        ended = draw(st.booleans())
        batches.append({"id": f"foreign{k}", "total": n, "created": draw(st.integers(0, 160)),
                        "status": "ended" if ended else "in_progress",
                        "pids": {f"x{k}_{j}" for j in range(n)} if ended else None})
    return intents, batches, truth


@hsettings(max_examples=200, deadline=None)
@given(worlds())
def test_a_lost_creation_is_matched_to_its_own_batch_or_waited_for(world):
    intents, batches, truth = world
    out = match_anthropic(intents, batches)
    adopted = [v[1]["provider_batch_id"] for v in out.values() if v[0] == "found"]
    assert len(adopted) == len(set(adopted)), out            # no provider batch adopted twice
    by_id = {b["id"]: b for b in batches}
    for i in intents:
        verdict = out[i["id"]]
        if i["id"] in truth:                                  # the provider made it: never sent again
            assert verdict[0] != "none", (i, verdict)
        if verdict[0] == "found":
            b = by_id[verdict[1]["provider_batch_id"]]
            if b["pids"] is not None:                         # an ended batch: by its custom_ids only
                assert b["pids"] == i["pids"], (i, b)
            assert b["total"] == i["requests"] and i["start"] <= b["created"] <= i["end"]
        if verdict[0] == "none":   # nothing in its window could be its batch: none running of its
            assert not any(b["total"] == i["requests"] and i["start"] <= b["created"] <= i["end"]   # count,
                           and b["pids"] in (None, i["pids"]) for b in batches)   # none ended with its ids


def test_a_running_batch_two_creations_could_have_made_is_not_adopted_until_it_ends():
    a = {"id": "pbA", "requests": 2, "pids": {"a1", "a2"}, "start": 0, "end": 10}
    b = {"id": "pbB", "requests": 2, "pids": {"b1", "b2"}, "start": 5, "end": 15}
    running = {"id": "m1", "total": 2, "created": 7, "status": "in_progress", "pids": None}
    out = match_anthropic([a, b], [running])
    assert out["pbA"][0] == out["pbB"][0] == "unsure"
    ended = dict(running, status="ended", pids={"b1", "b2"})
    out = match_anthropic([a, b], [ended])
    assert out["pbB"] == ("found", {"provider_batch_id": "m1", "input_file_id": None, "provider_status": "ended"})
    assert out["pbA"] == ("none",)


def test_identical_deterministic_requests_are_one_line_and_the_others_its_twins():
    reqs = [_req(custom_id="a", cache_key="k1"), _req(custom_id="b", cache_key="k2"),
            _req(custom_id="c", cache_key="k1"), _req(custom_id="d"), _req(custom_id="e"),
            _req(job_id="j2", custom_id="a", cache_key="k1")]
    assert [r.key for r in lines_to_send(reqs)] == [r.key for r in (reqs[0], reqs[1], reqs[3], reqs[4])]
    assert {pid: [r.key for r in rs] for pid, rs in twins(reqs).items()} == {
        provider_custom_id(reqs[0]): [reqs[2].key, reqs[5].key]}
    assert lines_to_send(reqs[3:5]) == reqs[3:5] and twins(reqs[3:5]) == {}   # no key: every line sent
