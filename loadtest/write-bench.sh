#!/usr/bin/env bash
# The deferred-write benchmarks (issues 4 and 5): spillway-loadtest's write scenarios
# against PostgreSQL directly and through spillway with the tables' deferred policies
# (loadtest/config/), in one run, alternating targets round by round. spillway's
# journal runs with fsync = "always" (its default): a write is acknowledged once it
# is on disk. PostgreSQL keeps synchronous_commit = on (its default) so that both
# sides acknowledge durable writes; -F measures against synchronous_commit = off too.
# The report includes spillway's /metrics deltas: upstream statements per client
# write, flush batches and rows (the flush worker's apply rate).
#
# -J interval runs the journal with fsync = "interval" (a bounded loss window: compare
# it with -F, where PostgreSQL does not wait for its disk either); -A gives the
# write-behind tables row_counts = "assumed" (no point reads; for keys the
# application knows are new, such as client-generated ids).
#
# Usage: loadtest/write-bench.sh [-d duration] [-w warmup] [-r rounds] [-c clients]
#                                [-m mode] [-S "scenario ..."] [-F] [-J fsync] [-A]
# Env:   SPILLWAY_BIN, LOADTEST_BIN (default: target/release/…, rebuilt when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl)
# Writes loadtest-results/ as spillway-loadtest does; prints each report.
set -euo pipefail

DURATION=5s WARMUP=3s ROUNDS=3 CLIENTS=8 MODE=prepared FAST=0 FSYNC=always ASSUMED=0
SCENARIOS="write-update write-insert hot-counters orm-tx"
while getopts "d:w:r:c:m:S:FJ:Ah" opt; do
  case $opt in
    d) DURATION=$OPTARG ;; w) WARMUP=$OPTARG ;; r) ROUNDS=$OPTARG ;; c) CLIENTS=$OPTARG ;;
    m) MODE=$OPTARG ;; S) SCENARIOS=$OPTARG ;; F) FAST=1 ;;
    J) FSYNC=$OPTARG ;; A) ASSUMED=1 ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
for s in $SCENARIOS; do
  scenario_group "$s" >/dev/null || { echo "unknown scenario $s; known: $SCENARIOS_ALL" >&2; exit 2; }
done
if [ -z "${LOADTEST_BIN:-}" ]; then
  echo "building spillway-loadtest (release)..." >&2
  (cd "$ROOT" && cargo build --release -p spillway-loadtest >&2)
  LOADTEST_BIN=$ROOT/target/release/spillway-loadtest
fi

bench_init
[ "$FAST" = 1 ] || DURABLE=1
start_postgres 1 noinit
DIRECT="postgres://bench@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
# shellcheck disable=SC2086 # a list of names
"$LOADTEST_BIN" setup --target "$DIRECT" --scale 1 $(for s in $SCENARIOS; do printf -- '-s %s ' "$s"; done) >&2
JOURNAL_EXTRA="fsync = \"$FSYNC\""
# shellcheck disable=SC2086
TABLES_TOML=$(scenario_tables_toml $SCENARIOS)
if [ "$ASSUMED" = 1 ]; then
  TABLES_TOML=$(printf '%s\n' "$TABLES_TOML" | sed '/^policy = "write-behind"/a row_counts = "assumed"')
fi
start_spillway spillway "$TABLES_TOML"
wait_ready "$SW_PORT"
SPILLWAY="postgres://bench@127.0.0.1:$SW_PORT/postgres"
echo "PostgreSQL synchronous_commit = $([ "$FAST" = 1 ] && echo off || echo on);" \
  "spillway journal.fsync = $FSYNC$([ "$ASSUMED" = 1 ] && echo ', write-behind row_counts = assumed'); $CLIENTS clients, $ROUNDS rounds of $DURATION, mode $MODE" >&2

for s in $SCENARIOS; do
  "$LOADTEST_BIN" run --scenario "$s" --target direct="$DIRECT" --target spillway="$SPILLWAY" \
    --metrics spillway="$SW_METRICS" --clients "$CLIENTS" --rounds "$ROUNDS" \
    --duration "$DURATION" --warmup "$WARMUP" --mode "$MODE" --seed 1
done
