#!/usr/bin/env bash
# Old against new: two spillway binaries in front of one throwaway PostgreSQL, the same
# workloads, alternating rounds (old, new, old, new, …) so drift of the machine hits
# both alike. Prints each round and, per workload, the ratio new/old: the median of
# the per-round ratios and their spread (lowest..highest).
#
# Workloads: pgbench -S (point SELECT) in each protocol mode, through spillway with the
# cache off (pass-through) and with the cache on (hits, after a warm-up that fills the
# cache); then spillway-loadtest's write scenarios (write-bench.sh's tables and
# policies, journal fsync "always", PostgreSQL synchronous_commit on), each binary on
# its own database so that neither sees the other's tables or ledger, with
# PostgreSQL's CPU per operation (--pg-pid).
#
# Usage: loadtest/ab.sh [-T seconds] [-d duration] [-r rounds] [-c clients] [-s scale]
#                       [-w warm-up seconds] [-M "simple prepared"] [-m loadtest-mode]
#                       [-W "scenario ..." | -W none] [-L rtt] OLD_BIN NEW_BIN
#   -T  seconds per pgbench round (10)       -d  duration of a loadtest round (5s)
#   -r  rounds (5)                           -c  clients (8)
#   -s  pgbench scale (1)                    -w  cache warm-up per binary and mode (20)
#   -M  pgbench modes ("simple prepared")    -m  loadtest mode (prepared)
#   -W  write scenarios (write-update write-insert hot-counters orm-tx), or none
#   -L  PostgreSQL behind spillway-loadtest link adding this round trip
# Env:   LOADTEST_BIN (default: target/release/spillway-loadtest, rebuilt when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl)
set -euo pipefail

DURATION=10 LT_DURATION=5s ROUNDS=5 CLIENTS=8 SCALE=1 WARMUP=20 MODES="simple prepared"
LT_MODE=prepared WRITES="write-update write-insert hot-counters orm-tx" RTT=""
while getopts "T:d:r:c:s:w:M:m:W:L:h" opt; do
  case $opt in
    T) DURATION=$OPTARG ;; d) LT_DURATION=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    c) CLIENTS=$OPTARG ;; s) SCALE=$OPTARG ;; w) WARMUP=$OPTARG ;; M) MODES=$OPTARG ;;
    m) LT_MODE=$OPTARG ;; W) WRITES=$OPTARG ;; L) RTT=$OPTARG ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# = 2 ] || { sed -n '2,24p' "$0"; exit 2; }
OLD_BIN=$(realpath "$1") NEW_BIN=$(realpath "$2")
for b in "$OLD_BIN" "$NEW_BIN"; do
  [ -x "$b" ] || { echo "$b is not an executable" >&2; exit 2; }
