#!/usr/bin/env bash
# Local llmbatch stack without Docker: Postgres, Redis, Kafka (KRaft) and the
# app processes, supervised by supervisord (infra/supervise.py) as systemd or
# Kubernetes would: a process that dies is started again, with a growing
# delay while it keeps dying at start-up. All state lives under var/ at the
# repo root (or LLMBATCH_VAR_DIR).
#
#   infra/stack.sh up [NAME...]       prepare and start (in order), skipping what is up
#   infra/stack.sh down [NAME...]     stop (in reverse order); with no NAME, the supervisor too
#   infra/stack.sh status [NAME...]   NAME STATE PID UPTIME RESTARTS PORT
#   infra/stack.sh restart NAME...    down then up
#   infra/stack.sh kill NAME...       SIGKILL to the process group, as a crash would;
#                                     the supervisor starts it again
#   infra/stack.sh secrets            generate var/secrets.env if missing (also docker compose's)
#   infra/stack.sh exec NAME          what supervisord runs: the process, in the foreground
#
# This script prepares each service (initdb, roles and passwords, Kafka
# storage and topics, migrations) and decides when a start is ready;
# supervisord owns the processes. The stack's passwords are generated into
# var/secrets.env (mode 0600) and read from there by pipeline/config.py.
#
# Names: postgres redis kafka simulator batcher worker-immediate worker-peak
# worker-offpeak worker-background scheduler api flower. Run infra/setup.sh first.
set -uo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL=(postgres redis kafka simulator batcher
     worker-immediate worker-peak worker-offpeak worker-background scheduler api flower)

# LLMBATCH_PORT_OFFSET shifts every port, so a second stack (with its own
# LLMBATCH_VAR_DIR) can run beside the first; pipeline/config.py applies the same shift.
OFF=${LLMBATCH_PORT_OFFSET:-0}
PG_PORT=$((55432 + OFF))
REDIS_PORT=$((56379 + OFF))
KAFKA_PORT=$((59092 + OFF))
KAFKA_CONTROLLER_PORT=$((59093 + OFF))
SIMULATOR_PORT=$((58080 + OFF))
FLOWER_PORT=$((5555 + OFF))
API_PORT=$((58600 + OFF))
PG_USER=postgres            # the unprivileged system user that runs the server (as root)
[ "$(id -u)" = 0 ] || PG_USER=$(id -un)
PGDATA="$VAR/pgdata"
PG_SOCKET_DIR="$VAR/pgsocket"
KAFKA_DIR="$VAR/kafka"
# per process: the environment of the `up` that started it (supervisord restarts with it)
ENV_DIR="$VAR/supervisor/env"

port_of() {
    case $1 in
        postgres) echo $PG_PORT ;;
        redis) echo $REDIS_PORT ;;
        kafka) echo $KAFKA_PORT ;;
        simulator) echo $SIMULATOR_PORT ;;
        flower) echo $FLOWER_PORT ;;
        api) echo $API_PORT ;;
        *) echo - ;;
    esac
}

need_venv() {
    [ -x "$PY" ] || die "no .venv: run 'make setup' (infra/setup.sh) first"
}

# A process that is not ours but holds our port: do not start a second one.
port_taken() { # NAME
    local port
    port=$(port_of "$1")
    [ "$port" != - ] && port_open "$port"
}

# Every port NAME binds (Kafka's controller too).
ports_of() { # NAME
    case $1 in
        kafka) echo "$KAFKA_PORT $KAFKA_CONTROLLER_PORT" ;;
        *) [ "$(port_of "$1")" = - ] || port_of "$1" ;;
    esac
}

