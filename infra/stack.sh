#!/usr/bin/env bash
# Local llmbatch stack without Docker: Postgres, Redis, Kafka (KRaft) and the
# app processes. All state lives under var/ at the repo root.
#
#   infra/stack.sh up [NAME...]       start (in order), skipping what is up
#   infra/stack.sh down [NAME...]     stop (in reverse order)
#   infra/stack.sh status [NAME...]   NAME  up|down  PORT
#   infra/stack.sh restart NAME...    down then up
#   infra/stack.sh kill NAME...       SIGKILL, as a crash would
#
# Names: postgres redis kafka simulator batcher worker-immediate worker-peak
# worker-offpeak worker-background scheduler flower. Run infra/setup.sh first.
set -uo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL=(postgres redis kafka simulator batcher
     worker-immediate worker-peak worker-offpeak worker-background scheduler flower)

# LLMBATCH_PORT_OFFSET shifts every port, so a second stack (with its own
# LLMBATCH_VAR_DIR) can run beside the first; pipeline/config.py applies the same shift.
OFF=${LLMBATCH_PORT_OFFSET:-0}
PG_PORT=$((55432 + OFF))
REDIS_PORT=$((56379 + OFF))
KAFKA_PORT=$((59092 + OFF))
KAFKA_CONTROLLER_PORT=$((59093 + OFF))
SIMULATOR_PORT=$((58080 + OFF))
FLOWER_PORT=$((5555 + OFF))
PG_USER=postgres            # the unprivileged system user that runs the server
PGDATA="$VAR/pgdata"
PG_SOCKET_DIR="$VAR/pgsocket"
KAFKA_DIR="$VAR/kafka"
KAFKA_TOPICS="llm.requests:6 llm.requests.immediate:2 llm.requests.dlq:1"

port_of() {
    case $1 in
        postgres) echo $PG_PORT ;;
        redis) echo $REDIS_PORT ;;
        kafka) echo $KAFKA_PORT ;;
        simulator) echo $SIMULATOR_PORT ;;
        flower) echo $FLOWER_PORT ;;
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

# ---------------------------------------------------------------- postgres

# As root, run as the unprivileged server user; otherwise as ourselves.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

pg_psql() { # SQL  (as superuser postgres over TCP; trust auth on 127.0.0.1)
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PG_PORT -U postgres -d postgres -tAc "$1"
}

pg_prepare_dirs() {
    [ "$(id -u)" = 0 ] || PG_USER=$(id -un)
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
    touch "$(log_file postgres)"
    chown "$PG_USER": "$(log_file postgres)"
}

pg_initdb() {
    local bin=$1
    [ -s "$PGDATA/PG_VERSION" ] && return 0
    say postgres "initdb (first run) in ${PGDATA#"$ROOT/"}"
    as_pg "$bin/initdb" -D "$PGDATA" -U postgres -E UTF8 --no-locale \
        --auth-local=trust --auth-host=trust >>"$(log_file postgres)" 2>&1 \
        || { show_log_tail postgres; die "initdb failed"; }
    cat >>"$PGDATA/postgresql.conf" <<EOF

# ---- llmbatch (infra/stack.sh) ----
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 200
shared_buffers = 256MB
EOF
}

pg_bootstrap_db() {
    pg_psql "select 1 from pg_roles where rolname = 'llmbatch'" | grep -q 1 \
        || pg_psql "create role llmbatch login" || return 1
    pg_psql "select 1 from pg_database where datname = 'llmbatch'" | grep -q 1 \
        || pg_psql "create database llmbatch owner llmbatch" || return 1
    # the read-only role of `llmbatch sql` (grants: sql/004_views.sql)
    pg_psql "select 1 from pg_roles where rolname = 'llmbatch_reader'" | grep -q 1 \
        || pg_psql "create role llmbatch_reader login; alter role llmbatch_reader set default_transaction_read_only = on" \
        || return 1
}

pg_migrate() {
    need_venv
    [ -x "$VENV/bin/llmbatch" ] || die "no .venv/bin/llmbatch: run 'make setup' (infra/setup.sh)"
    if ! (cd "$ROOT" && "$VENV/bin/llmbatch" db upgrade) >>"$(log_file postgres-migrate)" 2>&1; then
        show_log_tail postgres-migrate
        die "'llmbatch db upgrade' failed (log: var/log/postgres-migrate.log)"
    fi
    say postgres "migrations applied (llmbatch db upgrade)"
}

