"""Projects and their API keys, in Postgres (sql/030_api.sql).

A key is ``lb-`` and 32 random bytes (``secrets.token_urlsafe``): 256 bits nobody can guess, so
it is stored as its sha256 and nothing else. A slow password hash (bcrypt, argon2) defends a
low-entropy secret against guessing from a stolen table; a random key has no such weakness, and
a fast hash lets every call look its key up with one index probe (``project_of``). The key is
shown once, when it is made; ``hint`` (its first characters) tells keys apart in a list.

This module never logs, stores or returns a key except from ``create_key``.
"""

from __future__ import annotations

import hashlib
import re
import secrets

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.errors import InputError

PREFIX = "lb-"
#: a project id: what a budget scope ``project:<id>`` and a files directory may hold
PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def check_project(project_id: str) -> str:
    if not isinstance(project_id, str) or not PROJECT_RE.match(project_id):
        raise InputError(f"project {project_id!r}: lower-case letters, digits, '-' and '_', at most 63")
    return project_id


def ensure_project(conn: Connection, project_id: str) -> None:
    conn.execute(sa.text("INSERT INTO api_projects (project_id) VALUES (:p) ON CONFLICT DO NOTHING"),
                 {"p": check_project(project_id)})


def register_key(conn: Connection, project_id: str, key: str, name: str | None = None) -> tuple[str, bool]:
    """Store ``key`` (its hash) for ``project_id``; (key id, whether it was new). A key already
    stored, revoked or not, is left as it is: registering never brings a revoked key back."""
    ensure_project(conn, project_id)
    key_id = "key_" + secrets.token_hex(8)
    new = conn.execute(sa.text(
        "INSERT INTO api_keys (key_id, project_id, key_sha256, hint, name) VALUES (:i, :p, :h, :hint, :n)"
        " ON CONFLICT (key_sha256) DO NOTHING"),
        {"i": key_id, "p": project_id, "h": key_hash(key), "hint": key[:len(PREFIX) + 4], "n": name}).rowcount
    if not new:
        key_id = conn.execute(sa.text("SELECT key_id FROM api_keys WHERE key_sha256 = :h"),
                              {"h": key_hash(key)}).scalar()
    return key_id, bool(new)


def create_key(conn: Connection, project_id: str, name: str | None = None) -> tuple[str, str]:
    """A new key for ``project_id`` (made if missing): (key id, the key, shown this once)."""
    key = new_key()
    key_id, _ = register_key(conn, project_id, key, name)
    return key_id, key


def revoke_key(conn: Connection, key_id: str) -> bool:
    """Revoke a key at once: its next call answers 401. False if there is no such live key."""
    return bool(conn.execute(sa.text(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = :i AND revoked_at IS NULL"),
        {"i": key_id}).rowcount)


def list_keys(conn: Connection) -> list[dict]:
    return [dict(r) for r in conn.execute(sa.text(
        "SELECT key_id, project_id, hint, name, created_at, revoked_at FROM api_keys"
        " ORDER BY project_id, created_at")).mappings()]


def project_of(conn: Connection, key: str | None) -> str | None:
    """The project of a live key; None for no key, an unknown one or a revoked one."""
    if not key:
        return None
    return conn.execute(sa.text(
        "SELECT project_id FROM api_keys WHERE key_sha256 = :h AND revoked_at IS NULL"),
        {"h": key_hash(key)}).scalar()


def key_of(conn: Connection, key: str | None) -> tuple[str, str] | None:
    """(key id, project) of a live key; None for no key, an unknown one or a revoked one (the jobs
    page's login: its session keeps the key id, never the key)."""
    if not key:
        return None
    row = conn.execute(sa.text(
        "SELECT key_id, project_id FROM api_keys WHERE key_sha256 = :h AND revoked_at IS NULL"),
        {"h": key_hash(key)}).first()
    return (row.key_id, row.project_id) if row else None


def project_of_key_id(conn: Connection, key_id: str | None) -> str | None:
    """The project of the key ``key_id`` while it is live: a session ends when its key is revoked."""
    if not key_id:
        return None
    return conn.execute(sa.text(
        "SELECT project_id FROM api_keys WHERE key_id = :i AND revoked_at IS NULL"), {"i": key_id}).scalar()