# A port nobody listens on can still be unbindable: the kernel gives outgoing connections their
# local port from its ephemeral range (Linux: 32768-60999), where the default ports lie
# (docs/CONFIGURATION.md). A service started then dies with "address already in use"; so wait
# for such a socket to close (it names the holder), up to PORT_WAIT_S seconds.
wait_ports_free() { # NAME
    local name=$1 port holder deadline
    deadline=$(($(date +%s) + ${PORT_WAIT_S:-60}))
    for port in $(ports_of "$name"); do
        holder=
        while ! "$PY" -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; do
            if [ -z "$holder" ]; then
                holder=$(ss -tanpH "( sport = :$port )" 2>/dev/null | head -n 1 | tr -s ' ')
                say "$name" "port $port is held by a socket that does not listen (${holder:-holder unknown});" \
                    "waiting up to ${PORT_WAIT_S:-60} s for it to close"
            fi
            if [ "$(date +%s)" -ge "$deadline" ]; then
                say "$name" "FAILED: port $port still held after ${PORT_WAIT_S:-60} s; close that socket" \
                    "or move the stack (LLMBATCH_PORT_OFFSET, docs/CONFIGURATION.md)"
                return 1
            fi
            sleep 0.5
        done
    done
}

# ---------------------------------------------------------------- supervision

sv() { "$PY" "$ROOT/infra/supervise.py" "$@"; }

# STATE and SPID of NAME as supervisord sees it (STATE ABSENT: no supervisord, or no such program).
sv_state() { # NAME
    read -r STATE SPID < <(sv state "$1" 2>/dev/null) || { STATE=ABSENT; SPID=-; }
    [ -n "${STATE:-}" ] || STATE=ABSENT
}

ensure_supervisor() {
    need_venv
    [ -x "$VENV/bin/supervisord" ] || die "supervisord missing in .venv: run 'make setup' (infra/setup.sh)"
    ensure_dirs
    sv ensure "${ALL[@]}" || die "cannot start supervisord (log: ${LOG_DIR#"$ROOT/"}/supervisord.log)"
}

starts_of() { # NAME -> spawns since the last deliberate start
    local n
    n=$(cat "$RUN_DIR/$1.starts" 2>/dev/null) || n=0
    echo "${n:-0}"
}

# A variable a provider's key is read from (pipeline/providers/registry.py): named, quoted, in
# the providers setting (LLMBATCH_PROVIDERS, JSON) or in the TOML settings file.
key_var() { # VAR
    case "${LLMBATCH_PROVIDERS:-}" in *"\"$1\""*) return 0 ;; esac
    local toml=${LLMBATCH_CONFIG:-$ROOT/llmbatch.toml}
    [ -f "$toml" ] && grep -q "\"$1\"" "$toml"
}

# The environment a process runs with: this call's LLMBATCH_* (and provider keys), kept in a
# 0600 file so that supervisord's restarts run it exactly as `up` did.
save_env() { # NAME
    mkdir -p "$ENV_DIR"
    local f="$ENV_DIR/$1.env" v
    (umask 077; : >"$f.new")
    for v in $(compgen -e); do
        case $v in
            LLMBATCH_*|OPENAI_*|ANTHROPIC_*|TIKTOKEN_*) printf 'export %s=%q\n' "$v" "${!v}" >>"$f.new" ;;
            *) if key_var "$v"; then printf 'export %s=%q\n' "$v" "${!v}" >>"$f.new"; fi ;;
        esac
    done
    mv -f "$f.new" "$f"
}

# A live process in NAME's pid file that supervisord does not own: left by a supervisord that
# was killed, or by a stack from before supervision. Stop it, so the supervisor can own NAME.
adopt_unsupervised() { # NAME
    local name=$1 pid
    pid=$(read_pid "$name") || return 0
    pid_alive "$pid" && pid_is_ours "$pid" "$(pid_file "$name")" || { rm -f "$(pid_file "$name")"; return 0; }
    say "$name" "running unsupervised (pid $pid): stopping it, to start it under the supervisor"
    stop_unsupervised "$name" >/dev/null
}

stop_unsupervised() { # NAME  (SIGINT is Postgres' fast shutdown; SIGTERM for the rest)
    local name=$1 sig=TERM
    [ "$name" = postgres ] && sig=INT
    STOP_SIGNAL=$sig stop_process "$name" 30
}

# Starts that may fail, during one `up`, before a process counts as not starting. A start can
# fail for a passing reason (a lock a dying predecessor still holds, a port a client socket took
# a moment ago); the supervisor tries again after 1 s, then 2 s, so a cause that does not pass
# still fails the `up` within seconds.
START_ATTEMPTS=3

