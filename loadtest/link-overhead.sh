#!/usr/bin/env bash
# What the link emulator itself costs: pgbench -S against a throwaway PostgreSQL
# directly and through `spillway-loadtest link --rtt 0s` (or -L), alternating rounds.
# Prints each round (tps, average latency) and the median ratio link/direct, with the
# load average: the link's relay runs on the same cores as everything it measures.
#
# Usage: loadtest/link-overhead.sh [-T seconds] [-r rounds] [-c clients] [-M mode] [-L rtt]
# Env:   LOADTEST_BIN (default: target/release/spillway-loadtest, rebuilt when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl)
set -euo pipefail

DURATION=3 ROUNDS=4 CLIENTS=8 MODE=prepared RTT=0s
while getopts "T:r:c:M:L:h" opt; do
  case $opt in
    T) DURATION=$OPTARG ;; r) ROUNDS=$OPTARG ;; c) CLIENTS=$OPTARG ;; M) MODE=$OPTARG ;;
    L) RTT=$OPTARG ;;
    *) sed -n '2,9p' "$0"; exit 2 ;;
  esac
done
JOBS=$(( CLIENTS < 2 ? CLIENTS : 2 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
need_loadtest
SPILLWAY_BIN=${SPILLWAY_BIN:-unused} # no spillway here: bench_init builds nothing
bench_init
start_postgres 1
start_link "$RTT"
wait_ready "$PG_PORT" "$LINK_PORT"

run() { # port -> "tps latency_ms"
  pgbench -h 127.0.0.1 -p "$1" -U bench -n -S -M "$MODE" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" postgres 2>/dev/null |
    awk '/^latency average = / {l=$4} /^tps = / {t=$3} END {print t, l}'
}
echo "pgbench -S -M $MODE, $CLIENTS clients, ${DURATION}s rounds, link --rtt $RTT; load average $(cut -d' ' -f1-3 /proc/loadavg)"
run "$PG_PORT" >/dev/null
run "$LINK_PORT" >/dev/null
ratios=""
for r in $(seq "$ROUNDS"); do
  read -r dt dl <<<"$(run "$PG_PORT")"
  read -r lt ll <<<"$(run "$LINK_PORT")"
  q=$(echo "$lt / $dt" | bc -l)
  ratios="$ratios $q"
  printf '  round %s: direct %.0f tps (%s ms), link %.0f tps (%s ms), link/direct %.3f\n' "$r" "$dt" "$dl" "$lt" "$ll" "$q"
done
med=$(echo "$ratios" | tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
printf 'link/direct tps: median %.3f over %s rounds; load average now %s\n' "$med" "$ROUNDS" "$(cut -d' ' -f1-3 /proc/loadavg)"
