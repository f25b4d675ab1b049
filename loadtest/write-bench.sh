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
# -L RTT puts PostgreSQL behind `spillway-loadtest link` adding that round trip (e.g.
# 1ms) for both paths: client -> link -> PostgreSQL against client -> spillway -> link
# -> PostgreSQL (spillway's service, check and flush connections go through it too).
# Every report gives PostgreSQL's CPU time per client operation for both targets
# (spillway-loadtest --pg-pid): what spillway spares the database.
#
# -J interval runs the journal with fsync = "interval" (a bounded loss window: compare
# it with -F, where PostgreSQL does not wait for its disk either); -A gives the
# write-behind tables row_counts = "assumed" (no point reads; for keys the
# application knows are new, such as client-generated ids).
#
# -R runs spillway with cache.invalidation = "replication" (PostgreSQL with wal_level =
# logical; the environment variable INVALIDATION=replication does the same for the
# other scripts using pgbench/lib.sh). With the change stream an entry is dropped when
# its row changes, whoever changes it, so the TTL no longer bounds staleness, only how
# long an unread entry stays: -R sets cache.ttl = "1h" (CACHE_TTL overrides it) so that
# a warm cache is not emptied by the default 60 s TTL between alternating rounds.
#
# Usage: loadtest/write-bench.sh [-d duration] [-w warmup] [-r rounds] [-c clients]
#                                [-m mode] [-S "scenario ..."] [-F] [-J fsync] [-A] [-L rtt] [-R]
# Env:   SPILLWAY_BIN, LOADTEST_BIN (default: target/release/…, rebuilt when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl)
# Writes loadtest-results/ as spillway-loadtest does; prints each report.
set -euo pipefail

DURATION=5s WARMUP=3s ROUNDS=3 CLIENTS=8 MODE=prepared FAST=0 FSYNC=always ASSUMED=0 RTT=""
SCENARIOS="write-update write-insert hot-counters orm-tx"
while getopts "d:w:r:c:m:S:FJ:AL:Rh" opt; do
  case $opt in
    d) DURATION=$OPTARG ;; w) WARMUP=$OPTARG ;; r) ROUNDS=$OPTARG ;; c) CLIENTS=$OPTARG ;;
    m) MODE=$OPTARG ;; S) SCENARIOS=$OPTARG ;; F) FAST=1 ;;
    J) FSYNC=$OPTARG ;; A) ASSUMED=1 ;; L) RTT=$OPTARG ;; R) INVALIDATION=replication; CACHE_TTL=${CACHE_TTL:-1h} ;;
    *) sed -n '2,31p' "$0"; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
for s in $SCENARIOS; do
  scenario_group "$s" >/dev/null || { echo "unknown scenario $s; known: $SCENARIOS_ALL" >&2; exit 2; }
done
need_loadtest

bench_init
[ "$FAST" = 1 ] || DURABLE=1
start_postgres 1 noinit
# Tables are created without the link (it would only slow the setup down).
# shellcheck disable=SC2086 # a list of names
"$LOADTEST_BIN" setup --target "postgres://bench@127.0.0.1:$PG_PORT/postgres?sslmode=disable" \
  --scale 1 --config-out "$WORK/tables.toml" $(for s in $SCENARIOS; do printf -- '-s %s ' "$s"; done) >&2
if [ -n "$RTT" ]; then start_link "$RTT"; fi
DIRECT="postgres://bench@127.0.0.1:${UPSTREAM_PORT:-$PG_PORT}/postgres?sslmode=disable"
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
  "spillway journal.fsync = $FSYNC$([ "$ASSUMED" = 1 ] && echo ', write-behind row_counts = assumed'); $CLIENTS clients, $ROUNDS rounds of $DURATION, mode $MODE${RTT:+, PostgreSQL behind a $RTT round trip};" \
  "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# One run of every scenario: a summary table at the end, PostgreSQL's CPU per
# operation per target in every report (--pg-pid).
# shellcheck disable=SC2046 # a list of flags
"$LOADTEST_BIN" run $(for s in $SCENARIOS; do printf -- '--scenario %s ' "$s"; done) \
  --target direct="$DIRECT" --target spillway="$SPILLWAY" \
  --metrics spillway="$SW_METRICS" --clients "$CLIENTS" --rounds "$ROUNDS" \
  --duration "$DURATION" --warmup "$WARMUP" --mode "$MODE" --seed 1 \
  --pg-pid "$(head -1 "$WORK/data/postmaster.pid")"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
