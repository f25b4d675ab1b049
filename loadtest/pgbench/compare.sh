#!/usr/bin/env bash
# Pass-through benchmark (read cache off): pgbench -S against direct PostgreSQL, spillway and (if
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
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"

bench_init
start_postgres "$SCALE"
# Pass-through is what this script measures: the read cache stays off.
start_spillway spillway "[cache]
enabled = false"
TARGETS="direct:$PG_PORT spillway:$SW_PORT"
if start_pgbouncer; then
  TARGETS="$TARGETS pgbouncer:$PB_PORT"
else
  echo "pgbouncer not installed: comparing direct and spillway only" >&2
fi
wait_ready $(for t in $TARGETS; do echo "${t#*:}"; done)

run_pgbench() { # port mode [seconds] -> tps
  pgbench -h 127.0.0.1 -p "$1" -U bench -n -S -M "$2" -c "$CLIENTS" -j "$JOBS" -T "${3:-$DURATION}" postgres 2>/dev/null |
    awk '/^tps = / {print $3; exit}'
}

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
