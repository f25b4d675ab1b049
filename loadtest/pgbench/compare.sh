#!/usr/bin/env bash
# pgbench against direct PostgreSQL, spillway and (if installed) PgBouncer in session
# mode, in one run, alternating targets round by round so machine drift hits all of
# them alike. Prints tps per round, the median per target and the ratios. Starts a
# throwaway PostgreSQL and stops everything it started.
#
# Without -S: pgbench -S (select-only) with spillway's read cache off (pass-through).
# With -S: the spillway-loadtest scenarios as pgbench scripts (pgbench/scenarios/),
# spillway with its default config (cache on) plus the table config the scenarios
# expect (loadtest/config/), or without it if this spillway build refuses it.
#
# -L RTT puts PostgreSQL behind `spillway-loadtest link` adding that round trip (e.g.
# 1ms): pgbench's direct connections, spillway's and PgBouncer's all go through it.
#
# Usage: loadtest/pgbench/compare.sh [-T seconds] [-c clients] [-r rounds] [-s scale]
#                                    [-M "simple prepared"] [-S "scenario ..." | -S all]
#                                    [-L rtt]
# Env:   SPILLWAY_BIN (default: target/release/spillway, rebuilt first when not set)
#        LOADTEST_BIN (for -L; default: target/release/spillway-loadtest, rebuilt)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl; default: newest /usr/lib/postgresql/*/bin)
set -euo pipefail

DURATION=10 CLIENTS=8 ROUNDS=3 SCALE=10 MODES="simple prepared" SCENARIOS="" RTT=""
while getopts "T:c:r:s:M:S:L:h" opt; do
  case $opt in
    T) DURATION=$OPTARG ;; c) CLIENTS=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    s) SCALE=$OPTARG ;; M) MODES=$OPTARG ;; S) SCENARIOS=$OPTARG ;; L) RTT=$OPTARG ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
  esac
done
JOBS=$(( CLIENTS < 2 ? CLIENTS : 2 ))

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"

[ "$SCENARIOS" = all ] && SCENARIOS=$SCENARIOS_ALL
for s in $SCENARIOS; do
  scenario_group "$s" >/dev/null || { echo "unknown scenario $s; known: $SCENARIOS_ALL" >&2; exit 2; }
done

bench_init
if [ -z "$SCENARIOS" ]; then
  start_postgres "$SCALE"
  if [ -n "$RTT" ]; then start_link "$RTT"; fi
  # Pass-through is what pgbench -S measures here: the read cache stays off.
  start_spillway spillway "[cache]
enabled = false"
  WORKLOADS="select-only"
else
  start_postgres "$SCALE" noinit
  # shellcheck disable=SC2086 # a list of names
  setup_scenarios "$SCALE" $SCENARIOS
  if [ -n "$RTT" ]; then start_link "$RTT"; fi
  # shellcheck disable=SC2086
  TABLES=$(scenario_tables_toml $SCENARIOS)
  printf '[backend]\nurl = "postgres://bench@127.0.0.1:%s/postgres"\n%s\n' "$PG_PORT" "$TABLES" > "$WORK/check.toml"
  if ! "$SPILLWAY_BIN" check-config --config "$WORK/check.toml" >"$WORK/check.log" 2>&1; then
    echo "this spillway refuses the scenarios' table config ($(tail -1 "$WORK/check.log"));" \
      "running every table write-through with the cache on" >&2
    TABLES=""
  fi
  start_spillway spillway "$TABLES"
  WORKLOADS=$SCENARIOS
fi
TARGETS="direct:${UPSTREAM_PORT:-$PG_PORT} spillway:$SW_PORT"
if start_pgbouncer; then
  TARGETS="$TARGETS pgbouncer:$PB_PORT"
else
  echo "pgbouncer not installed: comparing direct and spillway only" >&2
fi
wait_ready $(for t in $TARGETS; do echo "${t#*:}"; done)

run_pgbench() { # port mode seconds workload -> tps
  local script=(-S)
  [ "$4" != select-only ] && script=(-f "$ROOT/loadtest/pgbench/scenarios/$4.sql" -D scale="$SCALE" -D clients="$CLIENTS")
  pgbench -h 127.0.0.1 -p "$1" -U bench -n "${script[@]}" -M "$2" -c "$CLIENTS" -j "$JOBS" -T "$3" postgres 2>/dev/null |
    awk '/^tps = / {print $3; exit}'
}

echo "pgbench, $CLIENTS clients, ${DURATION}s per run, $ROUNDS rounds, scale $SCALE, $(nproc) cores${RTT:+, PostgreSQL behind a $RTT round trip}, load average $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A RESULTS
for w in $WORKLOADS; do
  for mode in $MODES; do
    for t in $TARGETS; do run_pgbench "${t#*:}" "$mode" 2 "$w" >/dev/null; done # warm-up
    for r in $(seq "$ROUNDS"); do
      line="  $w $mode round $r:"
      for t in $TARGETS; do
        tps=$(run_pgbench "${t#*:}" "$mode" "$DURATION" "$w")
        RESULTS[$w/$mode/${t%%:*}]+="${tps:-0} "
        line="$line ${t%%:*}=${tps:-failed}"
      done
      echo "$line"
    done
  done
done

echo
printf "%-14s %-10s %-10s %12s\n" workload mode target "median tps"
for w in $WORKLOADS; do
  for mode in $MODES; do
    for t in $TARGETS; do
      name=${t%%:*}
      m=$(echo "${RESULTS[$w/$mode/$name]}" | tr ' ' '\n' | grep . | median)
      RESULTS[$w/$mode/$name/median]=$m
      printf "%-14s %-10s %-10s %12s\n" "$w" "$mode" "$name" "$m"
    done
  done
done
echo
for w in $WORKLOADS; do
  for mode in $MODES; do
    sw=${RESULTS[$w/$mode/spillway/median]} d=${RESULTS[$w/$mode/direct/median]}
    line=$(printf "%-14s %-10s spillway/direct = %sx" "$w" "$mode" "$(ratio "$sw" "$d")")
    if [ -n "${RESULTS[$w/$mode/pgbouncer/median]:-}" ]; then
      line="$line, spillway/pgbouncer = $(ratio "$sw" "${RESULTS[$w/$mode/pgbouncer/median]}")x"
    fi
    echo "$line"
  done
done
