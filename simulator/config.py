"""Settings of the simulator: one dataclass, built from a file or from CLI options.

``config_from_args(argv)`` is shared by ``python -m simulator`` and the
``llmbatch simulator`` command, so both accept the same options.

Settings for providers, keys, endpoints and flex (file key, CLI option):

| setting | option | meaning |
|---|---|---|
| ``providers`` | (file only) | named providers: kind, models with prices and limits, keys, Azure deployments (``providers.py``) |
| ``flex_models`` | ``--flex-models`` | models that take ``service_tier: "flex"`` (default: OpenAI's list); others get 400 |
| ``flex_unavailable_rate`` | ``--flex-unavailable-rate`` | share of flex calls answered 429 "resource unavailable" (not billed) |

A provider's keys (``providers.<name>.keys``: ``key``, ``alias``, ``rpm``,
``tpm``, ``revoke_after``) set limits per key per model; ``POST
/_admin/keys/revoke {"key": …, "provider": …}`` revokes one at run time
(``/_admin/keys/restore`` undoes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from simulator.providers import DEFAULT_FLEX_MODELS, ProviderSpec, parse_providers

#: Kinds of injected errors and what the server does for each.
#:   429      rate-limit error with retry-after / retry-after-ms
#:   500      internal server error (provider's own shape)
#:   529      Anthropic "overloaded_error" (OpenAI routes answer 503 with the same meaning)
#:   timeout  the server sleeps ``timeout_sleep_s`` before answering 504, longer than a
#:            sensible client timeout, so the client times out
#:   hangup   the server closes the connection without answering
ERROR_KINDS = ("429", "500", "529", "timeout", "hangup")
LATENCY_KINDS = ("fixed", "uniform", "normal")


@dataclass
class ModelLimit:
    """Requests and tokens per minute for one model.

    ``None`` means unlimited in the defaults (``SimulatorConfig.rpm/tpm``); in a
    per-model entry it means "use the default".
    """

    rpm: int | None = None
    tpm: int | None = None


@dataclass
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 58080

    # latency: "fixed" waits latency_ms; "uniform" draws from
    # [latency_ms - jitter_ms, latency_ms + jitter_ms]; "normal" draws from
    # N(latency_ms, jitter_ms). Never below zero.
    latency: str = "fixed"
    latency_ms: float = 0.0
    jitter_ms: float = 0.0

    # extra seconds every answered call is held before its answer (on top of the latency):
    # a call that outlives a reservation TTL, for the tests of reservations
    hold_s: float = 0.0
    # bill every call up to its limits: each choice to max_tokens (or the model's maximum),
    # input at the highest rate that applies (billing.py)
    worst_case: bool = False

    # injected errors: kind -> probability per request (see ERROR_KINDS)
    error_rates: dict[str, float] = field(default_factory=dict)
    # seconds put in retry-after of an injected 429
    injected_retry_after_s: float = 1.0
    # how long a "timeout" request sleeps before it answers 504
    timeout_sleep_s: float = 120.0
    seed: int = 0

    # server-side limits: default for every model, overridden per model
    rpm: int | None = None
    tpm: int | None = None
    model_limits: dict[str, ModelLimit] = field(default_factory=dict)

    # batch APIs: seconds a whole batch takes from in_progress to finalizing,
    # and the pause in validating/finalizing
    batch_processing_s: float = 2.0
    batch_stage_s: float = 0.2
    # share of each provider batch's lines that expire unrun (the last in its run order): OpenAI's
    # batch ends "expired" with them in the error file (batch_expired), Anthropic's results say "expired"
    batch_expire_share: float = 0.0
    # OpenAI's per-model batch queue: prompt tokens enqueued at once per model (model -> limit); a batch
    # that would go over it fails at validation with token_limit_exceeded (batch_rules.py)
    batch_enqueued_tokens: dict[str, int] = field(default_factory=dict)

    # named providers besides the built-in openai and anthropic (providers.py)
    providers: dict[str, ProviderSpec] = field(default_factory=dict)
    # flex processing: the models that take it, and the share of flex calls answered
    # 429 "resource unavailable" (not billed)
    flex_models: list[str] = field(default_factory=lambda: list(DEFAULT_FLEX_MODELS))
    flex_unavailable_rate: float = 0.0
    # the simulator's clock is real time plus this (tests move it with the scheduler's clock):
    # the time-of-day prices (prices.py PEAK_HOURS) bill by it
    clock_offset_s: float = 0.0

    def limit_for(self, model: str) -> ModelLimit:
        lim = self.model_limits.get(model)
        if lim is None:
            return ModelLimit(self.rpm, self.tpm)
        return ModelLimit(lim.rpm if lim.rpm is not None else self.rpm,
                          lim.tpm if lim.tpm is not None else self.tpm)

    def validate(self) -> "SimulatorConfig":
        if self.latency not in LATENCY_KINDS:
            raise ConfigError(f"simulator latency must be one of {', '.join(LATENCY_KINDS)}, not {self.latency!r}")
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.hold_s < 0:
            raise ConfigError("simulator latency_ms, jitter_ms and hold_s must be >= 0")
        if not isinstance(self.worst_case, bool):
            raise ConfigError(f"simulator worst_case must be true or false, not {self.worst_case!r}")
        for kind, rate in self.error_rates.items():
            if kind not in ERROR_KINDS:
                raise ConfigError(f"unknown simulator error kind {kind!r} (known: {', '.join(ERROR_KINDS)})")
            if not 0 <= rate <= 1:
                raise ConfigError(f"simulator error rate {kind}={rate} is not within 0..1")
        if sum(self.error_rates.values()) > 1:
            raise ConfigError("simulator error rates add up to more than 1")
        for name, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and value <= 0:
                raise ConfigError(f"simulator {name} must be positive")
        if isinstance(self.flex_unavailable_rate, bool) or not isinstance(self.flex_unavailable_rate, (int, float)) \
                or not 0 <= self.flex_unavailable_rate <= 1:
            raise ConfigError(f"simulator flex_unavailable_rate must be a number within 0..1, "
                              f"not {self.flex_unavailable_rate!r}")
        if not isinstance(self.flex_models, (list, tuple)) or not all(isinstance(m, str) for m in self.flex_models):
            raise ConfigError(f"simulator flex_models must be a list of model names, not {self.flex_models!r}")
        if isinstance(self.clock_offset_s, bool) or not isinstance(self.clock_offset_s, (int, float)):
            raise ConfigError(f"simulator clock_offset_s must be a number of seconds, not {self.clock_offset_s!r}")
        if isinstance(self.batch_expire_share, bool) or not isinstance(self.batch_expire_share, (int, float)) \
                or not 0 <= self.batch_expire_share <= 1:
            raise ConfigError(f"simulator batch_expire_share must be within 0..1, not {self.batch_expire_share!r}")
        if not isinstance(self.batch_enqueued_tokens, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
                for k, v in self.batch_enqueued_tokens.items()):
            raise ConfigError("simulator batch_enqueued_tokens must map model names to positive token counts,"
                              f" not {self.batch_enqueued_tokens!r}")
        self.providers = parse_providers(self.providers)
        return self

    # ---- construction -------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> "SimulatorConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown simulator settings: {', '.join(sorted(unknown))}")
        if "error_rates" in data:
            data["error_rates"] = parse_error_rates(data["error_rates"])
        if "model_limits" in data:
            data["model_limits"] = parse_model_limits(data["model_limits"])
        try:
            return cls(**data).validate()
        except TypeError as e:
            raise ConfigError(f"simulator settings: {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> "SimulatorConfig":
        """Read a TOML or JSON file (by suffix; TOML otherwise).

        A TOML file may hold the settings at top level or under ``[simulator]``.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read simulator config {path}: {e}") from e
        try:
            data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"simulator config {path} is not valid: {e}") from e
        if isinstance(data.get("simulator"), dict):
            data = data["simulator"]
        return cls.from_dict(data)