# The error lines NAME's log gained since `up` started it (every failed start's), at most 12.
errors_since_up() { # NAME
    local f pos
    f=$(log_file "$1")
    pos=$(cat "$RUN_DIR/$1.uppos" 2>/dev/null) || pos=0
    [ -f "$f" ] || return 0
    [ "$(stat -c %s "$f")" -ge "${pos:-0}" ] || pos=0
    tail -c +$((${pos:-0} + 1)) "$f" | grep -E -m 12 'ERROR|FATAL|Exception:|Error:|error:|Caused by' || true
}

# Wait until NAME (started by the supervisor) passes READY_CHECK. With FAIL_FAST, a process
# that fails START_ATTEMPTS starts is stopped, and its error lines and log tail shown; one
# that fails fewer and then comes up is reported with the error lines of its failed starts.
wait_ready() { # NAME READY_CHECK TIMEOUT FAIL_FAST
    local name=$1 check=$2 timeout=$3 fail_fast=$4
    local started deadline port starts failed
    started=$(date +%s)
    deadline=$((started + timeout))
    port=$(port_of "$name")
    [ "$port" = - ] && port= || port=", port $port"
    while :; do
        sv_state "$name"
        starts=$(starts_of "$name")
        if [[ $STATE == RUNNING || $STATE == STARTING ]] && PID=$SPID eval "$check" >/dev/null 2>&1; then
            failed=
            [ "$fail_fast" = 1 ] && [ "$starts" -gt 1 ] && failed=", after $((starts - 1)) failed start(s); their errors:"
            say "$name" "started (pid $SPID$port) in $(($(date +%s) - started)) s$failed"
            [ -z "$failed" ] || errors_since_up "$name" | sed 's/^/    /'
            return 0
        fi
        if [ "$fail_fast" = 1 ] && { [[ $STATE == FATAL ]] || [ "$starts" -gt $START_ATTEMPTS ] \
                || { [ "$starts" -eq $START_ATTEMPTS ] && [[ $STATE == BACKOFF || $STATE == EXITED ]]; }; }; then
            say "$name" "FAILED: exited during start-up, $starts times; the errors:"
            errors_since_up "$name" >&2
            show_log_tail "$name"
            sv stop "$name" >/dev/null
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            if [ "$fail_fast" = 1 ]; then
                say "$name" "FAILED: not ready after ${timeout} s (state $STATE; stopping it)"
                errors_since_up "$name" >&2
                show_log_tail "$name"
                sv stop "$name" >/dev/null
            else
                say "$name" "FAILED: not ready after ${timeout} s (state $STATE; the supervisor keeps trying)"
                show_log_tail "$name"
            fi
            return 1
        fi
        sleep 0.5
    done
}

# Start NAME under the supervisor unless it is up, then wait for READY_CHECK.
supervised_start() { # NAME READY_CHECK [TIMEOUT]
    local name=$1 check=$2 timeout=${3:-$READY_TIMEOUT_DEFAULT} port
    port=$(port_of "$name")
    [ "$port" = - ] && port= || port=", port $port"
    sv_state "$name"
    case $STATE in
        RUNNING)
            say "$name" "already up (pid $SPID$port), unchanged"
            return 0 ;;
        STARTING|BACKOFF)
            say "$name" "being restarted by the supervisor ($STATE, $(($(starts_of "$name") - 1)) restarts); waiting for it"
            wait_ready "$name" "$check" "$timeout" 0
            return ;;
    esac
    adopt_unsupervised "$name"
    if port_taken "$name"; then
        die "port $(port_of "$name") is taken by a process that is not this stack's $name"
    fi
    wait_ports_free "$name" || return 1
    save_env "$name"
    echo 0 >"$RUN_DIR/$name.starts"
    stat -c %s "$(log_file "$name")" >"$RUN_DIR/$name.uppos" 2>/dev/null || echo 0 >"$RUN_DIR/$name.uppos"
    sv start "$name" || return 1
    wait_ready "$name" "$check" "$timeout" 1
}

