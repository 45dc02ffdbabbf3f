#!/usr/bin/env bash
# One-time (idempotent) machine setup for llmbatch without Docker:
#   Debian packages (PostgreSQL server, Redis, chromium and its driver for the
#   browser test), the .venv with the project
#   installed (supervisord with it), the Kafka broker jars from Maven Central,
#   offline tokenizer files, and the stack's generated passwords
#   (var/secrets.env, mode 0600). Each step prints one line; a second run
#   skips what is done.
set -uo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STEP_LOG="$VAR/log/setup.log"
mkdir -p "$VAR/log"
: >"$STEP_LOG"

step_fail() { # NAME MESSAGE
    say "$1" "FAILED: $2"
    echo "----- last 30 lines of ${STEP_LOG#"$ROOT/"} -----" >&2
    tail -n 30 "$STEP_LOG" >&2
    exit 1
}

# Run a command with its output in var/log/setup.log.
quiet() { "$@" >>"$STEP_LOG" 2>&1; }

# ---- 1. Debian packages
step_packages() {
    local missing=()
    pg_bindir >/dev/null || missing+=(postgresql)
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
    command -v psql >/dev/null || missing+=(postgresql-client)
    command -v curl >/dev/null || missing+=(curl)
    # the jobs page's browser test (tests/integration/test_api_web.py): Debian's headless chromium and its driver
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    if [ ${#missing[@]} -eq 0 ]; then
        say packages "present (postgresql $(basename "$(dirname "$(pg_bindir)")"), redis $(redis-server --version | awk '{print $3}' | sed 's/^v=//'), chromium)"
        return
    fi
    [ "$(id -u)" = 0 ] || step_fail packages "need root to install: ${missing[*]}"
    command -v apt-get >/dev/null || step_fail packages "no apt-get; install ${missing[*]} by hand"
    # Do not let the packages create/start their own default services
    # (a 'main' cluster on 5432, redis on 6379): this stack runs its own.
    mkdir -p /etc/postgresql-common
    if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
        echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
    fi
    local policy=/usr/sbin/policy-rc.d added_policy=
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && added_policy=1
    fi
    local ok=1
    quiet apt-get update || ok=
    [ -n "$ok" ] && { DEBIAN_FRONTEND=noninteractive quiet apt-get install -y --no-install-recommends "${missing[@]}" || ok=; }
    [ -n "$added_policy" ] && rm -f $policy
    [ -n "$ok" ] || step_fail packages "apt-get install ${missing[*]} failed"
    pg_bindir >/dev/null || step_fail packages "postgresql installed but no server in /usr/lib/postgresql/*/bin"
    say packages "installed ${missing[*]}"
}

# ---- 2. Python virtualenv with the project (editable) and its dev extras
step_venv() {
    local stamp="$VENV/.llmbatch-installed" want
    want=$(file_hash "$ROOT/pyproject.toml")
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
            && [ -x "$VENV/bin/llmbatch" ]; then
        say venv "up to date (.venv, pyproject.toml unchanged)"
        return
    fi
    local python=${PYTHON:-python3}
    if [ ! -x "$PY" ]; then
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            || step_fail venv "$python is missing or older than 3.11 (set PYTHON=...)"
        quiet "$python" -m venv "$VENV" || step_fail venv "cannot create .venv (python3-venv installed?)"
    fi
    quiet "$PY" -m pip install -q --upgrade pip || step_fail venv "pip upgrade failed"
    (cd "$ROOT" && quiet "$PY" -m pip install -q -e '.[dev]') || step_fail venv "pip install -e '.[dev]' failed"
    echo "$want" >"$stamp"
    say venv "installed the project into .venv (pip install -e '.[dev]')"
}

# ---- 3. Kafka broker jars
step_kafka() {
    local libs="$ROOT/infra/kafka/libs" pom="$ROOT/infra/kafka/pom.xml" want
    want=$(file_hash "$pom")
    if [ -f "$libs/.complete" ] && [ "$(cat "$libs/.complete")" = "$want" ]; then
        say kafka-jars "up to date ($(ls "$libs"/*.jar | wc -l) jars in infra/kafka/libs)"
        return
    fi
    command -v mvn >/dev/null || step_fail kafka-jars "mvn not found"
    command -v java >/dev/null || step_fail kafka-jars "java not found (Java 17 needed)"
    rm -rf "$libs"   # stale jars of another pom would stay on the classpath
    quiet mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs" \
        || step_fail kafka-jars "mvn dependency:copy-dependencies failed"
    ls "$libs"/kafka_2.13-*.jar >/dev/null 2>&1 || step_fail kafka-jars "no kafka jar after copy"
    echo "$want" >"$libs/.complete"
    say kafka-jars "copied $(ls "$libs"/*.jar | wc -l) jars to infra/kafka/libs"
}

# ---- 4. Offline tokenizer files
step_tokens() {
    (cd "$ROOT" && quiet "$PY" -m pipeline.money.tokens provision) \
        || step_fail tokens "'python -m pipeline.money.tokens provision' failed"
    say tokens "tokenizer files provisioned (python -m pipeline.money.tokens provision)"
}

# ---- 5. The stack's passwords (Postgres roles, Redis, Flower): generated once, kept
step_secrets() {
    local out
    out=$(ensure_secrets) || step_fail secrets "cannot write ${SECRETS_FILE#"$ROOT/"}"
    if [ -n "$out" ]; then
        echo "$out"
    else
        say secrets "present (${SECRETS_FILE#"$ROOT/"}, mode $(stat -c %a "$SECRETS_FILE"))"
    fi
}

main() {
    local t0
    t0=$(date +%s)
    step_packages
    step_venv
    step_kafka
    step_tokens
    step_secrets
    say setup "done in $(($(date +%s) - t0)) s (log: var/log/setup.log)"
}

main "$@"
