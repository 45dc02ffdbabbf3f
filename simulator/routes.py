"""The simulator's route table: which path reaches which provider, endpoint and store.

Built-in providers (as the SDKs' default base URLs expect):

    POST /v1/chat/completions | /v1/responses | /v1/embeddings | /v1/completions | /v1/moderations  -> openai
    POST /v1/messages, /v1/messages/count_tokens                                                  -> anthropic
    /v1/files…, /v1/batches…  (openai)     /v1/messages/batches…  (anthropic)

Every provider, built-in or named, under ``/p/<name>``:

    kind openai:        /p/<name>/v1/<endpoint>, /p/<name>/v1/files…, /p/<name>/v1/batches…
    kind anthropic:     /p/<name>/v1/messages, …/count_tokens, /p/<name>/v1/messages/batches…
    kind azure-openai:  /p/<name>/openai/deployments/<deployment>/{chat/completions,embeddings,completions}
                        ?api-version=…; /p/<name>/openai/v1/{chat/completions,embeddings,completions,responses}
                        and /p/<name>/openai/responses (the body's model names the deployment)

The provider is looked up when the request arrives, so providers added with
``POST /_config`` are served at once; a path that names an unknown provider,
or an endpoint of the other family, is a 404.
"""

from __future__ import annotations

from aiohttp import web

from simulator.control import add_control_routes
from simulator.endpoints import MESSAGES, OPENAI_ENDPOINTS, RESPONSES
from simulator.server import ALIAS_KEY, Call, Simulator

OPENAI_BATCH_ROUTES = (
    ("POST", "/v1/files", "create_file"), ("GET", "/v1/files", "list_files"),
    ("GET", "/v1/files/{id}", "get_file"), ("DELETE", "/v1/files/{id}", "delete_file"),
    ("GET", "/v1/files/{id}/content", "get_file_content"),
    ("POST", "/v1/batches", "create_openai_batch"), ("GET", "/v1/batches", "list_openai_batches"),
    ("GET", "/v1/batches/{id}", "get_openai_batch"), ("POST", "/v1/batches/{id}/cancel", "cancel_openai_batch"),
)
ANTHROPIC_BATCH_ROUTES = (
    ("POST", "/v1/messages/batches", "create_anthropic_batch"),
    ("GET", "/v1/messages/batches", "list_anthropic_batches"),
    ("GET", "/v1/messages/batches/{id}", "get_anthropic_batch"),
    ("DELETE", "/v1/messages/batches/{id}", "delete_anthropic_batch"),
    ("POST", "/v1/messages/batches/{id}/cancel", "cancel_anthropic_batch"),
    ("GET", "/v1/messages/batches/{id}/results", "anthropic_results"),
)


def _endpoint(sim: Simulator, endpoint, provider: str | None = None, azure: str | None = None):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sim.handle(request, endpoint, provider, azure)
    return handler


def _store(sim: Simulator, method: str, family: str, provider: str | None = None):
    """A batch-store handler of the provider in the path (or ``provider``), behind its keys."""
    async def handler(request: web.Request) -> web.StreamResponse:
        p, err = sim.route(request, provider, family)
        if err is not None:
            return err
        if p.kind == "azure-openai" or not p.spec.batches:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        call = Call(p, None)
        denied = sim.authenticate(call, request, sim.new_id("req_"))
        if denied is not None:
            return denied
        request[ALIAS_KEY] = call.alias
        return await getattr(sim.store(p), method)(request)
    return handler


def _count_tokens(sim: Simulator, provider: str | None = None):
    async def handler(request: web.Request) -> web.Response:
        return await sim.count_tokens(request, provider)
    return handler


def add_routes(app: web.Application, sim: Simulator) -> None:
    r = app.router
    for prefix, openai, anthropic in (("", "openai", "anthropic"), ("/p/{provider}", None, None)):
        for path, endpoint in OPENAI_ENDPOINTS.items():
            r.add_post(prefix + path, _endpoint(sim, endpoint, openai))
        r.add_post(prefix + MESSAGES.path, _endpoint(sim, MESSAGES, anthropic))
        r.add_post(prefix + "/v1/messages/count_tokens", _count_tokens(sim, anthropic))
        for method, path, name in OPENAI_BATCH_ROUTES:
            r.add_route(method, prefix + path, _store(sim, name, "openai", openai))
        for method, path, name in ANTHROPIC_BATCH_ROUTES:
            r.add_route(method, prefix + path, _store(sim, name, "anthropic", anthropic))
    for endpoint in OPENAI_ENDPOINTS.values():
        if endpoint.azure:
            r.add_post(f"/p/{{provider}}/openai/deployments/{{deployment}}/{endpoint.azure}",
                       _endpoint(sim, endpoint, azure="deployment"))
        if endpoint.azure or endpoint is RESPONSES:
            r.add_post("/p/{provider}/openai" + endpoint.path, _endpoint(sim, endpoint, azure="v1"))
    r.add_post("/p/{provider}/openai/responses", _endpoint(sim, RESPONSES, azure="v1"))
    add_control_routes(app, sim)
