#!/usr/bin/env bash
# Write-behind with the NATS JetStream journal (issue 17) against the local journal and
# against PostgreSQL directly, in one spillway-loadtest run with alternating targets,
# on 127.0.0.1 only, bounded in time.
#
# A throwaway PostgreSQL (synchronous_commit = on: both sides acknowledge durable
# writes) with one copy of the scenario tables per target (databases postgres, local,
# nats1, nats3), a three-node nats-server cluster with JetStream (each node's store in
# the run's directory), and three spillway instances, one per copy: `local` (the local
# journal, fsync = "always"), `nats1` (journal.backend = "nats", replicas = 1) and
# `nats3` (replicas = 3: acknowledged once two of the three nodes stored the record).
# The report gives each target's throughput, p50/p99 and ratio to direct; spillway's
# /metrics deltas per instance.
#
# -L RTT puts PostgreSQL behind `spillway-loadtest link` for every path (the NATS
# nodes stay on loopback: they model a journal next to the application). -R follows
# the change stream (the key index: no point read per write to an unknown key).
#
# Usage: loadtest/nats-bench.sh [-d duration] [-w warmup] [-r rounds] [-c clients]
#                               [-m mode] [-S "scenario ..."] [-L rtt] [-R]
# Env:   SPILLWAY_BIN, LOADTEST_BIN (default: target/release/…, rebuilt when not set)
# Needs nats-server (apt-get install nats-server).
set -euo pipefail
DURATION=5s WARMUP=3s ROUNDS=3 CLIENTS=8 MODE=prepared RTT=""
SCENARIOS="write-update write-insert orm-tx"
while getopts "d:w:r:c:m:S:L:Rh" opt; do
  case $opt in
    d) DURATION=$OPTARG ;; w) WARMUP=$OPTARG ;; r) ROUNDS=$OPTARG ;; c) CLIENTS=$OPTARG ;;
    m) MODE=$OPTARG ;; S) SCENARIOS=$OPTARG ;; L) RTT=$OPTARG ;;
    R) INVALIDATION=replication; CACHE_TTL=${CACHE_TTL:-1h} ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$NATS" ] || { echo "nats-server not found (apt-get install nats-server)" >&2; exit 1; }
for s in $SCENARIOS; do
  scenario_group "$s" >/dev/null || { echo "unknown scenario $s; known: $SCENARIOS_ALL" >&2; exit 2; }
done
need_loadtest
bench_init
DURABLE=1 start_postgres 1 noinit
DBS="postgres local nats1 nats3"
for db in $DBS; do
  [ "$db" = postgres ] || psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U bench -d postgres -c "CREATE DATABASE $db"
  # shellcheck disable=SC2046 # a list of flags
  "$LOADTEST_BIN" setup --target "postgres://bench@127.0.0.1:$PG_PORT/$db?sslmode=disable" \
    --scale 1 --config-out "$WORK/tables.toml" $(for s in $SCENARIOS; do printf -- '-s %s ' "$s"; done) >&2
done
if [ -n "$RTT" ]; then start_link "$RTT"; fi

# Three clustered nodes, as the integration tests start them.
declare -a NATS_CLIENT NATS_ROUTE
for i in 0 1 2; do NATS_CLIENT[i]=$(free_port); NATS_ROUTE[i]=$(free_port); done
routes=$(for i in 0 1 2; do printf '"nats-route://127.0.0.1:%s", ' "${NATS_ROUTE[i]}"; done)
for i in 0 1 2; do
  cat > "$WORK/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:${NATS_CLIENT[i]}"
jetstream { store_dir: "$WORK/nats-n$i" }
cluster { name: spillway-bench
  listen: "127.0.0.1:${NATS_ROUTE[i]}"
  no_advertise: true
  routes: [${routes%, }] }
CONF
  "$NATS" -c "$WORK/n$i.conf" 2>"$WORK/n$i.log" &
  PIDS+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/${NATS_CLIENT[i]}") 2>/dev/null && break
    sleep 0.1
  done
done
servers=$(for i in 0 1 2; do printf '"nats://127.0.0.1:%s", ' "${NATS_CLIENT[i]}"; done)
nats_journal() { # replicas stream
  printf 'backend = "nats"\n[journal.nats]\nservers = [%s]\nreplicas = %s\nstream = "%s"\n' \
    "${servers%, }" "$1" "$2"
}

# shellcheck disable=SC2086 # a list of names
TABLES_TOML=$(scenario_tables_toml $SCENARIOS)
SW_DB=local JOURNAL_EXTRA='fsync = "always"' start_spillway local "$TABLES_TOML"
LOCAL_PORT=$SW_PORT LOCAL_METRICS=$SW_METRICS
SW_DB=nats1 JOURNAL_EXTRA=$(nats_journal 1 bench_r1) start_spillway nats1 "$TABLES_TOML"
N1_PORT=$SW_PORT N1_METRICS=$SW_METRICS
SW_DB=nats3 JOURNAL_EXTRA=$(nats_journal 3 bench_r3) start_spillway nats3 "$TABLES_TOML"
N3_PORT=$SW_PORT N3_METRICS=$SW_METRICS
for port in "$LOCAL_PORT" "$N1_PORT" "$N3_PORT"; do
  for _ in $(seq 100); do
    psql -X -q -h 127.0.0.1 -p "$port" -U bench -d postgres -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
done
DIRECT="postgres://bench@127.0.0.1:${UPSTREAM_PORT:-$PG_PORT}/postgres?sslmode=disable"
echo "nats-bench: $CLIENTS clients, $ROUNDS rounds of $DURATION, mode $MODE${RTT:+, PostgreSQL behind a $RTT round trip}${INVALIDATION:+, change stream};" \
  "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
# shellcheck disable=SC2046 # a list of flags
"$LOADTEST_BIN" run $(for s in $SCENARIOS; do printf -- '--scenario %s ' "$s"; done) \
  --target direct="$DIRECT" \
  --target local="postgres://bench@127.0.0.1:$LOCAL_PORT/local" \
  --target nats-r1="postgres://bench@127.0.0.1:$N1_PORT/nats1" \
  --target nats-r3="postgres://bench@127.0.0.1:$N3_PORT/nats3" \
  --metrics local="$LOCAL_METRICS" --metrics nats-r1="$N1_METRICS" --metrics nats-r3="$N3_METRICS" \
  --clients "$CLIENTS" --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP" \
  --mode "$MODE" --seed 1 --pg-pid "$(head -1 "$WORK/data/postmaster.pid")"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
