# Shared shell functions for infra/setup.sh and infra/stack.sh. Source it.
#
# Every process NAME keeps its pid in var/run/NAME.pid (written by
# `stack.sh exec` at each start, so it follows supervisord's restarts) and
# its output in var/log/NAME.log (supervisord rotates it at 50 MB to
# NAME.log.1). The stack's generated passwords are in var/secrets.env.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A second stack on one machine: LLMBATCH_VAR_DIR and LLMBATCH_PORT_OFFSET (see stack.sh).
VAR="${LLMBATCH_VAR_DIR:-$ROOT/var}"
RUN_DIR="$VAR/run"
LOG_DIR="$VAR/log"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

SECRETS_FILE="$VAR/secrets.env"

# How long `stack.sh up` waits for a process to be ready (seconds).
READY_TIMEOUT_DEFAULT=120

say() { # NAME MESSAGE...
    local name=$1; shift
    printf '%-18s %s\n' "$name" "$*"
}

die() { # MESSAGE...
    printf 'error: %s\n' "$*" >&2
    exit 1
}

ensure_dirs() {
    mkdir -p "$RUN_DIR" "$LOG_DIR"
}

pid_file() { echo "$RUN_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

# The pid recorded for NAME, or nothing.
read_pid() {
    local f
    f=$(pid_file "$1")
    [ -s "$f" ] || return 1
    local pid
    pid=$(head -n1 "$f" | tr -dc '0-9')
    [ -n "$pid" ] || return 1
    echo "$pid"
}

pid_alive() { # PID
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null && ! is_zombie "$1"
}

is_zombie() { # PID
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st == Z* ]]
}

# True when NAME's pid file names a live process.
is_up() { # NAME
    local pid
    pid=$(read_pid "$1") || return 1
    pid_alive "$pid"
}