# Readiness from the log lines the current process wrote (stack.sh exec notes where they start).
log_has_since_start() { # NAME FIXED-STRING
    local f pos size
    f=$(log_file "$1")
    pos=$(cat "$RUN_DIR/$1.logpos" 2>/dev/null) || pos=0
    size=$(stat -c %s "$f" 2>/dev/null) || return 1
    [ "$size" -ge "${pos:-0}" ] || pos=0
    tail -c +$((${pos:-0} + 1)) "$f" | grep -qF -- "$2"
}

# ---------------------------------------------------------------- postgres

# As root, run as the unprivileged server user; otherwise as ourselves.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

# SQL from stdin, as the superuser postgres over the Unix socket (peer: only the OS user that
# owns the data directory may); so no superuser password exists and none travels.
pg_psql() {
    as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p $PG_PORT -U postgres -d postgres -tA
}

pg_prepare_dirs() {
    id "$PG_USER" >/dev/null 2>&1 || die "no system user '$PG_USER' (install the postgresql package: infra/setup.sh)"
    # The server user must traverse every directory down to var/.
    if ! as_pg test -x "$VAR"; then
        local d=$VAR blocked=
        while [ "$d" != / ]; do
            as_pg test -x "$d" 2>/dev/null || blocked=$d
            d=$(dirname "$d")
        done
        die "user '$PG_USER' cannot reach ${VAR} (blocked at ${blocked:-?}); grant it search permission there (chmod o+x) or clone the repo under a world-traversable directory"
    fi
    mkdir -p "$PGDATA" "$PG_SOCKET_DIR"
    chown "$PG_USER": "$PGDATA" "$PG_SOCKET_DIR"
    chmod 700 "$PGDATA"
    chmod 755 "$PG_SOCKET_DIR"
}

pg_initdb() {
    local bin=$1
    [ -s "$PGDATA/PG_VERSION" ] && return 0
    say postgres "initdb (first run) in ${PGDATA#"$ROOT/"}"
    # pg_hba.conf is replaced by pg_auth_files; nothing is trusted, not even for a moment
    as_pg "$bin/initdb" -D "$PGDATA" -U postgres -E UTF8 --no-locale \
        --auth-local=peer --auth-host=reject >>"$(log_file postgres-init)" 2>&1 \
        || { show_log_tail postgres-init; die "initdb failed"; }
    cat >>"$PGDATA/postgresql.conf" <<EOF

# ---- llmbatch (infra/stack.sh) ----
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 200       # 20 of them the reader's at most (sql/016_reader_limits.sql)
shared_buffers = 256MB
password_encryption = scram-sha-256
EOF
}

# Authentication, rewritten on every `up` (so an older data directory that trusted TCP is
# fixed too): scram-sha-256 for every TCP connection and for app roles on the socket; the
# superuser only on the socket, as the data directory's OS user. Prints "changed" if it was.
pg_auth_files() {
    local hba ident
    hba="# written by infra/stack.sh on every 'up' (edit it there, not here): no trust anywhere.
# TCP: every role with its password (scram-sha-256; the stack's are in var/secrets.env).
# Unix socket: the superuser postgres only as the OS user that owns the data directory.
local   all   postgres                 peer map=llmbatch_stack
local   all   all                      scram-sha-256
host    all   all        127.0.0.1/32  scram-sha-256
host    all   all        ::1/128       scram-sha-256"
    ident="# written by infra/stack.sh: the data directory's OS user may be the superuser on the socket
llmbatch_stack   $PG_USER   postgres"
    if [ "$(cat "$PGDATA/pg_hba.conf" 2>/dev/null)" != "$hba" ] \
            || [ "$(cat "$PGDATA/pg_ident.conf" 2>/dev/null)" != "$ident" ]; then
        printf '%s\n' "$hba" >"$PGDATA/pg_hba.conf"
        printf '%s\n' "$ident" >"$PGDATA/pg_ident.conf"
        chown "$PG_USER": "$PGDATA/pg_hba.conf" "$PGDATA/pg_ident.conf"
        chmod 600 "$PGDATA/pg_hba.conf" "$PGDATA/pg_ident.conf"
        echo changed
    fi
}

pg_ready() {
    pg_isready -q -h 127.0.0.1 -p $PG_PORT -t 2
}

