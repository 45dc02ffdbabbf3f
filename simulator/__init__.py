"""A local server that answers like the OpenAI and Anthropic APIs, and like any named provider.

It is the default provider when no API key is set. Answers are deterministic
and carry real token counts; latency, injected errors, RPM/TPM limits per key
and model, named providers (OpenAI-compatible, Anthropic, Azure OpenAI) with
their own prices and keys, and flex processing are configurable
(``config.py``, ``providers.py``); ``GET /_stats`` shows what a provider would
have seen, and billed in USD per provider and key.

    from simulator import SimulatorConfig, build_app, run, config_from_args
"""

from simulator.config import (
    ModelLimit,
    SimulatorConfig,
    build_parser,
    config_from_args,
    config_from_options,
)
from simulator.server import SIMULATOR_KEY, build_app, run, start

__all__ = [
    "ModelLimit",
    "SIMULATOR_KEY",
    "SimulatorConfig",
    "build_app",
    "build_parser",
    "config_from_args",
    "config_from_options",
    "run",
    "start",
]
