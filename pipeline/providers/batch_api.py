"""The providers' Batch APIs: create, find, poll and cancel a provider batch (OpenAI Files +
Batches, Anthropic Message Batches) through the official async SDKs.

Every call goes out on the batch's key (``key_alias``: chosen by the scheduler when the batch is
first sent, by headroom among the live keys as realtime chooses, and kept on its row). The
scheduler (schedules/pb_submit.py, schedules/pb_ingest.py) and ``cancel_job``
(pipeline/stores/jobs.py) call these; they hold no Postgres transaction and write nothing:
what a call means for our rows is decided by its caller. ``create`` makes one attempt with
the SDK's retries off (a retried create is a second batch, billed twice).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

from pipeline.config import Settings
from pipeline.constants import CHAT_URL
from pipeline.errors import ConfigError, PermanentProviderError
from pipeline.providers.base import http_response
from pipeline.providers.registry import KeySpec, ProviderSpec, get_registry

log = logging.getLogger(__name__)

OPENAI_ENDED = ("completed", "failed", "expired", "cancelled")
OPENAI_CANCEL_CONFIRMED = ("cancelling",) + OPENAI_ENDED
ANTHROPIC_CANCEL_CONFIRMED = ("canceling", "ended")
#: how far the provider's clock may be from ours, when matching a batch to its creation window
CLOCK_SKEW_S = 60.0


def batch_format(provider: str) -> str:
    """The Batch API a provider speaks (``openai`` or ``anthropic``); a provider with none is refused."""
    spec = get_registry().get(provider)
    if spec.batch is None:
        raise PermanentProviderError(f"provider {provider!r} has no Batch API (its entry sets no batch)")
    return spec.batch


def cancel_confirmed(provider: str) -> tuple:
    """The provider statuses that confirm a cancel, in its Batch API's words."""
    return _API[batch_format(provider)].cancel_confirmed


def _key(spec: ProviderSpec, key_alias: str | None) -> KeySpec:
    """The key a Batch API call goes out on: the batch's own (``key_alias``, chosen by the scheduler
    as realtime chooses: pipeline/providers/keys.py ``Keys.best``), else the provider's first."""
    if key_alias is not None:
        try:
            return spec.key(key_alias)
        except ConfigError:   # the key left the configuration: the provider's first one asks instead
            log.warning("provider %s has no key %r any more: its batch is asked on key %r",
                        spec.name, key_alias, spec.keys[0].alias)
    return spec.keys[0]


def _client(settings: Settings, provider: str, *, key_alias: str | None = None, retries: int = 2,
            timeout: float = 120):
    """An async SDK client of the provider's Batch API format, on the batch's key (``_key``)."""
    spec = get_registry().get(provider)
    if batch_format(provider) == "openai":
        from openai import AsyncOpenAI as sdk
    else:
        from anthropic import AsyncAnthropic as sdk
    return sdk(api_key=_key(spec, key_alias).reveal(), base_url=spec.base_url, max_retries=retries,
               timeout=timeout)


@dataclass(frozen=True)
class _Format:
    """What differs between the two Batch APIs where a batch is read, cancelled or its status told."""

    batches: Callable         # client -> its batches resource
    status_field: str         # the batch object's status attribute
    ended: tuple              # the statuses after which nothing runs any more
    cancel_confirmed: tuple

    def status(self, batch) -> str:
        return getattr(batch, self.status_field)


_API = {
    "openai": _Format(lambda c: c.batches, "status", OPENAI_ENDED, OPENAI_CANCEL_CONFIRMED),
    "anthropic": _Format(lambda c: c.messages.batches, "processing_status", ("ended",), ANTHROPIC_CANCEL_CONFIRMED),
}


