"""Why a reservation waits: a note per job (``note_wait``) naming the cap it waits on, and what
stands in front of that cap (``wait_reason``, ``describe_wait``), read by ``llmbatch status``
(``wait_status``).
"""

from __future__ import annotations

import json
import logging
import time
from decimal import Decimal

from pipeline.money.scripts import KEYS, WAIT_KEY, WAIT_NOTE_TTL_S
from pipeline.money.units import from_units

log = logging.getLogger(__name__)


def spent_field(fields, cap_field: str) -> str:
    return next((sf for sf, cf in fields if cf == cap_field), "")


def _wait_note(job_id: str, cap_field: str, spent_field: str, old: bytes | None) -> str:
    """The note's JSON; ``since`` carried over from the note it renews (same cap)."""
    since = time.time()
    try:
        prev = json.loads(old) if old else None
        if prev and prev.get("cap") == cap_field:
            since = float(prev["since"])
    except (ValueError, TypeError, KeyError):
        pass
    return json.dumps({"job_id": job_id, "cap": cap_field, "field": spent_field, "since": since})


def note_wait(redis_sync, job_id: str, cap_field: str, spent_field: str) -> None:
    """Say that ``job_id``'s reservations wait on ``cap_field`` (read by ``wait_status``). Best effort."""
    try:
        key = WAIT_KEY + job_id
        redis_sync.set(key, _wait_note(job_id, cap_field, spent_field, redis_sync.get(key)), ex=WAIT_NOTE_TTL_S)
    except Exception as e:   # the note only explains; the reservation goes on without it
        log.debug("budget: wait note for %s: %s", job_id, e)


def wait_reason(redis_sync, cap_field: str, spent_field: str) -> dict:
    """What stands in front of a cap: its cap, spend and holds now, and which jobs hold them."""
    cap = int(redis_sync.hget(KEYS[1], cap_field) or -1)
    spent = int(redis_sync.hget(KEYS[2], spent_field) or 0)
    held = int(redis_sync.hget(KEYS[3], spent_field) or 0)
    by_job: dict[str, list[int]] = {}
    for rid, rec in redis_sync.hscan_iter(KEYS[4]):
        rec = rec.decode(errors="replace")
        parts = rec.split("|", 2)
        if len(parts) == 3 and spent_field in parts[2].split("\t") and parts[0].isdigit():
            b = by_job.setdefault(rid.decode(errors="replace").split(":", 1)[0], [0, 0])
            b[0] += 1
            b[1] += int(parts[0])
    holders = sorted(({"job_id": j, "holds": n, "held_usd": str(from_units(u))} for j, (n, u) in by_job.items()),
                     key=lambda h: -Decimal(h["held_usd"]))
    return {"cap": cap_field, "cap_usd": str(from_units(cap)) if cap >= 0 else None,
            "spent_usd": str(from_units(spent)), "held_usd": str(from_units(held)), "holders": holders[:5],
            "holders_total": len(holders)}


def describe_wait(w: dict) -> str:
    """``the tier:background cap $0.01: $0.002 spent, $0.0079 held by job_x (100 holds, $0.0079)``."""
    by = ", ".join(f"{h['job_id']} ({h['holds']} holds, ${h['held_usd']})" for h in w["holders"]) or "nobody now"
    more = f" and {w['holders_total'] - len(w['holders'])} more jobs" if w["holders_total"] > len(w["holders"]) else ""
    return (f"the {w['cap']} cap ${w['cap_usd']}: ${w['spent_usd']} spent, ${w['held_usd']} held by {by}{more}")


def wait_status(redis_sync, job_id: str) -> dict | None:
    """Why ``job_id``'s reservations wait right now (``llmbatch status``), or None."""
    raw = redis_sync.get(WAIT_KEY + job_id)
    if not raw:
        return None
    note = json.loads(raw)
    w = wait_reason(redis_sync, note["cap"], note["field"])
    w["waiting_s"] = round(max(0.0, time.time() - float(note["since"])), 1)
    w["text"] = f"waiting {w['waiting_s']:.0f}s on " + describe_wait(w)
    return w
