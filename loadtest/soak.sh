#!/usr/bin/env bash
# Soak (issue 18): a mixed load through one spillway for a long time, with its memory,
# open files and threads sampled every 10 s, then the slope of each after warm-up and
# the scenarios' own correctness checks (every acknowledged deferred write applied
# exactly once). Not part of CI: run it by hand, on a machine with nothing else to do.
#
# Tasks are spillway's own gauge spillway_runtime_tasks (tokio's alive tasks), with
# spillway_client_connections beside it, both read from /metrics at each sample.
#
# Concurrently, until the end: cache hits and misses (point-read over 100,000 keys,
# read-mostly), deferred writes (write-update under write-back, orm-tx's held
# transactions under write-behind, mixed-session's read-your-writes), clients that
# connect, run one statement and leave (reconnects), and a reload (SIGHUP) every
# RELOAD seconds. Each load runs in rounds of ROUND, so every round ends with its
# correctness check.
#
# Usage: loadtest/soak.sh [-t 3600] [-r 300s] [-R 180] [-w 300]
#   -t total seconds, -r one load round, -R seconds between reloads, -w warm-up
#   seconds left out of the slopes
# Env:   SPILLWAY_BIN, LOADTEST_BIN (default: target/release/…, rebuilt when not set)
# Writes loadtest-results/soak-<time>/ (samples.csv, the runs' reports, summary.json).
set -euo pipefail
TOTAL=3600 ROUND=300s RELOAD=180 WARM=300
while getopts "t:r:R:w:h" opt; do
  case $opt in
    t) TOTAL=$OPTARG ;; r) ROUND=$OPTARG ;; R) RELOAD=$OPTARG ;; w) WARM=$OPTARG ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
need_loadtest
OUT=$ROOT/loadtest-results/soak-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
SCENARIOS="point-read read-mostly write-update orm-tx mixed-session"
export PG_MAX_CONNECTIONS=200
bench_init
DURABLE=1
start_postgres 1 noinit
# shellcheck disable=SC2046,SC2086
"$LOADTEST_BIN" setup --target "postgres://bench@127.0.0.1:$PG_PORT/postgres?sslmode=disable" \
  --scale 1 $(for s in $SCENARIOS; do printf -- '-s %s ' "$s"; done) >&2
# shellcheck disable=SC2086
start_spillway spillway "$(scenario_tables_toml $SCENARIOS)"
wait_ready "$SW_PORT"
SW_PID=${PIDS[-1]}
URL="postgres://bench@127.0.0.1:$SW_PORT/postgres"
DEADLINE=$(( $(date +%s) + TOTAL ))
echo "soak: spillway pid $SW_PID, $TOTAL s, rounds of $ROUND, reload every $RELOAD s; $OUT" >&2

load_loop() { # scenario clients
  local n=0
  while [ "$(date +%s)" -lt "$DEADLINE" ]; do
    n=$((n + 1))
    "$LOADTEST_BIN" run --scenario "$1" --target spillway="$URL" --clients "$2" \
      --rounds 1 --duration "$ROUND" --warmup 0s --mode prepared --progress none \
      --out "$OUT/runs" >"$OUT/$1-$n.log" 2>&1 || echo "$1 round $n: exit $?" >>"$OUT/failures"
  done
}
reconnect_loop() {
  local n=0
  while [ "$(date +%s)" -lt "$DEADLINE" ]; do
    psql -X -q -h 127.0.0.1 -p "$SW_PORT" -U bench -d postgres -c 'SELECT 1' >/dev/null 2>&1 ||
      echo "reconnect $n failed" >>"$OUT/failures"
    n=$((n + 1))
  done
  echo "$n" >"$OUT/reconnects"
}
reload_loop() {
  while [ "$(date +%s)" -lt "$DEADLINE" ]; do
    sleep "$RELOAD"
    kill -HUP "$SW_PID" 2>/dev/null || echo "reload: spillway gone" >>"$OUT/failures"
  done
}
gauge() { # name -> its value in spillway's /metrics (empty when unreachable)
  curl -s --max-time 5 "$SW_METRICS" | awk -v n="$1" '$1 == n {print $2; exit}'
}
sample_loop() {
  echo "seconds,rss_kib,open_files,threads,tasks,clients" >"$OUT/samples.csv"
  local start
  start=$(date +%s)
  while [ "$(date +%s)" -lt "$DEADLINE" ] && kill -0 "$SW_PID" 2>/dev/null; do
    printf '%s,%s,%s,%s,%s,%s\n' "$(( $(date +%s) - start ))" \
      "$(awk '/^VmRSS:/ {print $2}' "/proc/$SW_PID/status")" \
      "$(find "/proc/$SW_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" \
      "$(awk '/^Threads:/ {print $2}' "/proc/$SW_PID/status")" \
      "$(gauge spillway_runtime_tasks)" "$(gauge spillway_client_connections)" >>"$OUT/samples.csv"
    sleep 10
  done
}

pids=()
load_loop point-read 8 & pids+=($!)
load_loop read-mostly 4 & pids+=($!)
load_loop write-update 4 & pids+=($!)
load_loop orm-tx 4 & pids+=($!)
load_loop mixed-session 2 & pids+=($!)
reconnect_loop & pids+=($!)
reload_loop & reload_pid=$!
sample_loop & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
kill "$reload_pid" 2>/dev/null || true

python3 - "$OUT" "$WARM" <<'PY'
import csv, glob, json, os, sys
out, warm = sys.argv[1], float(sys.argv[2])
rows = [r for r in csv.DictReader(open(os.path.join(out, "samples.csv"))) if r["rss_kib"]]
def slope(col):
    pts = [(float(r["seconds"]), float(r[col])) for r in rows if float(r["seconds"]) >= warm and r[col]]
    if len(pts) < 3:
        return None
    n = len(pts); mx = sum(x for x, _ in pts) / n; my = sum(y for _, y in pts) / n
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den * 3600 if den else None
checks = []
for path in glob.glob(os.path.join(out, "runs", "*", "report.json")):
    r = json.load(open(path))
    checks.append(r.get("correctness_ok"))
failures = open(os.path.join(out, "failures")).read().splitlines() if os.path.exists(os.path.join(out, "failures")) else []
summary = {
    "samples": len(rows),
    "rss_kib": {"first": rows[0]["rss_kib"] if rows else None, "last": rows[-1]["rss_kib"] if rows else None,
                "max": max((int(r["rss_kib"]) for r in rows), default=None), "slope_per_hour_after_warmup": slope("rss_kib")},
    "open_files": {"max": max((int(r["open_files"]) for r in rows), default=None), "slope_per_hour_after_warmup": slope("open_files")},
    "threads": {"max": max((int(r["threads"]) for r in rows), default=None), "slope_per_hour_after_warmup": slope("threads")},
    "tasks": {"max": max((int(float(r["tasks"])) for r in rows if r["tasks"]), default=None), "slope_per_hour_after_warmup": slope("tasks")},
    "client_connections": {"max": max((int(float(r["clients"])) for r in rows if r["clients"]), default=None), "slope_per_hour_after_warmup": slope("clients")},
    "runs": len(checks),
    "correctness_failed": sum(1 for c in checks if c is False),
    "reconnects": int(open(os.path.join(out, "reconnects")).read()) if os.path.exists(os.path.join(out, "reconnects")) else None,
    "failures": failures,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
sys.exit(1 if summary["correctness_failed"] or failures else 0)
PY
