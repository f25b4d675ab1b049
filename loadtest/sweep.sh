#!/usr/bin/env bash
# The deployment sweep behind BENCHMARKS.md (issue 15): every scenario of
# spillway-loadtest against PostgreSQL directly and through spillway, with PostgreSQL
# behind a modelled network link of each round-trip time, in each protocol mode and at
# each client count, alternating targets round by round. For `point-read` two more
# targets run in the same alternation: PgBouncer (session mode) and spillway with its
# read cache off (the pass-through rows compare these two).
#
# One durable PostgreSQL (synchronous_commit = on) serves the whole sweep; for each
# round trip a link (spillway-loadtest link; none at 0), a spillway with the scenarios'
# table config (loadtest/config/, journal fsync = "always"), a pass-through spillway
# and a PgBouncer are started in front of it and stopped afterwards. Every report
# gives PostgreSQL's CPU per operation (--pg-pid). At the end loadtest/sweep_report.py
# writes sweep.md (tables) and plots (throughput and p50/p99 against round trip).
#
# Usage: loadtest/sweep.sh [-R "0 0.2ms 1ms 2ms"] [-c "8 256"] [-M "simple extended prepared"]
#                          [-S "scenario ..."] [-d 3s] [-w 1s] [-r 3] [-o DIR]
# Env:   SPILLWAY_BIN, LOADTEST_BIN (default: target/release/…, rebuilt when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl); PREFILL (default 15s: the
#        unmeasured run that fills the cache before the read scenarios)
# Everything listens on 127.0.0.1 and stops when the sweep ends.
set -euo pipefail

RTTS="0 0.2ms 1ms 2ms" CLIENT_COUNTS="8 256" MODES="simple extended prepared"
DURATION=3s WARMUP=1s ROUNDS=3 OUT=""
SCENARIOS="point-read read-mostly join-read write-update write-insert hot-counters orm-tx mixed-session"
while getopts "R:c:M:S:d:w:r:o:h" opt; do
  case $opt in
    R) RTTS=$OPTARG ;; c) CLIENT_COUNTS=$OPTARG ;; M) MODES=$OPTARG ;; S) SCENARIOS=$OPTARG ;;
    d) DURATION=$OPTARG ;; w) WARMUP=$OPTARG ;; r) ROUNDS=$OPTARG ;; o) OUT=$OPTARG ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
for s in $SCENARIOS; do
  scenario_group "$s" >/dev/null || { echo "unknown scenario $s; known: $SCENARIOS_ALL" >&2; exit 2; }
