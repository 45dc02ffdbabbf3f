"""Per-message cost of the batcher's decode, stage by stage, without services.

One typical chat message (the line ``common.write_requests`` writes, as the producer
publishes it) goes through each step of ``pipeline/intake/messages.py`` ``decode`` and
the producer check, many times; prints the microseconds per message (the fastest of five rounds) of each step
and of the whole. No stack is needed: this is the CPU an intake message costs alone.

    .venv/bin/python bench/decode_cost.py [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from pipeline.config import load_settings
from pipeline.intake import messages
from pipeline.intake.formats import parse_request
from pipeline.intake.kafka import sign, verify
from pipeline.intake.producer import to_message
from pipeline.intake.tiers import TierRules
from pipeline.money.pricing import get_price_book

SETTINGS = load_settings({"LLMBATCH_KAFKA_PRODUCER_KEY": "bench-key"})


def typical() -> bytes:
    line = {"custom_id": "bench-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [
                {"role": "user", "content": "Benchmark request 1: say something short."}]}}
    return to_message("job_bench", 1, parse_request(line, get_price_book()), priority=9)


def per_call_us(fn, n: int, rounds: int = 5) -> float:
    """The least, over ``rounds``, of the mean µs per call of ``n`` calls."""
    fn()   # warm caches (schema, encodings, price book)
    means = []   # the fastest round: the least disturbed by the other processes on the machine
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        means.append((time.perf_counter() - t) / n * 1e6)
    return min(means)


def run(n: int) -> dict:
    value = typical()
    headers = sign(SETTINGS, value)
    prices = get_price_book()
    now = datetime.now(timezone.utc)
    rules = TierRules()
    m = messages.parse(value)
    out = {
        "message_bytes": len(value),
        "verify_us": per_call_us(lambda: verify(SETTINGS, headers, value), n),
        "json_loads_us": per_call_us(lambda: json.loads(value), n),
        "parse_us": per_call_us(lambda: messages.parse(value), n),
        "validate_us": per_call_us(lambda: messages.validate(m), n),
        "to_row_us": per_call_us(lambda: messages.to_row(m, now, prices, offpeak_opens=now, rules=rules), n),
        "decode_us": per_call_us(lambda: messages.decode(value, now, prices, offpeak_opens=now, rules=rules), n),
    }
    out = {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}
    out["messages_per_core_s"] = round(1e6 / (out["verify_us"] + out["decode_us"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    print(json.dumps(run(ap.parse_args().n)))


if __name__ == "__main__":
    main()
