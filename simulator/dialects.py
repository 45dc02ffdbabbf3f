"""How each kind of provider says no: error bodies, request-id and rate-limit headers, auth.

One dialect per provider kind (``openai``, ``azure-openai``, ``anthropic``);
the server picks the dialect of the provider a route belongs to and never
branches on the kind itself.

- 400/404 (a request the API refuses): OpenAI's ``{"error": {message, type,
  param, code}}`` (Azure passes these through); Anthropic's ``{"type":
  "error", "error": {type, message}, "request_id"}``.
- 401: OpenAI ``invalid_api_key``; Anthropic ``authentication_error``; Azure
  ``{"error": {"code": "401", "message": "Access denied due to invalid
  subscription key or wrong API endpoint…"}}``.
- 429 over a limit: OpenAI ``rate_limit_exceeded`` (type ``requests`` or
  ``tokens``); Azure ``{"error": {"code": "429", "message": "Requests to the …
  Operation … have exceeded … rate limit … Please retry after N seconds."}}``;
  Anthropic ``rate_limit_error``. All carry ``retry-after`` and
  ``retry-after-ms``.
- 429 flex "resource unavailable" (OpenAI kinds): OpenAI documents the status
  and the name ("429 Resource Unavailable", not charged) but not the body;
  the simulator answers ``{"error": {"message": "Resource unavailable: …",
  "type": "resource_unavailable", "param": null, "code":
  "resource_unavailable"}}``, distinct from a rate limit.
"""

from __future__ import annotations

from simulator import protocol
from simulator.accounts import NO_KEY
from simulator.protocol import Problem


class OpenAIDialect:
    request_id_header = "x-request-id"
    overloaded_status = 503

    def key(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None

    def problem(self, p: Problem, rid: str) -> dict:
        return protocol.openai_error(p)

    def error(self, status: int, rid: str) -> dict:
        if status == 429:
            return protocol.openai_error_body(
                "Rate limit reached (simulated). Please try again later.", "requests", "rate_limit_exceeded")
        if status == 503:
            return protocol.openai_error_body(
                "The engine is currently overloaded, please try again later. (simulated)", "server_error")
        if status == 504:
            return protocol.openai_error_body("Request timed out. (simulated)", "timeout")
        return protocol.openai_error_body(
            "The server had an error while processing your request. Sorry about that! (simulated)",
            "server_error")

    def unauthorized(self, alias: str, rid: str) -> dict:
        if alias == NO_KEY:
            return protocol.openai_error_body(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", "invalid_request_error")
        return {"error": {"message": f"Incorrect API key provided: {alias} (simulated; the key itself is never "
                                     f"echoed). You can find your API key at https://platform.openai.com/account/api-keys.",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}

    def limit_error(self, lim, model: str, operation: str) -> dict:
        what = lim.reason
        limit = lim.rpm if what == "requests" else lim.tpm
        return protocol.openai_error_body(
            f"Rate limit reached for {model} on {what} per min (RPM/TPM): Limit {limit}. "
            f"Please try again in {lim.retry_after_s:.3f}s. (simulated)", what, "rate_limit_exceeded")

    def limit_headers(self, lim) -> dict:
        return lim.openai_headers()

    def flex_unavailable(self, rid: str) -> dict:
        return protocol.openai_error_body(
            "Resource unavailable: flex processing has no capacity for this request right now. Retry later, "
            "or send it without service_tier 'flex'. You have not been charged. (simulated)",
            "resource_unavailable", "resource_unavailable")

    def not_found(self, message: str) -> dict:
        return protocol.openai_error_body(message, "invalid_request_error", "not_found")


class AzureDialect(OpenAIDialect):
    request_id_header = "apim-request-id"

    def key(self, headers) -> str | None:
        return headers.get("api-key") or super().key(headers)

    def unauthorized(self, alias: str, rid: str) -> dict:
        return {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API "
                          "endpoint. Make sure to provide a valid key for an active subscription and use a "
                          "correct regional API endpoint for your resource."}}

    def limit_error(self, lim, model: str, operation: str) -> dict:
        what = "call" if lim.reason == "requests" else "token"
        seconds = max(1, round(lim.retry_after_s + 0.4999))
        return {"error": {"code": "429", "message": (
            f"Requests to the {operation} Operation under Azure OpenAI API version (simulated) have exceeded "
            f"{what} rate limit of your current OpenAI S0 pricing tier. Please retry after {seconds} seconds. "
            f"Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the "
            f"default rate limit.")}}

    def not_found(self, message: str) -> dict:
        return {"error": {"code": "DeploymentNotFound", "message": message}}


class AnthropicDialect:
    request_id_header = "request-id"
    overloaded_status = 529

    def key(self, headers) -> str | None:
        # x-api-key, or a bearer token (what some SDK versions and gateways send)
        return headers.get("x-api-key") or OpenAIDialect.key(self, headers)

    def problem(self, p: Problem, rid: str) -> dict:
        kind = "not_found_error" if p.status == 404 else p.kind
        return protocol.anthropic_error_body(kind, p.message, rid)

    def error(self, status: int, rid: str) -> dict:
        kind, message = {
            429: ("rate_limit_error", "Number of requests has exceeded your rate limit (simulated)."),
            529: ("overloaded_error", "Overloaded (simulated)"),
            504: ("timeout_error", "Request timed out (simulated)"),
        }.get(status, ("api_error", "Internal server error (simulated)"))
        return protocol.anthropic_error_body(kind, message, rid)

    def unauthorized(self, alias: str, rid: str) -> dict:
        message = "x-api-key header is required" if alias == NO_KEY else "invalid x-api-key"
        return protocol.anthropic_error_body("authentication_error", message, rid)

    def limit_error(self, lim, model: str, operation: str) -> dict:
        what = "requests" if lim.reason == "requests" else "tokens"
        return protocol.anthropic_error_body(
            "rate_limit_error",
            f"This request would exceed the rate limit for your organization of "
            f"{lim.rpm if what == 'requests' else lim.tpm} {what} per minute for {model} (simulated).")

    def limit_headers(self, lim) -> dict:
        return lim.anthropic_headers()

    def flex_unavailable(self, rid: str) -> dict:   # never used: flex is refused for Anthropic first
        return self.error(429, rid)

    def not_found(self, message: str) -> dict:
        return protocol.anthropic_error_body("not_found_error", message)


DIALECTS = {"openai": OpenAIDialect(), "azure-openai": AzureDialect(), "anthropic": AnthropicDialect()}