done
need_loadtest
OUT=${OUT:-$ROOT/loadtest-results/sweep-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

MAX_CLIENTS=64 # the prefill's
for c in $CLIENT_COUNTS; do [ "$c" -gt "$MAX_CLIENTS" ] && MAX_CLIENTS=$c; done
# Each target opens its clients before the first measured window, and the targets of
# a run are open at once: direct, spillway's upstream sessions, PgBouncer's, the
# pass-through spillway's, plus spillway's own check and flush connections.
export PG_MAX_CONNECTIONS=$((MAX_CLIENTS * 4 + 50))
export PB_MAX_CLIENTS=$((MAX_CLIENTS + 10)) PB_POOL_SIZE=$((MAX_CLIENTS + 10))

bench_init
DURABLE=1
start_postgres 1 noinit
PG_PID=$(head -1 "$WORK/data/postmaster.pid")
# shellcheck disable=SC2086,SC2046 # lists
"$LOADTEST_BIN" setup --target "postgres://bench@127.0.0.1:$PG_PORT/postgres?sslmode=disable" \
  --scale 1 --config-out "$WORK/tables.toml" $(for s in $SCENARIOS; do printf -- '-s %s ' "$s"; done) >&2
# shellcheck disable=SC2086
TABLES_TOML=$(scenario_tables_toml $SCENARIOS)
JOURNAL_EXTRA='fsync = "always"'
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "commit=$COMMIT"
  # The environment that changes spillway's configuration is part of the command.
  env_prefix=""
  for var in INVALIDATION CACHE_TTL; do
    if [ -n "${!var:-}" ]; then env_prefix+="$var=${!var} "; fi
  done
  echo "command=${env_prefix}loadtest/sweep.sh -R \"$RTTS\" -c \"$CLIENT_COUNTS\" -M \"$MODES\" -S \"$SCENARIOS\" -d $DURATION -w $WARMUP -r $ROUNDS"
  echo "cores=$(nproc)"
  echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/sweep.env"

# Stops what one round trip's step started (the PostgreSQL stays).
stop_step() {
  local first=$1 i
  for ((i = first; i < ${#PIDS[@]}; i++)); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  for ((i = first; i < ${#PIDS[@]}; i++)); do wait "${PIDS[$i]}" 2>/dev/null || true; done
  PIDS=("${PIDS[@]:0:$first}")
  if [ -f "$WORK/pgbouncer.pid" ]; then
    kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
    for _ in $(seq 50); do [ -f "$WORK/pgbouncer.pid" ] || break; sleep 0.1; done
    rm -f "$WORK/pgbouncer.pid"
  fi
  unset UPSTREAM_PORT
}

# The read scenarios' keys are uniform over 100,000 rows: without a fill first, a
# short round measures misses (each a trip across the link). One unmeasured run per
# round trip and mode (a mode's statements have their own cache keys) fills the cache;
# its report is kept under prefill/.
prefill() { # scenario mode rtt
  case $1 in point-read | join-read | read-mostly) ;; *) return 0 ;; esac
  local group
  group=$(scenario_group "$1")
  [ -e "$WORK/prefilled-$group-$2-$3" ] && return 0
  touch "$WORK/prefilled-$group-$2-$3"
  echo "   filling the cache for $group ($2)..." >&2
  "$LOADTEST_BIN" run --scenario "$1" --target spillway="postgres://bench@127.0.0.1:$SW/postgres" \
    --clients 64 --rounds 1 --duration "${PREFILL:-15s}" --warmup 0s --mode "$2" --seed 2 \
    --progress none --out "$OUT/prefill" >"$OUT/prefill.log" 2>&1 || { echo "   prefill of $1 failed:" >&2; tail -3 "$OUT/prefill.log" >&2; }
}

for rtt in $RTTS; do
  first=${#PIDS[@]}
  case $rtt in 0 | 0s | 0ms) ;; *) start_link "$rtt" ;; esac
  rm -rf "$WORK/journal-spillway" "$WORK/journal-passthrough"
  start_spillway spillway "$TABLES_TOML"
  SW=$SW_PORT METRICS=$SW_METRICS
  start_spillway passthrough "[cache]
enabled = false"
  PT=$SW_PORT
  PB=""
  if start_pgbouncer; then PB=$PB_PORT; fi
  wait_ready "$SW" "$PT" ${PB:+"$PB"}
  DIRECT="postgres://bench@127.0.0.1:${UPSTREAM_PORT:-$PG_PORT}/postgres?sslmode=disable"
  for clients in $CLIENT_COUNTS; do
    for mode in $MODES; do
      for s in $SCENARIOS; do
        prefill "$s" "$mode" "$rtt"
        targets=(--target direct="$DIRECT" --target spillway="postgres://bench@127.0.0.1:$SW/postgres")
        if [ "$s" = point-read ]; then
          [ -n "$PB" ] && targets+=(--target pgbouncer="postgres://bench@127.0.0.1:$PB/postgres?sslmode=disable")
          targets+=(--target passthrough="postgres://bench@127.0.0.1:$PT/postgres")
        fi
        dir="$OUT/rtt-$rtt/c$clients/$mode"
        mkdir -p "$dir"
        echo "== $s, $mode, $clients clients, round trip $rtt, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        "$LOADTEST_BIN" run --scenario "$s" "${targets[@]}" --metrics spillway="$METRICS" \
          --clients "$clients" --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP" \
          --mode "$mode" --seed 1 --pg-pid "$PG_PID" --progress none --out "$dir" \
          >"$dir/$s.log" 2>&1 || echo "  $s failed (exit $?): see $dir/$s.log" >&2
      done
    done
  done
  stop_step "$first"
done
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/sweep.env"
python3 "$ROOT/loadtest/sweep_report.py" "$OUT"
echo "sweep written to $OUT (sweep.md, plots)" >&2
