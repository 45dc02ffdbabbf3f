"""The endpoints the simulator answers, behind one interface.

An ``Endpoint`` knows how to validate a body, answer it (deterministic, by
the simulator's own counting), bill the answer (normal or worst case) and
write the provider's reply. The synchronous server (``server.py``) and the
batch APIs (``batches.py``) go through the same ``Endpoint``, so a request in
a batch is answered and billed exactly as it would be on its own.

| path | module | flex | batch |
|---|---|---|---|
| ``/v1/chat/completions`` | ``answers.py`` + ``protocol.py`` | yes | OpenAI |
| ``/v1/responses`` | ``responses.py`` | yes | OpenAI |
| ``/v1/embeddings`` | ``embeddings.py`` | no | OpenAI |
| ``/v1/completions`` | ``completions.py`` | no | OpenAI |
| ``/v1/moderations`` | ``moderations.py`` | no | OpenAI |
| ``/v1/messages`` | ``answers.py`` + ``protocol.py`` | no | Anthropic |

``worst_usage(path, body)`` is the worst-case bill of a body, for tests that
check a bound against what the simulator could charge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from simulator import answers, caching, completions, embeddings, moderations, protocol, responses


@dataclass(frozen=True)
class Endpoint:
    path: str                       # as in Batch API lines: "/v1/embeddings"
    family: str                     # "openai" | "anthropic"
    validate: Callable              # (body) -> None, raises Problem
    answer: Callable                # (body, Model | None, Provider) -> answer with .cost; LookupError: no model
    bill: Callable                  # (answer, worst_case, PromptCache) -> usage dict
    reply: Callable                 # (answer, usage, model name, new_id, tier) -> body
    flex: bool = False              # takes service_tier "flex"
    azure: str | None = None        # path under Azure's /openai/deployments/<deployment>/
    model_optional: bool = False    # a body may omit "model" (moderations)


def _chat_answer(body, model, provider):
    if model is None:
        raise LookupError(body["model"])
    return answers.openai_answer(body, model.encoding, model.max_output)


def _messages_answer(body, model, provider):
    if model is None:
        raise LookupError(body["model"])
    return answers.anthropic_answer(body)


def _usage(ans, worst_case, cache):
    return answers.usage(ans, worst_case=worst_case, cache=cache)


CHAT = Endpoint(
    "/v1/chat/completions", "openai", protocol.validate_openai_chat, _chat_answer, _usage,
    lambda ans, u, model, new_id, tier: protocol.chat_completion(
        ans, u, model, new_id("chatcmpl-"), "flex" if tier == "flex" else "default"),
    flex=True, azure="chat/completions")
RESPONSES = Endpoint(
    "/v1/responses", "openai", responses.validate,
    lambda body, model, provider: responses.answer(body, model),
    responses.usage, responses.reply, flex=True)
EMBEDDINGS = Endpoint(
    "/v1/embeddings", "openai", embeddings.validate,
    lambda body, model, provider: embeddings.answer(body, model),
    lambda ans, worst_case, cache: embeddings.usage(ans, worst_case),
    lambda ans, u, model, new_id, tier: embeddings.reply(ans, u, model), azure="embeddings")
COMPLETIONS = Endpoint(
    "/v1/completions", "openai", completions.validate,
    lambda body, model, provider: completions.answer(body, model, provider.builtin),
    lambda ans, worst_case, cache: completions.usage(ans, worst_case),
    lambda ans, u, model, new_id, tier: completions.reply(ans, u, model, new_id), azure="completions")
MODERATIONS = Endpoint(
    "/v1/moderations", "openai", moderations.validate,
    lambda body, model, provider: moderations.answer(body, model),
    lambda ans, worst_case, cache: moderations.usage(ans, worst_case),
    lambda ans, u, model, new_id, tier: moderations.reply(ans, u, model, new_id), model_optional=True)
MESSAGES = Endpoint(
    "/v1/messages", "anthropic", protocol.validate_anthropic_message, _messages_answer, _usage,
    lambda ans, u, model, new_id, tier: protocol.anthropic_message(ans, u, model, new_id("msg_")))

OPENAI_ENDPOINTS = {e.path: e for e in (CHAT, RESPONSES, EMBEDDINGS, COMPLETIONS, MODERATIONS)}
ALL = {**OPENAI_ENDPOINTS, MESSAGES.path: MESSAGES}


def model_of(endpoint: Endpoint, body: dict) -> str | None:
    model = body.get("model")
    if model is None and endpoint is MODERATIONS:
        return moderations.OMNI[0]
    return model if isinstance(model, str) and model else None


def tokens_of(usage: dict) -> int:
    """Tokens a usage object bills, whatever its shape."""
    if "total_tokens" in usage:
        return usage["total_tokens"]
    return (usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
            + usage.get("cache_creation_input_tokens", 0) + usage.get("cache_read_input_tokens", 0))


def worst_usage(path: str, body: dict) -> dict | None:
    """The worst-case bill of ``body`` at the built-in provider of ``path``, or None if refused."""
    from simulator.accounts import Provider
    from simulator.config import SimulatorConfig
    from simulator.protocol import Problem
    from simulator.providers import ProviderSpec

    endpoint = ALL[path]
    provider = Provider(endpoint.family, ProviderSpec(kind=endpoint.family), SimulatorConfig())
    try:
        endpoint.validate(body)
        ans = endpoint.answer(body, provider.model(model_of(endpoint, body) or ""), provider)
    except (Problem, LookupError):
        return None
    return endpoint.bill(ans, True, caching.PromptCache())
