#!/usr/bin/env bash
# Idle clients in transaction mode (issue 16): the memory each idle client connection
# costs spillway and PgBouncer, on 127.0.0.1 only, bounded by the client count.
#
# A throwaway PostgreSQL; spillway with pool.mode = "transaction", pool.size = 20, the
# auth file's plain password (clients log in with SCRAM-SHA-256), the read cache on as
# by default; PgBouncer in transaction mode, auth_type = scram-sha-256 with the same
# auth file, default_pool_size = 20. loadtest/idle.py opens CLIENTS connections to
# each in turn (BATCH at a time, each logs in and runs SELECT 1 once, then stays idle)
# and reads the pooler's VmRSS before, every SAMPLE clients and at the end; one more
# client must then be served. Prints one JSON line per pooler and the bytes per idle
# client of each (spillway alone when PgBouncer is not installed).
#
# Usage: loadtest/idle.sh [-n CLIENTS] [-b BATCH]
# Env:   SPILLWAY_BIN (default: target/release/spillway, rebuilt when not set)
set -euo pipefail
CLIENTS=10000 BATCH=200
while getopts "n:b:h" opt; do
  case $opt in
    n) CLIENTS=$OPTARG ;; b) BATCH=$OPTARG ;; *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
# The clients' sockets and the poolers' (inherited by PgBouncer, which runs as postgres).
ulimit -n "$(( CLIENTS * 2 + 1024 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
bench_init
export PG_MAX_CONNECTIONS=100
start_postgres 1 noinit
echo '"bench" "bench-password"' > "$WORK/auth.txt"
SERVER_EXTRA="max_client_conn = $((CLIENTS + 100))" start_spillway spillway "[pool]
mode = \"transaction\"
size = 20
[auth]
file = \"$WORK/auth.txt\""
sw_pid=${PIDS[-1]}
POOLERS=spillway
if PB_POOL_MODE=transaction PB_MAX_CLIENTS=$((CLIENTS + 100)) PB_POOL_SIZE=20 start_pgbouncer; then
  POOLERS="spillway pgbouncer"
  # Clients log in to PgBouncer with SCRAM against the same plain password. Restarted
  # through setpriv rather than runuser, whose PAM session would reset the descriptor
  # limit to 1024 (and raising it afterwards needs CAP_SYS_RESOURCE).
  sed -i 's/^auth_type = trust/auth_type = scram-sha-256/' "$WORK/pgbouncer.ini"
  cp "$WORK/auth.txt" "$WORK/userlist.txt"
  for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
  pb_pid=$(cat "$WORK/pgbouncer.pid")
  kill "$pb_pid"
  while kill -0 "$pb_pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$WORK/pgbouncer.pid"
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer -d -q "$WORK/pgbouncer.ini"
  else
    pgbouncer -d -q "$WORK/pgbouncer.ini"
  fi
  for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
else
  echo "pgbouncer not installed (apt-get install pgbouncer): spillway alone" >&2
fi
export PGPASSWORD=bench-password
wait_ready "$SW_PORT" ${PB_PORT:+"$PB_PORT"}
echo "idle.sh: $CLIENTS idle clients each; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for who in $POOLERS; do
  if [ $who = spillway ]; then port=$SW_PORT pid=$sw_pid; else port=$PB_PORT pid=$(cat "$WORK/pgbouncer.pid"); fi
  out=$(python3 "$ROOT/loadtest/idle.py" --port "$port" --pid "$pid" --clients "$CLIENTS" --batch "$BATCH")
  echo "$who $out"
  echo "$who: $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["per_client_bytes"])' "$out") bytes per idle client" >&2
done