# Roles, their passwords (from var/secrets.env; set on every `up`, so a new file takes effect),
# the database. Passwords go to psql on stdin, never on a command line.
pg_bootstrap_db() {
    load_secrets
    {
        printf '\\set dbpw %s\n\\set readerpw %s\n' "$DB_PASSWORD" "$READER_PASSWORD"
        cat <<'SQL'
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE llmbatch LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'llmbatch') \gexec
-- the read-only role of `llmbatch sql` (grants: sql/004_views.sql)
SELECT 'CREATE ROLE llmbatch_reader LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'llmbatch_reader') \gexec
ALTER ROLE llmbatch_reader SET default_transaction_read_only = on;
ALTER ROLE llmbatch WITH LOGIN PASSWORD :'dbpw';
ALTER ROLE llmbatch_reader WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'readerpw';
SELECT 'CREATE DATABASE llmbatch OWNER llmbatch' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'llmbatch') \gexec
\connect llmbatch
SQL
        # the reader's limits (connections, timeouts, temp files, no TEMP) need the superuser:
        # the migration that sets them, applied here first (idempotent; db upgrade then finds them)
        cat "$ROOT/sql/016_reader_limits.sql"
    } | pg_psql >>"$(log_file postgres-init)" 2>&1
}

pg_migrate() {
    need_venv
    [ -x "$VENV/bin/llmbatch" ] || die "no .venv/bin/llmbatch: run 'make setup' (infra/setup.sh)"
    if ! (cd "$ROOT" && "$VENV/bin/llmbatch" db upgrade) >>"$(log_file postgres-migrate)" 2>&1; then
        show_log_tail postgres-migrate
        die "'llmbatch db upgrade' failed (log: ${LOG_DIR#"$ROOT/"}/postgres-migrate.log)"
    fi
    say postgres "migrations applied (llmbatch db upgrade)"
}

up_postgres() {
    local bin
    bin=$(pg_bindir) || die "PostgreSQL server not installed: run infra/setup.sh"
    pg_prepare_dirs
    pg_initdb "$bin"
    local changed
    changed=$(pg_auth_files)
    sv_state postgres
    if [ -n "$changed" ] && [ "$STATE" = RUNNING ]; then
        kill -HUP "$SPID" 2>/dev/null && say postgres "authentication files rewritten: reloaded"
    fi
    supervised_start postgres pg_ready 60 || return 1
    pg_bootstrap_db || { show_log_tail postgres-init; say postgres "FAILED to create roles/database llmbatch"; return 1; }
    pg_migrate
}

exec_postgres() {
    local bin
    bin=$(pg_bindir) || die "PostgreSQL server not installed"
    if [ "$(id -u)" = 0 ]; then
        exec setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups -- \
            "$bin/postgres" -D "$PGDATA" -p "$PG_PORT"
    fi
    exec "$bin/postgres" -D "$PGDATA" -p "$PG_PORT"
}

# ---------------------------------------------------------------- redis

redis_cli() { # ARGS...  (the password from the environment, never on the command line)
    REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --no-auth-warning -h 127.0.0.1 -p $REDIS_PORT "$@"
}

redis_ready() {
    [ "$(redis_cli ping 2>/dev/null)" = PONG ]
}

# infra/redis.conf plus this stack's port, paths and password, in a 0600 file.
redis_config() {
    load_secrets
    mkdir -p "$VAR/redis"
    local f="$VAR/redis/redis.conf"
    (umask 077; cat >"$f.new" <<EOF
# written by infra/stack.sh (mode 0600: it holds the password)
include $ROOT/infra/redis.conf
port $REDIS_PORT
dir $VAR/redis
logfile ""
requirepass $REDIS_PASSWORD
EOF
    )
    mv -f "$f.new" "$f"
}

up_redis() {
    command -v redis-server >/dev/null || die "redis-server not installed: run infra/setup.sh"
    redis_config
    supervised_start redis redis_ready 30
}

exec_redis() {
    exec redis-server "$VAR/redis/redis.conf"
}

# ---------------------------------------------------------------- kafka

kafka_classpath() {
    local libs="$ROOT/infra/kafka/libs"
    [ -f "$libs/.complete" ] || die "Kafka jars missing in infra/kafka/libs: run infra/setup.sh"
    echo "$libs/*"
}