done
[ "$WRITES" = none ] && WRITES=""
JOBS=$(( CLIENTS < 2 ? CLIENTS : 2 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
for s in $WRITES; do
  scenario_group "$s" >/dev/null || { echo "unknown scenario $s; known: $SCENARIOS_ALL" >&2; exit 2; }
done
need_loadtest
SPILLWAY_BIN=$NEW_BIN # bench_init then builds nothing
bench_init
DURABLE=1 start_postgres "$SCALE"
for db in old new; do
  psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U bench -d postgres -c "CREATE DATABASE $db" >/dev/null
done
if [ -n "$WRITES" ]; then
  for db in old new; do
    # shellcheck disable=SC2046 # a list of flags
    "$LOADTEST_BIN" setup --target "postgres://bench@127.0.0.1:$PG_PORT/$db?sslmode=disable" \
      --scale 1 --config-out "$WORK/tables.toml" $(for s in $WRITES; do printf -- '-s %s ' "$s"; done) >/dev/null 2>&1
  done
fi
if [ -n "$RTT" ]; then start_link "$RTT"; fi
# shellcheck disable=SC2086 # a list of names
TABLES=$( [ -z "$WRITES" ] || scenario_tables_toml $WRITES)
JOURNAL_EXTRA='fsync = "always"'
declare -A PORT METRICS
for v in old new; do
  bin=$([ "$v" = old ] && echo "$OLD_BIN" || echo "$NEW_BIN")
  printf -v "BENCH_BIN_pass_$v" '%s' "$bin"
  printf -v "BENCH_BIN_cache_$v" '%s' "$bin"
  start_spillway "pass_$v" "[cache]
enabled = false"
  PORT[pass_$v]=$SW_PORT
  # The write scenarios' tables live in the database named after the binary.
  SW_DB=$v start_spillway "cache_$v" "$TABLES"
  PORT[cache_$v]=$SW_PORT METRICS[cache_$v]=$SW_METRICS
done
wait_ready "${PORT[@]}"

echo "ab.sh: old=$OLD_BIN new=$NEW_BIN; $CLIENTS clients, $ROUNDS rounds, pgbench ${DURATION}s," \
  "scale $SCALE${RTT:+, PostgreSQL behind a $RTT round trip}, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

pgb() { # port mode seconds -> tps
  pgbench -h 127.0.0.1 -p "$1" -U bench -n -S -M "$2" -c "$CLIENTS" -j "$JOBS" -T "$3" postgres 2>/dev/null |
    awk '/^tps = / {print $3; exit}'
}
# Median and spread of the per-round ratios new/old.
spread() { # "r1 r2 ..." -> "median (lowest..highest)"
  local sorted
  sorted=$(echo "$1" | tr ' ' '\n' | grep . | sort -g)
  printf '%.3f (%.3f..%.3f)' "$(echo "$sorted" | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')" "$(echo "$sorted" | head -1)" "$(echo "$sorted" | tail -1)"
}
declare -a SUMMARY
for kind in pass cache; do
  for mode in $MODES; do
    if [ "$kind" = cache ]; then
      for v in old new; do pgb "${PORT[cache_$v]}" "$mode" "$WARMUP" >/dev/null; done
    else
      for v in old new; do pgb "${PORT[pass_$v]}" "$mode" 2 >/dev/null; done
    fi
    ratios=""
    for r in $(seq "$ROUNDS"); do
      o=$(pgb "${PORT[${kind}_old]}" "$mode" "$DURATION")
      n=$(pgb "${PORT[${kind}_new]}" "$mode" "$DURATION")
      q=$(echo "${n:-0} / ${o:-1}" | bc -l)
      ratios="$ratios $q"
      printf '  %-13s %-9s round %s: old %.0f tps, new %.0f tps, new/old %.3f\n' \
        "$([ "$kind" = pass ] && echo pass-through || echo cache-hit)" "$mode" "$r" "${o:-0}" "${n:-0}" "$q"
    done
    SUMMARY+=("$(printf '%-34s new/old %s' "pgbench -S $([ "$kind" = pass ] && echo pass-through || echo cache-hit) $mode" "$(spread "$ratios")")")
  done
done

if [ -n "$WRITES" ]; then
  OUT=$WORK/results
  # shellcheck disable=SC2046 # a list of flags
  "$LOADTEST_BIN" run $(for s in $WRITES; do printf -- '--scenario %s ' "$s"; done) \
    --target "old=postgres://bench@127.0.0.1:${PORT[cache_old]}/old" \
    --target "new=postgres://bench@127.0.0.1:${PORT[cache_new]}/new" \
    --clients "$CLIENTS" --rounds "$ROUNDS" --duration "$LT_DURATION" --warmup 2s \
    --mode "$LT_MODE" --seed 1 --progress none --out "$OUT" \
    --pg-pid "$(head -1 "$WORK/data/postmaster.pid")" >"$WORK/writes.md" 2>"$WORK/writes.log" ||
    { echo "spillway-loadtest failed:" >&2; tail -20 "$WORK/writes.log" >&2; exit 1; }
  while IFS= read -r line; do SUMMARY+=("$line"); done < <(python3 - "$OUT" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*/report.json")):
    r = json.load(open(path))
    x = r["ratios"][0]
    rounds = [v for v in x["per_round"] if v is not None]
    cpu = {t["name"]: t["pg_cpu_us_per_op"] for t in r["targets"]}
    cpu_text = ""
    if cpu.get("old") and cpu.get("new"):
        cpu_text = ", PostgreSQL CPU per op new/old %.3f" % (cpu["new"] / cpu["old"])
    ok = "" if r["correctness_ok"] else ", CORRECTNESS FAILED"
    med = x["median_of_rounds"]
    print("%-34s new/old %s (%s)%s%s" % (
        "loadtest " + r["scenario"]["name"] + " " + r["settings"]["mode"],
        "%.3f" % med if med is not None else "-",
        "..".join("%.3f" % v for v in (min(rounds), max(rounds))) if rounds else "-",
        cpu_text, ok))
PY
  )
fi

echo
echo "new/old: median of the per-round ratios (lowest..highest round); load average now $(cut -d' ' -f1-3 /proc/loadavg)"
for s in "${SUMMARY[@]}"; do echo "$s"; done
