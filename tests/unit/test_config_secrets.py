"""Secrets in the settings: the Secret type masks itself everywhere text is made of it, and
the local stack's generated secrets file feeds the URLs (an explicit URL still wins)."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import MASK, Secret, load_settings, mask_url

VALUE = "hunter2-0123456789abcdef"


@pytest.mark.parametrize("render", [
    str, repr, format, lambda s: f"{s}", lambda s: f"{s!s}", lambda s: f"{s!r}", lambda s: f"{s:>40}",
    lambda s: "%s" % s, lambda s: "%r" % (s,), lambda s: "{}".format(s), lambda s: "{0!s}".format(s),
    lambda s: str([s]), lambda s: str({"k": s}),
], ids=["str", "repr", "format", "f", "f!s", "f!r", "f:spec", "%s", "%r", ".format", ".format!s",
        "in a list", "in a dict"])
def test_secret_masks_itself(render):
    out = render(Secret(VALUE))
    assert VALUE not in out and MASK in out, out


def test_secret_masks_in_log_lines():
    """A log line formats its lazy ``%`` arguments with str() and repr()."""
    record = logging.LogRecord("llmbatch.test", logging.INFO, __file__, 1, "key %s and %r",
                               (Secret(VALUE), Secret(VALUE)), None)
    text = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert VALUE not in text and text.count(MASK) == 2, text


def test_secret_reveals_only_on_purpose():
    s = Secret(VALUE)
    assert s.reveal() == VALUE and type(s.reveal()) is str
    assert s == VALUE and bool(s) and not Secret("")   # still compares and tests as its value
    assert str(Secret("")) == "" and repr(Secret("")) == "Secret('')"


def _secrets_file(tmp_path, **values):
    (tmp_path / "secrets.env").write_text("# generated\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    return {"LLMBATCH_VAR_DIR": str(tmp_path), "LLMBATCH_CONFIG": "/nonexistent"}


def test_the_secrets_file_puts_the_passwords_into_the_default_urls(tmp_path):
    env = _secrets_file(tmp_path, LLMBATCH_DATABASE_PASSWORD="dbpw", LLMBATCH_READER_PASSWORD="rpw",
                        LLMBATCH_REDIS_PASSWORD="redispw", LLMBATCH_FLOWER_USER="u",
                        LLMBATCH_FLOWER_PASSWORD="fpw", LLMBATCH_GRAFANA_PASSWORD="only-for-compose")
    s = load_settings({**env, "LLMBATCH_PORT_OFFSET": "300"})
    assert s.database_url == "postgresql+psycopg://llmbatch:dbpw@127.0.0.1:55732/llmbatch"
    assert s.reader_url == "postgresql+psycopg://llmbatch_reader:rpw@127.0.0.1:55732/llmbatch"
    assert s.redis_url == "redis://:redispw@127.0.0.1:56679/0"
    assert (s.flower_user, s.flower_password.reveal()) == ("u", "fpw")
    assert isinstance(s.database_password, Secret)
    # nothing of it in the settings' repr
    text = repr(s)
    for pw in ("dbpw", "rpw", "redispw", "fpw"):
        assert f":{pw}@" not in text and f"'{pw}'" not in text, pw


def test_an_explicit_url_or_password_wins_over_the_file(tmp_path):
    env = _secrets_file(tmp_path, LLMBATCH_DATABASE_PASSWORD="dbpw", LLMBATCH_REDIS_PASSWORD="redispw")
    s = load_settings({**env, "LLMBATCH_DATABASE_URL": "postgresql+psycopg://me:mine@db:5432/x",
                       "LLMBATCH_REDIS_PASSWORD": "fromenv"})
    assert s.database_url == "postgresql+psycopg://me:mine@db:5432/x"
    assert s.redis_url == "redis://:fromenv@127.0.0.1:56379/0"


def test_without_a_secrets_file_the_urls_carry_no_password(tmp_path):
    s = load_settings({"LLMBATCH_VAR_DIR": str(tmp_path), "LLMBATCH_CONFIG": "/nonexistent"})
    assert s.database_url == "postgresql+psycopg://llmbatch@127.0.0.1:55432/llmbatch"
    assert s.redis_url == "redis://127.0.0.1:56379/0"


def test_reader_url_names_the_reader_even_when_the_database_url_names_no_user(tmp_path):
    s = load_settings({"LLMBATCH_VAR_DIR": str(tmp_path), "LLMBATCH_CONFIG": "/nonexistent",
                       "LLMBATCH_DATABASE_URL": "postgresql+psycopg://db.internal:5432/llmbatch"})
    assert s.reader_url == "postgresql+psycopg://llmbatch_reader@db.internal:5432/llmbatch"


def test_mask_url():
    assert mask_url("postgresql://u:p%40ss@h:1/d") == f"postgresql://u:{MASK}@h:1/d"
    assert mask_url("redis://:pw@h:1/0") == f"redis://:{MASK}@h:1/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"
