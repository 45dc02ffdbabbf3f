# Shared shell functions for infra/setup.sh and infra/stack.sh. Source it.
#
# Every process NAME keeps its pid in var/run/NAME.pid and its output in
# var/log/NAME.log (the previous run's log is kept as NAME.log.1).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A second stack on one machine: LLMBATCH_VAR_DIR and LLMBATCH_PORT_OFFSET (see stack.sh).
VAR="${LLMBATCH_VAR_DIR:-$ROOT/var}"
RUN_DIR="$VAR/run"
LOG_DIR="$VAR/log"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# How long start_process waits for READY_CHECK (seconds); override per call
# by setting READY_TIMEOUT in the environment of the call.
READY_TIMEOUT_DEFAULT=60

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

# Keep the previous run's log as NAME.log.1 and start a fresh one.
rotate_log() { # NAME
    local f
    f=$(log_file "$1")
    if [ -s "$f" ]; then mv -f "$f" "$f.1"; fi
    : >"$f"
}

# start_process NAME READY_CHECK CMD...
#   Starts CMD in its own session (survives the calling shell), output to
#   var/log/NAME.log, pid to var/run/NAME.pid, then polls READY_CHECK (a shell
#   command line, evaluated; $PID is the new process) until it succeeds, the
#   process dies, or READY_TIMEOUT seconds pass. Skips a NAME that is up.
#   Returns non-zero (after printing the log's tail) when the start fails.
start_process() {
    local name=$1 check=$2; shift 2
    local timeout=${READY_TIMEOUT:-$READY_TIMEOUT_DEFAULT}
    ensure_dirs
    if is_up "$name"; then
        say "$name" "already up (pid $(read_pid "$name")), unchanged"
        return 0
    fi
    rm -f "$(pid_file "$name")"
    rotate_log "$name"
    local log started
    log=$(log_file "$name")
    started=$(date +%s)
    # setsid without -f execs in place (the background child is not a group
    # leader), so $! is the process itself and it leads its own group.
    (cd "$ROOT" && PYTHONUNBUFFERED=1 exec setsid "$@" >>"$log" 2>&1 </dev/null) &
    local pid=$!
    echo "$pid" >"$(pid_file "$name")"
    local deadline=$((started + timeout))
    while :; do
        if ! pid_alive "$pid"; then
            wait "$pid" 2>/dev/null
            say "$name" "FAILED: exited during start-up"
            show_log_tail "$name"
            rm -f "$(pid_file "$name")"
            return 1
        fi
        if PID=$pid eval "$check" >/dev/null 2>&1; then
            say "$name" "started (pid $pid) in $(($(date +%s) - started)) s"
            return 0
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "$name" "FAILED: not ready after ${timeout} s (still running as pid $pid; stopping it)"
            show_log_tail "$name"
            stop_process "$name" >/dev/null
            return 1
        fi
        sleep 0.5
    done
}

# stop_process NAME [TIMEOUT]
#   SIGTERM to the process (a warm shutdown for Celery), wait up to TIMEOUT
#   (default 20) seconds, then SIGKILL whatever is left of its process group.
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
    kill -TERM "$pid" 2>/dev/null
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

file_hash() { # FILE...
    cat "$@" | sha256sum | cut -d' ' -f1
}