def parse_error_rates(value) -> dict[str, float]:
    """``"429=0.2,500=0.05"`` or a mapping -> ``{"429": 0.2, "500": 0.05}``."""
    if isinstance(value, dict):
        pairs = value.items()
    else:
        pairs = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(f"error rate {part!r} is not KIND=RATE")
            pairs.append(part.split("=", 1))
    out: dict[str, float] = {}
    for kind, rate in pairs:
        kind = str(kind).strip()
        try:
            out[kind] = float(rate)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"error rate for {kind!r} is not a number: {rate!r}") from e
    return out


def _opt_int(value) -> int | None:
    if value is None or value == "" or str(value).lower() in ("none", "unlimited"):
        return None
    return int(value)


def parse_model_limits(value) -> dict[str, ModelLimit]:
    """``{"gpt-4o-mini": {"rpm": 500, "tpm": 200000}}`` or ``"gpt-4o-mini=500:200000,claude=50:"``."""
    out: dict[str, ModelLimit] = {}
    try:
        if isinstance(value, dict):
            for model, lim in value.items():
                if isinstance(lim, ModelLimit):
                    out[model] = lim
                else:
                    out[model] = ModelLimit(_opt_int(lim.get("rpm")), _opt_int(lim.get("tpm")))
        else:
            for part in str(value).split(","):
                part = part.strip()
                if not part:
                    continue
                model, spec = part.split("=", 1)
                rpm, _, tpm = spec.partition(":")
                out[model.strip()] = ModelLimit(_opt_int(rpm), _opt_int(tpm))
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"model limits {value!r} are not valid: {e}") from e
    return out


