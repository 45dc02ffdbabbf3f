"""Ids from input, made safe for the places they travel: headers, Redis, log lines.

``custom_id`` and ``job_id`` come from users and services. They are stored
and exported as given, but never put raw where a byte means something:

* ``request_key`` is the one builder of a request's key: the provider call's
  ``Idempotency-Key`` header and the budget's hold id. It is
  ``<job_id>:<hash of custom_id>``, printable ASCII whatever the ids hold
  (a ``café-1`` used to fail every call with UnicodeEncodeError; a newline
  was refused by the HTTP client). The ``<job_id>:`` prefix is kept readable
  so a provider's (or the simulator's) per-key figures can be grouped by job.
* ``refuse_control`` refuses what an id must never carry: control
  characters (C0, DEL, C1) and the Unicode line and paragraph separators.
  Submit and the batcher refuse such ids with that reason; anything printable
  (accents, CJK, emoji, spaces) is a valid id.

This module never logs and never touches a service.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote

from pipeline.errors import LineError

#: characters an id may not contain: they end or rewrite a line wherever the id is shown
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: the hash of a custom_id in a key: 128 bits, no two ids of one job share a key
_DIGEST_BYTES = 16


def refuse_control(text: str, what: str) -> None:
    """Raise ``LineError`` when ``text`` (an id, named ``what``) holds a control character."""
    m = CONTROL.search(text)
    if m is not None:
        raise LineError(f"{what} contains a control character ({m.group()!r}) at position {m.start()}:"
                        " ids must be printable")


def request_key(job_id: str, custom_id: str) -> str:
    """The one key of request (``job_id``, ``custom_id``): printable ASCII, safe in a header.

    Distinct ``custom_id``s of a job give distinct keys (a 128-bit BLAKE2b of
    the id's UTF-8). ``job_id`` is kept as it is when it is made of letters,
    digits and ``_ . - ~`` (every id the pipeline makes), percent-encoded
    otherwise, so the key never needs a byte outside printable ASCII.
    """
    digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES)
    return f"{quote(job_id, safe='', errors='surrogatepass')}:{digest.hexdigest()}"
