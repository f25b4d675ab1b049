#!/usr/bin/env bash
# Connection storms (issue 18): a throwaway PostgreSQL, spillway in front of it with
# server.max_client_conn = LIMIT, then loadtest/storm.py: CONNECTIONS clients at once
# (each served or refused with 53300, nothing else), VANISH clients that go away
# mid-startup, and a fresh client served at the end; spillway's RSS before, at the
# peak and after. Prints storm.py's JSON; exits non-zero when a connection ended any
# other way or spillway stopped.
#
# Usage: loadtest/storm.sh [-n CONNECTIONS] [-l LIMIT] [-v VANISH]
# Env:   STORMS (default 1: storms one after the other), SETTLE (seconds before "after")
# Env:   SPILLWAY_BIN (default: target/release/spillway, rebuilt when not set)
set -euo pipefail
CONNECTIONS=5000 LIMIT=1000 VANISH=2000
while getopts "n:l:v:h" opt; do
  case $opt in
    n) CONNECTIONS=$OPTARG ;; l) LIMIT=$OPTARG ;; v) VANISH=$OPTARG ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
# Every served client holds a PostgreSQL backend (session mode).
export PG_MAX_CONNECTIONS=$((LIMIT + 20))
# The storm's sockets, spillway's two per session.
ulimit -n "$(( (CONNECTIONS + LIMIT) * 2 + 1024 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
bench_init
start_postgres 1 noinit
SERVER_EXTRA="max_client_conn = $LIMIT" start_spillway spillway
wait_ready "$SW_PORT"
SW_PID=${PIDS[-1]}
echo "spillway (pid $SW_PID) with max_client_conn = $LIMIT; $CONNECTIONS connections at once, $VANISH vanishing" >&2
python3 "$ROOT/loadtest/storm.py" --port "$SW_PORT" --connections "$CONNECTIONS" --settle "${SETTLE:-3}" --storms "${STORMS:-1}" \
  --vanish "$VANISH" --pid "$SW_PID"
kill -0 "$SW_PID" || { echo "spillway is not running any more" >&2; exit 1; }