kafka_java() { # MAIN-CLASS ARGS...
    java -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" \
        -cp "$(kafka_classpath)" "$@"
}

# var/kafka/server.properties from the template, and var/kafka/admin.properties (the admin's
# login for Kafka's own tools); both 0600: they hold the admin's password.
kafka_config() {
    load_secrets
    mkdir -p "$KAFKA_DIR/data"
    (umask 077; sed -e "s#@KAFKA_DATA_DIR@#$KAFKA_DIR/data#g" -e "s#59092#$KAFKA_PORT#g" \
        -e "s#59093#$KAFKA_CONTROLLER_PORT#g" -e "s#@KAFKA_ADMIN_PASSWORD@#$KAFKA_ADMIN_PASSWORD#g" \
        "$ROOT/infra/kafka/server.properties" >"$KAFKA_DIR/server.properties.new")
    mv -f "$KAFKA_DIR/server.properties.new" "$KAFKA_DIR/server.properties"
    # for Kafka's own tools as the admin (docs/OPERATIONS.md): --command-config / --consumer.config
    (umask 077; printf '%s\n' "security.protocol=SASL_PLAINTEXT" "sasl.mechanism=SCRAM-SHA-512" \
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"llmbatch-admin\" password=\"$KAFKA_ADMIN_PASSWORD\";" \
        >"$KAFKA_DIR/admin.properties")
}

# Format the storage once, with the admin's SCRAM credentials (KRaft keeps users in its metadata;
# the other users are made by the admin at every `up`). A log formatted before Kafka had SASL
# has no admin: it is moved aside (not deleted) and the storage formatted anew.
kafka_format() {
    if [ -s "$KAFKA_DIR/data/meta.properties" ]; then
        [ -e "$KAFKA_DIR/sasl" ] && return 0
        local old="$KAFKA_DIR/data.pre-sasl.$(date +%s)"
        say kafka "log formatted without SASL users: moved to ${old#"$ROOT/"}, formatting anew"
        mv "$KAFKA_DIR/data" "$old"
        mkdir -p "$KAFKA_DIR/data"
    fi
    local cid
    if [ ! -s "$KAFKA_DIR/cluster.id" ]; then
        # a Kafka Uuid: 16 random bytes, base64url without padding, not starting with '-'
        cid=$(python3 -c 'import base64, os
while True:
    s = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not s.startswith("-"): print(s); break')
        echo "$cid" >"$KAFKA_DIR/cluster.id"
    fi
    cid=$(cat "$KAFKA_DIR/cluster.id")
    say kafka "formatting storage (cluster id $cid, SCRAM user llmbatch-admin)"
    # The password goes in a java @argfile (0600), never on a command line: ps would show it.
    # The launcher expands the file; the JVM's own command line shows only its name.
    local args="$KAFKA_DIR/format.args"
    (umask 077; printf '%s\n' "-cp" "\"$(kafka_classpath)\"" kafka.tools.StorageTool format \
        --cluster-id "$cid" --config "\"$KAFKA_DIR/server.properties\"" \
        --add-scram "SCRAM-SHA-512=[name=llmbatch-admin,password=$KAFKA_ADMIN_PASSWORD]" >"$args")
    java -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" "@$args" \
        >>"$(log_file kafka-format)" 2>&1 \
        || { rm -f "$args"; show_log_tail kafka-format; die "kafka storage format failed"; }
    rm -f "$args"
    touch "$KAFKA_DIR/sasl"
}

# One metadata request as the admin; exit 0 when the broker answers.
kafka_ready() {
    "$PY" -m pipeline.intake.kafka_admin ready >/dev/null 2>&1
}

# Topics, the pipeline's SCRAM users and their ACLs (pipeline/intake/kafka_admin.py), as the admin.
kafka_create_topics() {
    "$PY" -m pipeline.intake.kafka_admin setup
}

up_kafka() {
    need_venv
    command -v java >/dev/null || die "java not found (Java 17 is needed for Kafka)"
    kafka_classpath >/dev/null
    sv_state kafka
    if [ "$STATE" != RUNNING ]; then
        kafka_config
        kafka_format
    fi
    supervised_start kafka kafka_ready "${KAFKA_READY_TIMEOUT:-120}" || return 1
    local out
    if ! out=$(kafka_create_topics 2>&1); then
        say kafka "FAILED to create topics, users and ACLs: $out"
        return 1
    fi
    say kafka "topics: $(echo "$out" | paste -sd, | sed 's/,/, /g')"
}

exec_kafka() {
    exec java -Xms256m -Xmx768m -XX:+UseG1GC \
        -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" \
        -cp "$(kafka_classpath)" kafka.Kafka "$KAFKA_DIR/server.properties"
}

# ---------------------------------------------------------------- app processes

app_cmd() { # NAME -> the command line (one word a line)
    case $1 in
        simulator) printf '%s\n' "$VENV/bin/llmbatch" simulator --port $SIMULATOR_PORT ;;
        # INFO: the readiness line "batcher ready" is logged at INFO
        batcher) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO batcher ;;
        worker-*) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO worker --tier "${1#worker-}" ;;
        scheduler) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO scheduler ;;
        # the HTTP API (pipeline/api/); it registers the stack's first key (secrets file) at start
        api) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO api ;;
        flower) printf '%s\n' "$VENV/bin/celery" -A workers.app flower \
                    --address=127.0.0.1 --port=$FLOWER_PORT ;;
    esac
}