up_postgres() {
    if is_up postgres; then
        say postgres "already up (pid $(read_pid postgres), port $PG_PORT), unchanged"
        # idempotent: an earlier `up` may have stopped between the start and the migrations
        pg_bootstrap_db && pg_migrate
        return 0
    fi
    local bin
    bin=$(pg_bindir) || die "PostgreSQL server not installed: run infra/setup.sh"
    ensure_dirs
    pg_prepare_dirs
    pg_initdb "$bin"
    if as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        # running, but its pid file in var/run was lost
        head -n1 "$PGDATA/postmaster.pid" >"$(pid_file postgres)"
        say postgres "already up (pid $(read_pid postgres), port $PG_PORT), unchanged"
        pg_bootstrap_db && pg_migrate
        return 0
    fi
    if port_taken postgres; then
        die "port $PG_PORT is taken by a process that is not this stack's postgres"
    fi
    local started
    started=$(date +%s)
    if ! as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$(log_file postgres)" -o "-p $PG_PORT" -w -t 60 start >/dev/null 2>&1; then
        say postgres "FAILED to start"
        show_log_tail postgres
        return 1
    fi
    head -n1 "$PGDATA/postmaster.pid" >"$(pid_file postgres)"
    pg_bootstrap_db || { say postgres "FAILED to create role/database llmbatch"; return 1; }
    say postgres "started (pid $(read_pid postgres), port $PG_PORT) in $(($(date +%s) - started)) s"
    pg_migrate
}

down_postgres() {
    local bin
    if ! is_up postgres && [ -s "$PGDATA/postmaster.pid" ] && bin=$(pg_bindir) \
            && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        head -n1 "$PGDATA/postmaster.pid" >"$(pid_file postgres)"   # pid file was lost
    fi
    if ! is_up postgres; then
        rm -f "$(pid_file postgres)"
        say postgres "already down"
        return 0
    fi
    bin=$(pg_bindir) || die "PostgreSQL server not installed"
    local pid
    pid=$(read_pid postgres)
    if as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1; then
        say postgres "stopped (pid $pid)"
    else
        kill -KILL "$pid" 2>/dev/null
        say postgres "killed (pg_ctl stop failed, pid $pid)"
    fi
    rm -f "$(pid_file postgres)"
}

# ---------------------------------------------------------------- redis

up_redis() {
    if is_up redis; then
        say redis "already up (pid $(read_pid redis), port $REDIS_PORT), unchanged"
        return 0
    fi
    command -v redis-server >/dev/null || die "redis-server not installed: run infra/setup.sh"
    if port_taken redis; then
        die "port $REDIS_PORT is taken by a process that is not this stack's redis"
    fi
    ensure_dirs
    mkdir -p "$VAR/redis"
    rm -f "$(pid_file redis)"
    local started
    started=$(date +%s)
    if ! redis-server "$ROOT/infra/redis.conf" --port $REDIS_PORT --dir "$VAR/redis" \
            --pidfile "$(pid_file redis)" --logfile "$(log_file redis)" >/dev/null 2>&1; then
        say redis "FAILED to start"; show_log_tail redis; return 1
    fi
    local i
    for i in $(seq 1 120); do
        if [ "$(redis-cli -h 127.0.0.1 -p $REDIS_PORT ping 2>/dev/null)" = PONG ] && is_up redis; then
            say redis "started (pid $(read_pid redis), port $REDIS_PORT) in $(($(date +%s) - started)) s"
            return 0
        fi
        sleep 0.25
    done
    say redis "FAILED: no PONG within 30 s"; show_log_tail redis; return 1
}

down_redis() {
    if ! is_up redis; then
        rm -f "$(pid_file redis)"; say redis "already down"; return 0
    fi
    local pid
    pid=$(read_pid redis)
    # SHUTDOWN writes the AOF/RDB and removes the pid file
    redis-cli -h 127.0.0.1 -p $REDIS_PORT shutdown >/dev/null 2>&1 || true
    local i=0
    while pid_alive "$pid" && [ $i -lt 80 ]; do sleep 0.25; i=$((i + 1)); done
    if pid_alive "$pid"; then stop_process redis; return; fi
    rm -f "$(pid_file redis)"
    say redis "stopped (pid $pid)"
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

kafka_config() {
    mkdir -p "$KAFKA_DIR/data"
    sed -e "s#@KAFKA_DATA_DIR@#$KAFKA_DIR/data#g" -e "s#59092#$KAFKA_PORT#g" \
        -e "s#59093#$KAFKA_CONTROLLER_PORT#g" "$ROOT/infra/kafka/server.properties" \
        >"$KAFKA_DIR/server.properties.new"
    mv -f "$KAFKA_DIR/server.properties.new" "$KAFKA_DIR/server.properties"
}

kafka_format() {
    [ -s "$KAFKA_DIR/data/meta.properties" ] && return 0
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
    say kafka "formatting storage (cluster id $cid)"
    rotate_log kafka
    kafka_java kafka.tools.StorageTool format --cluster-id "$cid" \
        --config "$KAFKA_DIR/server.properties" >>"$(log_file kafka)" 2>&1 \
        || { show_log_tail kafka; die "kafka storage format failed"; }
}

# One metadata request through librdkafka; exit 0 when the broker answers.
KAFKA_READY_PY='
import sys
from confluent_kafka.admin import AdminClient
md = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0}).list_topics(timeout=2)
sys.exit(0 if md.brokers else 1)
'

kafka_ready() {
    "$PY" -c "$KAFKA_READY_PY" "127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1
}

kafka_create_topics() {
    "$PY" - "127.0.0.1:$KAFKA_PORT" $KAFKA_TOPICS <<'EOF'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0})
