#!/usr/bin/env bash
# Read-cache benchmark: pgbench -S against direct PostgreSQL, spillway with the cache
# on (after a warm-up that fills it) and spillway with the cache off (pass-through), in
# one run, alternating targets round by round. Reports median tps, median p50 latency
# (from pgbench's per-transaction log) and ratios; then a miss-only workload (every
# query a new key) through both spillways to show what a miss costs over pass-through.
#
# Usage: loadtest/pgbench/cache.sh [-T seconds] [-c clients] [-r rounds] [-s scale]
#                                  [-w warm-up seconds] [-M "simple prepared"]
# Env:   SPILLWAY_BIN (default: target/release/spillway, rebuilt first when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl; default: newest /usr/lib/postgresql/*/bin)
set -euo pipefail

DURATION=10 CLIENTS=8 ROUNDS=5 SCALE=1 WARMUP=20 MODES="simple prepared"
while getopts "T:c:r:s:w:M:h" opt; do
  case $opt in
    T) DURATION=$OPTARG ;; c) CLIENTS=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    s) SCALE=$OPTARG ;; w) WARMUP=$OPTARG ;; M) MODES=$OPTARG ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
JOBS=$(( CLIENTS < 2 ? CLIENTS : 2 ))
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"

bench_init
start_postgres "$SCALE"
start_spillway cached "[cache]
max_bytes = \"512MiB\"
ttl = \"1h\""
CACHED=$SW_PORT
start_spillway passthrough "[cache]
enabled = false"
PASS=$SW_PORT
TARGETS="direct:$PG_PORT cached:$CACHED passthrough:$PASS"
wait_ready "$PG_PORT" "$CACHED" "$PASS"

cat > "$WORK/miss.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set r random(1, 2000000000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid AND :r > 0;
SQL

run() { # port mode seconds [script] -> "tps p50_ms"
  local script=(-S)
  [ -n "${4:-}" ] && script=(-f "$4")
  rm -f "$WORK"/lat.*
  local tps
  tps=$(pgbench -h 127.0.0.1 -p "$1" -U bench -n "${script[@]}" -M "$2" -c "$CLIENTS" -j "$JOBS" \
      -T "$3" -l --sampling-rate=0.2 --log-prefix="$WORK/lat" postgres 2>/dev/null |
    awk '/^tps = / {print $3; exit}')
  local p50
  p50=$(cat "$WORK"/lat.* | awk '{print $3}' | median)
  echo "$tps $(echo "$p50 / 1000" | bc -l | xargs printf '%.3f')"
}

echo "pgbench -S, $CLIENTS clients, ${DURATION}s per run, $ROUNDS rounds, scale $SCALE, $(nproc) cores, warm-up ${WARMUP}s"
declare -A TPS P50
for mode in $MODES; do
  run "$CACHED" "$mode" "$WARMUP" >/dev/null
  run "$PG_PORT" "$mode" 2 >/dev/null
  run "$PASS" "$mode" 2 >/dev/null
  for r in $(seq "$ROUNDS"); do
    line="  $mode round $r:"
    for t in $TARGETS; do
      read -r tps p50 <<<"$(run "${t#*:}" "$mode" "$DURATION")"
      TPS[$mode/${t%%:*}]+="$tps "
      P50[$mode/${t%%:*}]+="$p50 "
      line="$line ${t%%:*}=$tps tps/${p50}ms"
    done
    echo "$line"
  done
  for r in $(seq "$ROUNDS"); do
    line="  $mode misses round $r:"
    for t in "cached:$CACHED" "passthrough:$PASS"; do
      read -r tps _ <<<"$(run "${t#*:}" "$mode" "$DURATION" "$WORK/miss.sql")"
      TPS[$mode/miss-${t%%:*}]+="$tps "
      line="$line ${t%%:*}=$tps tps"
    done
    echo "$line"
  done
done

med() { echo "$1" | tr ' ' '\n' | grep . | median; }
echo
printf "%-9s %-12s %12s %10s\n" mode target "median tps" "p50 ms"
for mode in $MODES; do
  for name in direct cached passthrough; do
    printf "%-9s %-12s %12s %10s\n" "$mode" "$name" "$(med "${TPS[$mode/$name]}")" "$(med "${P50[$mode/$name]}")"
  done
  d=$(med "${TPS[$mode/direct]}") c=$(med "${TPS[$mode/cached]}") p=$(med "${TPS[$mode/passthrough]}")
  mc=$(med "${TPS[$mode/miss-cached]}") mp=$(med "${TPS[$mode/miss-passthrough]}")
  echo "$mode: hits tps cached/direct = $(ratio "$c" "$d")x, cached/passthrough = $(ratio "$c" "$p")x," \
    "p50 cached/direct = $(ratio "$(med "${P50[$mode/cached]}")" "$(med "${P50[$mode/direct]}")")x;" \
    "misses tps cached/passthrough = $(ratio "$mc" "$mp")x"
done