def build_parser(prog: str = "python -m simulator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Local simulator of the OpenAI and Anthropic APIs.")
    p.add_argument("--config", help="TOML or JSON file with simulator settings (options below override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--latency", choices=LATENCY_KINDS, help="latency distribution")
    p.add_argument("--latency-ms", type=float, help="fixed latency, or the mean")
    p.add_argument("--jitter-ms", type=float, help="half-width (uniform) or standard deviation (normal)")
    p.add_argument("--hold", type=float, dest="hold_s",
                   help="hold every answered call this many extra seconds (outlive reservation TTLs)")
    p.add_argument("--worst-case", action="store_const", const=True, dest="worst_case",
                   help="bill every call up to its limits (max_tokens per choice, highest input rate)")
    p.add_argument("--error-rate", help="injected errors, e.g. 429=0.2,500=0.05,529=0.01,timeout=0.001,hangup=0.001")
    p.add_argument("--retry-after", type=float, dest="injected_retry_after_s",
                   help="retry-after seconds of injected 429s")
    p.add_argument("--timeout-sleep", type=float, dest="timeout_sleep_s",
                   help="seconds an injected timeout sleeps before answering")
    p.add_argument("--seed", type=int)
    p.add_argument("--rpm", type=int, help="requests per minute per model (default: unlimited)")
    p.add_argument("--tpm", type=int, help="tokens per minute per model (input + max_tokens)")
    p.add_argument("--model-limit", action="append", dest="model_limits",
                   help="per-model limits MODEL=RPM:TPM (repeatable; empty part = default)")
    p.add_argument("--batch-seconds", type=float, dest="batch_processing_s",
                   help="time a provider batch spends in_progress")
    p.add_argument("--flex-unavailable-rate", type=float, dest="flex_unavailable_rate",
                   help="share of flex calls answered 429 resource unavailable (not billed)")
    p.add_argument("--flex-models", dest="flex_models",
                   help="comma-separated models that take service_tier flex (default: OpenAI's list)")
    return p


def config_from_options(config: str | None = None, **options) -> SimulatorConfig:
    """Build a config from a file (optional) plus option values; ``None`` values are ignored.

    Keys are the SimulatorConfig field names; ``error_rate`` (string) and
    ``model_limits`` (list of MODEL=RPM:TPM strings) are parsed.
    """
    base = SimulatorConfig.from_file(config) if config else SimulatorConfig()
    values = {k: v for k, v in options.items() if v is not None}
    if "error_rate" in values:
        values["error_rates"] = parse_error_rates(values.pop("error_rate"))
    if isinstance(values.get("flex_models"), str):
        values["flex_models"] = [m.strip() for m in values["flex_models"].split(",") if m.strip()]
    if "model_limits" in values:
        specs = values.pop("model_limits")
        if not isinstance(specs, (str, dict)):
            specs = ",".join(specs)
        values["model_limits"] = {**base.model_limits, **parse_model_limits(specs)}
    known = {f.name for f in dataclasses.fields(SimulatorConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown simulator options: {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **values).validate()


def config_from_args(argv: list[str] | None = None) -> SimulatorConfig:
    """Parse command-line options (as ``python -m simulator`` takes them)."""
    ns = build_parser().parse_args(argv)
    return config_from_options(**vars(ns))