app_ready() { # NAME
    case $1 in
        simulator) echo "http_ok http://127.0.0.1:$SIMULATOR_PORT/healthz" ;;
        batcher) echo "log_has_since_start batcher 'batcher ready'" ;;
        worker-*) echo "log_has_since_start $1 'ready.'" ;;
        scheduler) echo "log_has_since_start scheduler 'scheduler ready'" ;;
        api) echo "http_ok http://127.0.0.1:$API_PORT/healthz" ;;
        flower) echo "port_open $FLOWER_PORT" ;;
    esac
}

up_app() {
    local name=$1
    need_venv
    local -a cmd
    mapfile -t cmd < <(app_cmd "$name")
    [ -x "${cmd[0]}" ] || die "${cmd[0]#"$ROOT/"} not found: run infra/setup.sh"
    supervised_start "$name" "$(app_ready "$name")"
}

exec_app() {
    local name=$1
    local -a cmd
    mapfile -t cmd < <(app_cmd "$name")
    if [ "$name" = flower ]; then
        # the generated credentials, from the environment, not the command line (ps would show it)
        load_secrets
        export FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD"
    fi
    exec "${cmd[@]}"
}

# What supervisord runs for NAME (every start and restart): the environment of the `up` that
# started it, the pid file and the restart counter, then the process itself in the foreground.
do_exec() {
    local name=$1 v
    valid_name "$name" || die "unknown process '$name'"
    ensure_dirs
    if [ -f "$ENV_DIR/$name.env" ]; then
        for v in $(compgen -e); do
            case $v in LLMBATCH_*|OPENAI_*|ANTHROPIC_*|TIKTOKEN_*) unset "$v" ;; esac
        done
        # shellcheck disable=SC1090
        source "$ENV_DIR/$name.env"
    fi
    export LLMBATCH_VAR_DIR="$VAR" LLMBATCH_PORT_OFFSET="$OFF" PYTHONUNBUFFERED=1
    echo $$ >"$(pid_file "$name")"
    echo $(($(starts_of "$name") + 1)) >"$RUN_DIR/$name.starts"
    stat -c %s "$(log_file "$name")" >"$RUN_DIR/$name.logpos" 2>/dev/null || echo 0 >"$RUN_DIR/$name.logpos"
    [ "$(starts_of "$name")" -gt 1 ] && echo "---- $(date -u +%FT%TZ) started again by the supervisor (restart $(($(starts_of "$name") - 1))) ----"
    cd "$ROOT" || exit 1
    case $name in
        postgres) exec_postgres ;;
        redis) exec_redis ;;
        kafka) exec_kafka ;;
        *) exec_app "$name" ;;
    esac
}

# ---------------------------------------------------------------- dispatch

valid_name() {
    local n
    for n in "${ALL[@]}"; do [ "$n" = "$1" ] && return 0; done
    return 1
}

