"""A local server that answers like the OpenAI and Anthropic APIs.

It is the default provider when no API key is set. Answers are deterministic
and carry real token counts; latency, injected errors and per-model RPM/TPM
limits are configurable; ``GET /_stats`` shows what a provider would have seen.

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