existing = admin.list_topics(timeout=10).topics
wanted = dict(t.split(":") for t in sys.argv[2:])
new = [NewTopic(name, num_partitions=int(n), replication_factor=1)
       for name, n in wanted.items() if name not in existing]
for name, fut in (admin.create_topics(new, operation_timeout=30) if new else {}).items():
    try:
        fut.result(timeout=30)
        print(f"created topic {name}")
    except Exception as e:  # a concurrent creator is fine
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            sys.exit(f"cannot create topic {name}: {e}")
for name in wanted:
    if name in existing:
        print(f"topic {name} exists")
EOF
}

up_kafka() {
    need_venv
    if is_up kafka; then
        say kafka "already up (pid $(read_pid kafka), port $KAFKA_PORT), unchanged"
        return 0
    fi
    command -v java >/dev/null || die "java not found (Java 17 is needed for Kafka)"
    if port_taken kafka; then
        die "port $KAFKA_PORT is taken by a process that is not this stack's kafka"
    fi
    kafka_classpath >/dev/null
    ensure_dirs
    kafka_config
    kafka_format
    READY_TIMEOUT=${KAFKA_READY_TIMEOUT:-60} start_process kafka kafka_ready \
        java -Xms256m -Xmx768m -XX:+UseG1GC \
        -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" \
        -cp "$(kafka_classpath)" kafka.Kafka "$KAFKA_DIR/server.properties" || return 1
    local out
    if ! out=$(kafka_create_topics 2>&1); then
        say kafka "FAILED to create topics: $out"
        return 1
    fi
    say kafka "topics: $(echo "$out" | paste -sd, | sed 's/,/, /g')"
}

down_kafka() { stop_process kafka 30; }

# ---------------------------------------------------------------- app processes

app_cmd() { # NAME -> the command line (one word a line)
    case $1 in
        simulator) printf '%s\n' "$VENV/bin/llmbatch" simulator --port $SIMULATOR_PORT ;;
        # INFO: the readiness line "batcher ready" is logged at INFO
        batcher) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO batcher ;;
        worker-*) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO worker --tier "${1#worker-}" ;;
        scheduler) printf '%s\n' "$VENV/bin/llmbatch" --log-level INFO scheduler ;;
        flower) printf '%s\n' "$VENV/bin/celery" -A workers.app flower \
                    --address=127.0.0.1 --port=$FLOWER_PORT ;;
    esac
}

app_ready() { # NAME
    case $1 in
        simulator) echo "http_ok http://127.0.0.1:$SIMULATOR_PORT/healthz" ;;
        batcher) echo "[ \$(( \$(date +%s) - started )) -ge 2 ] && log_has batcher 'batcher ready'" ;;
        worker-*) echo "log_has $1 'ready.'" ;;
        scheduler) echo "log_has scheduler 'scheduler ready'" ;;
        flower) echo "port_open $FLOWER_PORT" ;;
    esac
}

up_app() {
    local name=$1
    need_venv
    if ! is_up "$name" && port_taken "$name"; then
        die "port $(port_of "$name") is taken by a process that is not this stack's $name"
    fi
    local -a cmd
    mapfile -t cmd < <(app_cmd "$name")
    [ -x "${cmd[0]}" ] || die "${cmd[0]#"$ROOT/"} not found: run infra/setup.sh"
    if [ "$name" = flower ]; then
        # from the environment, not the command line (ps would show it)
        export FLOWER_BASIC_AUTH="${LLMBATCH_FLOWER_USER:-admin}:${LLMBATCH_FLOWER_PASSWORD:-llmbatch}"
    fi
    start_process "$name" "$(app_ready "$name")" "${cmd[@]}"
    local rc=$?
    unset FLOWER_BASIC_AUTH
    return $rc
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

do_down() {
    local n
    for n in "$@"; do
        case $n in
            postgres) down_postgres ;;
            redis) down_redis ;;
            kafka) down_kafka ;;
            *) stop_process "$n" 20 ;;
        esac
    done
}

do_status() {
    local n state
    for n in "$@"; do
        if is_up "$n"; then state=up; else state=down; fi
        printf '%-18s %-5s %s\n' "$n" "$state" "$(port_of "$n")"
    done
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
            do_down "${names[@]}" ;;
        status)
            mapfile -t names < <(ordered up "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            do_status "${names[@]}" ;;
        restart)
            [ $# -gt 0 ] || die "usage: infra/stack.sh restart NAME..."
            mapfile -t names < <(ordered down "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            do_down "${names[@]}"
            mapfile -t names < <(ordered up "$@")
            do_up "${names[@]}" ;;
        kill)
            [ $# -gt 0 ] || die "usage: infra/stack.sh kill NAME..."
            mapfile -t names < <(ordered down "$@")
            [ ${#names[@]} -gt 0 ] || exit 1
            for n in "${names[@]}"; do kill_process "$n"; done ;;
        *)
            echo "usage: infra/stack.sh up|down|status|restart|kill [NAME...]" >&2
            echo "names: ${ALL[*]}" >&2
            exit 2 ;;
    esac
}

main "$@"