# True when something accepts TCP connections on 127.0.0.1:PORT.
port_open() { # PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True when PID is the process its pid file was written for: it started no later than the
# file was written (a pid reused by an unrelated process started after it).
pid_is_ours() { # PID FILE
    local etimes mtime
    etimes=$(ps -o etimes= -p "$1" 2>/dev/null | tr -d ' ') || return 1
    [ -n "$etimes" ] || return 1
    mtime=$(stat -c %Y "$2" 2>/dev/null) || return 1
    [ $(($(date +%s) - etimes)) -le $((mtime + 2)) ]
}

# Signal PID's whole process group when PID leads one (setsid'ed), else PID.
signal_tree() { # SIGNAL PID
    local sig=$1 pid=$2 pgid
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
    if [ -n "$pgid" ] && [ "$pgid" = "$pid" ]; then
        kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid" 2>/dev/null
    else
        kill -s "$sig" "$pid" 2>/dev/null
    fi
}

# Is anything left in process group PGID?
group_alive() { # PGID
    local left
    left=$(ps -e -o pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/' | head -n1)
    [ -n "$left" ]
}

show_log_tail() { # NAME [LINES]
    local f
    f=$(log_file "$1")
    echo "----- last ${2:-30} lines of ${f#"$ROOT/"} -----" >&2
    if [ -f "$f" ]; then tail -n "${2:-30}" "$f" >&2; else echo "(no log)" >&2; fi
    echo "-----" >&2
}

# stop_process NAME [TIMEOUT]
#   STOP_SIGNAL (default SIGTERM, a warm shutdown for Celery) to the process, wait up
#   to TIMEOUT (default 20) seconds, then SIGKILL whatever is left of its process group.
#   For a process outside the supervisor (infra/stack.sh stops supervised ones through it).
stop_process() {
    local name=$1 timeout=${2:-20}
    local pid
    if ! pid=$(read_pid "$name") || ! pid_alive "$pid"; then
        rm -f "$(pid_file "$name")"
        say "$name" "already down"
        return 0
    fi
    local leader=
    [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] && leader=1
    kill -s "${STOP_SIGNAL:-TERM}" "$pid" 2>/dev/null
    local i=0
    while pid_alive "$pid" && [ $i -lt $((timeout * 4)) ]; do
        sleep 0.25
        i=$((i + 1))
    done
    local how="stopped"
    if pid_alive "$pid"; then
        signal_tree KILL "$pid"
        how="killed (no exit within ${timeout} s of SIGTERM)"
    fi
    # children the process left behind (e.g. prefork pool processes)
    if [ -n "$leader" ] && group_alive "$pid"; then
        sleep 1
        group_alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    rm -f "$(pid_file "$name")"
    say "$name" "$how (pid $pid)"
}

# kill_process NAME: SIGKILL the process and its group, as a crash would.
kill_process() {
    local name=$1 pid
    if ! pid=$(read_pid "$name") || ! pid_alive "$pid"; then
        rm -f "$(pid_file "$name")"
        say "$name" "already down"
        return 0
    fi
    signal_tree KILL "$pid"
    local i=0
    while pid_alive "$pid" && [ $i -lt 40 ]; do sleep 0.25; i=$((i + 1)); done
    rm -f "$(pid_file "$name")"
    say "$name" "killed (SIGKILL, pid $pid)"
}

# Readiness helpers for READY_CHECK strings.
log_has() { # NAME FIXED-STRING
    grep -qF -- "$2" "$(log_file "$1")"
}

http_ok() { # URL
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null && return 0
    "$PY" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

# The newest installed PostgreSQL server's bin directory.
pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    [ -n "$d" ] && [ -x "$d/postgres" ] || return 1
    echo "$d"
}

# ---- the stack's secrets (var/secrets.env, mode 0600)

random_secret() { # 24 random bytes as 48 hex digits: safe in URLs, configs and shells unquoted
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

# Create the secrets file, or add what an older one lacks; never change a value in it.
# Keys are the settings' environment names (pipeline/config.py reads this file), so
# `docker compose --env-file var/secrets.env` can use it as well.
ensure_secrets() {
    mkdir -p "$VAR"
    local new=
    if [ ! -e "$SECRETS_FILE" ]; then
        (umask 077; printf '%s\n' "# Generated by infra/stack.sh for this stack: Postgres, Redis, Kafka and Flower passwords." \
            "# Keep it private (mode 0600). pipeline/config.py reads it; the environment wins over it." \
            >"$SECRETS_FILE")
        new=1
    fi
    chmod 600 "$SECRETS_FILE"
    local key added=()
    for key in LLMBATCH_DATABASE_PASSWORD LLMBATCH_READER_PASSWORD LLMBATCH_REDIS_PASSWORD \
               LLMBATCH_FLOWER_PASSWORD LLMBATCH_GRAFANA_PASSWORD LLMBATCH_KAFKA_ADMIN_PASSWORD \
               LLMBATCH_KAFKA_BATCHER_PASSWORD LLMBATCH_KAFKA_PRODUCER_KEY; do
        grep -q "^$key=" "$SECRETS_FILE" || { echo "$key=$(random_secret)" >>"$SECRETS_FILE"; added+=("$key"); }
    done
    grep -q '^LLMBATCH_FLOWER_USER=' "$SECRETS_FILE" || echo "LLMBATCH_FLOWER_USER=llmbatch" >>"$SECRETS_FILE"
    # the first API key of `llmbatch api` (project default), registered hashed when the api starts;
    # there is no default key: each stack makes its own
    grep -q '^LLMBATCH_API_FIRST_KEY=' "$SECRETS_FILE" \
        || { echo "LLMBATCH_API_FIRST_KEY=lb-$(random_secret)" >>"$SECRETS_FILE"; added+=(LLMBATCH_API_FIRST_KEY); }
    # signs the jobs page's session cookies (pipeline/api/web.py)
    grep -q '^LLMBATCH_API_SESSION_SECRET=' "$SECRETS_FILE" \
        || { echo "LLMBATCH_API_SESSION_SECRET=$(random_secret)" >>"$SECRETS_FILE"; added+=(LLMBATCH_API_SESSION_SECRET); }
    if [ -n "$new" ]; then
        say secrets "generated ${SECRETS_FILE#"$ROOT/"} (mode 0600): Postgres, Redis, Kafka, Flower passwords"
    elif [ ${#added[@]} -gt 0 ]; then
        say secrets "added ${added[*]} to ${SECRETS_FILE#"$ROOT/"}"
    fi
}

# DB_PASSWORD READER_PASSWORD REDIS_PASSWORD FLOWER_USER FLOWER_PASSWORD KAFKA_ADMIN_PASSWORD: the environment's
# LLMBATCH_* value when set (as in pipeline/config.py), else the secrets file's.
load_secrets() {
    [ -r "$SECRETS_FILE" ] || die "${SECRETS_FILE#"$ROOT/"} missing: run 'make setup' (or infra/stack.sh up)"
    local k v
    declare -A file=()
    while IFS='=' read -r k v; do
        [[ $k =~ ^LLMBATCH_[A-Z_]+$ ]] && file[$k]=$v
    done <"$SECRETS_FILE"
    DB_PASSWORD=${LLMBATCH_DATABASE_PASSWORD:-${file[LLMBATCH_DATABASE_PASSWORD]:-}}
    READER_PASSWORD=${LLMBATCH_READER_PASSWORD:-${file[LLMBATCH_READER_PASSWORD]:-}}
    REDIS_PASSWORD=${LLMBATCH_REDIS_PASSWORD:-${file[LLMBATCH_REDIS_PASSWORD]:-}}
    FLOWER_USER=${LLMBATCH_FLOWER_USER:-${file[LLMBATCH_FLOWER_USER]:-}}
    FLOWER_PASSWORD=${LLMBATCH_FLOWER_PASSWORD:-${file[LLMBATCH_FLOWER_PASSWORD]:-}}
    KAFKA_ADMIN_PASSWORD=${LLMBATCH_KAFKA_ADMIN_PASSWORD:-${file[LLMBATCH_KAFKA_ADMIN_PASSWORD]:-}}
    [ -n "$DB_PASSWORD" ] && [ -n "$READER_PASSWORD" ] && [ -n "$REDIS_PASSWORD" ] \
        && [ -n "$FLOWER_USER" ] && [ -n "$FLOWER_PASSWORD" ] && [ -n "$KAFKA_ADMIN_PASSWORD" ] \
        || die "${SECRETS_FILE#"$ROOT/"} lacks a password: remove it and run 'make up' to generate one"
}

file_hash() { # FILE...
    cat "$@" | sha256sum | cut -d' ' -f1
}