# Order NAMEs as in ALL (or reversed), default: all of them.
ordered() { # up|down NAME...
    local dir=$1; shift
    local -a want=("$@") out=()
    local n w
    for w in "${want[@]}"; do valid_name "$w" || die "unknown process '$w' (one of: ${ALL[*]})"; done
    for n in "${ALL[@]}"; do
        if [ ${#want[@]} -eq 0 ]; then out+=("$n"); continue; fi
        for w in "${want[@]}"; do [ "$w" = "$n" ] && { out+=("$n"); break; }; done
    done
    if [ "$dir" = down ]; then
        local i
        for ((i = ${#out[@]} - 1; i >= 0; i--)); do echo "${out[$i]}"; done
    else
        printf '%s\n' "${out[@]}"
    fi
}

do_up() {
    ensure_secrets
    ensure_supervisor
    local n
    for n in "$@"; do
        case $n in
            postgres) up_postgres ;;
            redis) up_redis ;;
            kafka) up_kafka ;;
            *) up_app "$n" ;;
        esac || { echo "error: $n did not start; the stack is partly up ('infra/stack.sh down' stops it)" >&2; exit 1; }
    done
}

do_down() { # ALL_OF_IT NAME...
    local everything=$1; shift
    local n pid
    if sv answering 2>/dev/null; then
        sv stop "$@"
    fi
    # whatever runs outside the supervisor (a killed supervisord's orphans, an older stack)
    for n in "$@"; do
        if pid=$(read_pid "$n") && pid_alive "$pid" && pid_is_ours "$pid" "$(pid_file "$n")"; then
            stop_unsupervised "$n"
        elif ! sv answering 2>/dev/null; then
            rm -f "$(pid_file "$n")"
            say "$n" "already down"
        fi
    done
    if [ "$everything" = 1 ] && sv answering 2>/dev/null; then
        sv shutdown
    fi
}

do_kill() {
    local n i
    for n in "$@"; do
        sv_state "$n"
        if [[ $STATE != RUNNING && $STATE != STARTING && $STATE != STOPPING ]]; then
            kill_process "$n"   # not supervised (or not running): the plain way
            continue
        fi
        signal_tree KILL "$SPID"
        local pid=$SPID
        for i in $(seq 1 40); do
            sv_state "$n"
            [ "$SPID" != "$pid" ] && break
            sleep 0.25
        done
        say "$n" "killed (SIGKILL, pid $pid); the supervisor starts it again"
    done
}

do_status() {
    local -a specs=()
    local n
    for n in "$@"; do specs+=("$n=$(port_of "$n")"); done
    sv status "${specs[@]}"
}

main() {
    local action=${1:-}
    [ $# -gt 0 ] && shift
    local -a names
    case $action in
        up)
            mapfile -t names < <(ordered up "$@") || exit 1
            [ ${#names[@]} -gt 0 ] || exit 1
            do_up "${names[@]}" ;;
        down)
            mapfile -t names < <(ordered down "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            do_down "$([ $# -eq 0 ] && echo 1 || echo 0)" "${names[@]}" ;;
        status)
            mapfile -t names < <(ordered up "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            do_status "${names[@]}" ;;
        restart)
            [ $# -gt 0 ] || die "usage: infra/stack.sh restart NAME..."
            mapfile -t names < <(ordered down "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            do_down 0 "${names[@]}"
            mapfile -t names < <(ordered up "$@")
            do_up "${names[@]}" ;;
        kill)
            [ $# -gt 0 ] || die "usage: infra/stack.sh kill NAME..."
            mapfile -t names < <(ordered down "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            do_kill "${names[@]}" ;;
        secrets)
            ensure_secrets
            echo "${SECRETS_FILE#"$ROOT/"} (mode $(stat -c %a "$SECRETS_FILE"))" ;;
        exec)
            [ $# -eq 1 ] || die "usage: infra/stack.sh exec NAME (what supervisord runs)"
            do_exec "$1" ;;
        *)
            echo "usage: infra/stack.sh up|down|status|restart|kill [NAME...] | secrets" >&2
            echo "names: ${ALL[*]}" >&2
            exit 2 ;;
    esac
}

main "$@"