def _jsonl(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


async def _anthropic_results(client, results_url: str) -> list[dict]:
    resp = await client.get(results_url, cast_to=http_response, options={"headers": {"Accept": "application/binary"}})
    return _jsonl(resp.text)


class NotCreated(PermanentProviderError):
    """The provider answered that it did not create the batch (a 4xx): safe to send again."""


def _refused(e: Exception) -> bool:
    """A 4xx answer (but a 408 timeout) says the provider did not act; anything else may hide a batch."""
    status = getattr(e, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status != 408


async def create(settings: Settings, pb_id: str, provider: str, content: bytes, lines: list,
                  cancelled=lambda: False, *, endpoint: str = CHAT_URL, key_alias: str | None = None) -> dict:
    """One attempt, no SDK retries (a retried create is a second batch); an OpenAI batch is
    created for ``endpoint``, the url of every line of ``content``, on key ``key_alias`` (``key_alias``
    in the answer: the key the batch is read and cancelled with). Raises ``NotCreated`` when
    the provider refused; any other exception leaves the outcome unknown. When ``cancelled()`` says
    the job was cancelled while the call was under way, the new batch is cancelled at once, on the
    same connection (``cancel_status`` in the answer): every moment lets the provider run lines."""
    key_alias = _key(get_registry().get(provider), key_alias).alias
    kw = {"retries": 0, "timeout": settings.provider_batch_create_timeout_s, "key_alias": key_alias}
    try:
        if batch_format(provider) == "openai":
            async with _client(settings, provider, **kw) as client:
                try:   # a file alone is never billed: a failed upload is a refusal
                    f = await client.files.create(file=(f"{pb_id}.jsonl", content), purpose="batch")
                except Exception as e:
                    raise NotCreated(f"input file upload failed: {e}") from e
                b = await client.batches.create(
                    input_file_id=f.id, endpoint=endpoint, completion_window="24h", metadata={"llmbatch_id": pb_id},
                    # the output files live this long (the scheduler copies them long before: schedules/pb_queue.py)
                    output_expires_after={"anchor": "created_at", "seconds": settings.provider_batch_output_keep_s})
                info = {"provider_batch_id": b.id, "input_file_id": f.id, "key_alias": key_alias}
                return await _created(_API["openai"], client, b, info, cancelled)
        async with _client(settings, provider, **kw) as client:
            b = await client.messages.batches.create(requests=lines)
            return await _created(_API["anthropic"], client, b, {"provider_batch_id": b.id, "input_file_id": None,
                                                                 "key_alias": key_alias}, cancelled)
    except NotCreated:
        raise
    except Exception as e:
        if _refused(e):
            raise NotCreated(str(e)) from e
        raise


async def _created(api: _Format, client, batch, info: dict, cancelled) -> dict:
    """``info`` with the new batch's status; cancelled at once when ``cancelled()`` says so
    (``cancel_status``: the status the cancel answered, None when it failed and the scheduler
    sends it again)."""
    info["provider_status"] = api.status(batch)
    if cancelled():
        try:
            info["cancel_status"] = api.status(await api.batches(client).cancel(batch.id))
        except Exception as e:
            log.warning("cancelling a provider batch just created failed (the scheduler retries): %s", e)
            info["cancel_status"] = None
    return info


def _epoch(value) -> float:
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


async def find_openai(settings: Settings, pb_id: str, since: float, provider: str = "openai", *,
                      key_alias: str | None = None) -> dict | None:
    """An OpenAI batch created for ``pb_id`` (its metadata names it), among those created since
    ``since`` (unix time, the first attempt; the listing is newest first), listed on its key."""
    async with _client(settings, provider, key_alias=key_alias) as client:
        async for b in client.batches.list(limit=100):
            if (b.metadata or {}).get("llmbatch_id") == pb_id:
                return {"provider_batch_id": b.id, "input_file_id": b.input_file_id, "provider_status": b.status}
            if _epoch(b.created_at) < since - CLOCK_SKEW_S:
                break
    return None


async def find_anthropic(settings: Settings, intents: list[dict], known, provider: str = "anthropic", *,
                         key_alias: str | None = None) -> dict[str, tuple]:
    """Anthropic batches carry no metadata: list the provider's batches created since the earliest
    window opened (on ``key_alias``), drop those a row of ours owns (``known(ids)``), read the
    custom_ids of the ended ones that match an intent's count and window, and let
    ``match_anthropic`` decide."""
    earliest = min(i["start"] for i in intents)
    async with _client(settings, provider, key_alias=key_alias) as client:
        listed = []
        async for b in client.messages.batches.list(limit=1000):
            if _epoch(b.created_at) < earliest:
                break
            c = b.request_counts
            listed.append({"id": b.id, "created": _epoch(b.created_at), "status": b.processing_status,
                           "total": c.processing + c.succeeded + c.errored + c.canceled + c.expired,
                           "results_url": b.results_url, "pids": None})
        owned = known([b["id"] for b in listed]) if listed else set()
        listed = [b for b in listed if b["id"] not in owned]
        wanted = {b["id"] for bs in _candidates(intents, listed).values() for b in bs}
        for b in listed:
            if b["id"] in wanted and b["status"] == "ended" and b["results_url"]:
                b["pids"] = {x.get("custom_id") for x in await _anthropic_results(client, b["results_url"])}
    return match_anthropic(intents, listed)


def _candidates(intents: list[dict], batches: list[dict]) -> dict[str, list[dict]]:
    return {i["id"]: [b for b in batches if b["total"] == i["requests"] and i["start"] <= b["created"] <= i["end"]]
            for i in intents}


def match_anthropic(intents: list[dict], batches: list[dict]) -> dict[str, tuple]:
    """Which provider batch, if any, each unconfirmed creation made (pure, so it can be tested alone).

    ``intents``: ``id``, ``requests`` (count), ``pids`` (its custom_ids), ``start``/``end`` (its
    creation window, unix time). ``batches``: the provider's batches no row of ours owns: ``id``,
    ``total``, ``created``, ``status``, ``pids`` (the custom_ids of an ended one, else None).
    An ended batch is ours only with exactly our custom_ids. One still running is adopted only
    when it is the one candidate of the count and window, and no other intent's candidate; else
    the answer is to wait for results. ``("none",)`` only when nothing matches count and window.
    Returns ``{intent id: ("found", info) | ("none",) | ("unsure", why)}``.
    """
    cands = _candidates(intents, batches)
    claimed: dict[str, int] = {}
    for bs in cands.values():
        for b in bs:
            claimed[b["id"]] = claimed.get(b["id"], 0) + 1
    out = {}
    for i in intents:
        bs = cands[i["id"]]
        exact = [b for b in bs if b["pids"] == i["pids"]]
        running = [b for b in bs if b["pids"] is None]
        pick = exact[0] if exact else (running[0] if len(running) == 1 and claimed[running[0]["id"]] == 1 else None)
        if len(exact) > 1:
            log.error("provider batch %s: %d Anthropic batches hold its requests (%s): the provider billed them"
                      " more than once; adopting %s", i["id"], len(exact), [b["id"] for b in exact], exact[0]["id"])
        if pick is not None:
            out[i["id"]] = ("found", {"provider_batch_id": pick["id"], "input_file_id": None,
                                      "provider_status": pick["status"]})
        elif running:
            out[i["id"]] = ("unsure", f"{len(running)} Anthropic batches in progress match its count and window;"
                                      " waiting for their results to tell by custom_id")
        else:
            out[i["id"]] = ("none",)
    return out


async def poll(settings: Settings, provider: str, provider_batch_id: str, *,
               key_alias: str | None = None) -> tuple[str, bool, list[dict] | None, list[str]]:
    """``(provider status, ended, result lines when ended, the batch's error codes)``, asked on the
    batch's key (error codes: an OpenAI batch that failed as a whole, e.g. ``token_limit_exceeded``)."""
    fmt = batch_format(provider)
    api = _API[fmt]
    async with _client(settings, provider, key_alias=key_alias) as client:
        b = await api.batches(client).retrieve(provider_batch_id)
        state = api.status(b)
        if state not in api.ended:
            return state, False, None, []
        if fmt == "anthropic":
            return state, True, await _anthropic_results(client, b.results_url), []
        lines = []
        for fid in (b.output_file_id, b.error_file_id):
            if fid:
                lines.extend(_jsonl((await client.files.content(fid)).text))
        codes = [e.code for e in ((b.errors.data or []) if b.errors else [])]
        if state == "failed" and b.errors:
            log.warning("provider batch %s failed: %s", provider_batch_id,
                        [e.message for e in (b.errors.data or [])][:5])
        return state, True, lines, codes


async def cancel(settings: Settings, provider: str, provider_batch_id: str, *, key_alias: str | None = None) -> str:
    api = _API[batch_format(provider)]
    async with _client(settings, provider, key_alias=key_alias) as client:
        return api.status(await api.batches(client).cancel(provider_batch_id))


async def status(settings: Settings, provider: str, provider_batch_id: str, *, key_alias: str | None = None) -> str:
    api = _API[batch_format(provider)]
    async with _client(settings, provider, key_alias=key_alias) as client:
        return api.status(await api.batches(client).retrieve(provider_batch_id))
