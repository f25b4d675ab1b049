#!/usr/bin/env bash
# Pass-through benchmark: pgbench -S against direct PostgreSQL, spillway and (if
# installed) PgBouncer in session mode, in one run, alternating targets round by round
# so machine drift hits all of them alike. Prints tps per round, the median per target
# and the ratios. Starts a throwaway PostgreSQL and stops everything it started.
#
# Usage: loadtest/pgbench/compare.sh [-T seconds] [-c clients] [-r rounds] [-s scale]
#                                    [-M "simple prepared"]
# Env:   SPILLWAY_BIN (default: target/release/spillway, rebuilt first when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl; default: newest /usr/lib/postgresql/*/bin)
set -euo pipefail

DURATION=10 CLIENTS=8 ROUNDS=3 SCALE=10 MODES="simple prepared"
while getopts "T:c:r:s:M:h" opt; do
  case $opt in
    T) DURATION=$OPTARG ;; c) CLIENTS=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    s) SCALE=$OPTARG ;; M) MODES=$OPTARG ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
  esac
done
JOBS=$(( CLIENTS < 2 ? CLIENTS : 2 ))

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${SPILLWAY_BIN:-}" ]; then
  # Always (re)build: a stale binary would measure old code. A no-op when up to date.
  echo "building spillway (release)..." >&2
  (cd "$ROOT" && cargo build --release -p spillway >&2)
  SPILLWAY_BIN=$ROOT/target/release/spillway
fi
for tool in pgbench psql python3 bc; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
PG_BIN=${SPILLWAY_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PG_BIN/pg_ctl" ] || { echo "PostgreSQL server binaries not found (set SPILLWAY_PG_BIN)" >&2; exit 1; }

# PostgreSQL and PgBouncer refuse to run as root: run them as postgres then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/spillway-bench.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres: "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -f "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

PG_PORT=$(free_port)
as_pg "$PG_BIN/initdb" -D "$WORK/data" -U bench --auth=trust -N -E UTF8 --locale=C >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
max_connections = 100
shared_buffers = 256MB
synchronous_commit = off
CONF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w \
  -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null
echo "PostgreSQL on 127.0.0.1:$PG_PORT; pgbench -i -s $SCALE..." >&2
pgbench -h 127.0.0.1 -p "$PG_PORT" -U bench -i -q -s "$SCALE" postgres >/dev/null 2>&1

SW_PORT=$(free_port)
cat > "$WORK/spillway.toml" <<CONF
[server]
listen = "127.0.0.1:$SW_PORT"
[backend]
url = "postgres://bench@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
[journal]
dir = "$WORK/journal"
[log]
level = "warn"
CONF
"$SPILLWAY_BIN" run --config "$WORK/spillway.toml" 2>"$WORK/spillway.log" &
PIDS+=($!)
TARGETS="direct:$PG_PORT spillway:$SW_PORT"

if command -v pgbouncer >/dev/null; then
  PB_PORT=$(free_port)
  cat > "$WORK/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
CONF
  echo '"bench" ""' > "$WORK/userlist.txt"
  [ "$(id -u)" = 0 ] && chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
  # Daemonized with a pidfile: killing a runuser wrapper would orphan PgBouncer.
  as_pg pgbouncer -d -q "$WORK/pgbouncer.ini"
  TARGETS="$TARGETS pgbouncer:$PB_PORT"
else
  echo "pgbouncer not installed: comparing direct and spillway only" >&2
fi

for t in $TARGETS; do
  port=${t#*:}
  for _ in $(seq 50); do
    psql -X -q -h 127.0.0.1 -p "$port" -U bench -d postgres -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
done

run_pgbench() { # port mode [seconds] -> tps
  pgbench -h 127.0.0.1 -p "$1" -U bench -n -S -M "$2" -c "$CLIENTS" -j "$JOBS" -T "${3:-$DURATION}" postgres 2>/dev/null |
    awk '/^tps = / {print $3; exit}'
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

echo "pgbench -S, $CLIENTS clients, ${DURATION}s per run, $ROUNDS rounds, scale $SCALE, $(nproc) cores"
declare -A RESULTS
for mode in $MODES; do
  for t in $TARGETS; do run_pgbench "${t#*:}" "$mode" 2 >/dev/null; done # warm-up
  for r in $(seq "$ROUNDS"); do
    line="  $mode round $r:"
    for t in $TARGETS; do
      tps=$(run_pgbench "${t#*:}" "$mode")
      RESULTS[$mode/${t%%:*}]+="$tps "
      line="$line ${t%%:*}=$tps"
    done
    echo "$line"
  done
done

echo
printf "%-10s %-10s %12s\n" mode target "median tps"
for mode in $MODES; do
  for t in $TARGETS; do
    name=${t%%:*}
    m=$(echo "${RESULTS[$mode/$name]}" | tr ' ' '\n' | grep . | median)
    RESULTS[$mode/$name/median]=$m
    printf "%-10s %-10s %12s\n" "$mode" "$name" "$m"
  done
  sw=${RESULTS[$mode/spillway/median]}
  printf "%-10s spillway/direct    = %.2fx\n" "$mode" "$(echo "$sw / ${RESULTS[$mode/direct/median]}" | bc -l)"
  if [ -n "${RESULTS[$mode/pgbouncer/median]:-}" ]; then
    printf "%-10s spillway/pgbouncer = %.2fx\n" "$mode" "$(echo "$sw / ${RESULTS[$mode/pgbouncer/median]}" | bc -l)"
  fi
done
