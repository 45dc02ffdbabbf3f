"""Providers: the calls to OpenAI and Anthropic through their official SDKs.

``base`` (the ``Provider`` protocol, ``Answer``, ``post_raw``, ``get_provider``), ``retries``
(the one place a call is retried), ``openai`` and ``anthropic`` (one module per provider),
``ratelimit`` (the shared limiter in Redis) and ``batch_api`` (the providers' Batch APIs).
Names are imported from their modules; this package re-exports nothing.
"""
