#!/usr/bin/env bash
# Transaction pooling (issue 16) with pgbench, bounded in time, on 127.0.0.1 only.
#
# 1. Many clients on a pool of 20: pgbench -c CLIENTS (1000) -M prepared, select-only
#    (-S) and TPC-B-like, through spillway with pool.mode = "transaction", size 20,
#    the read cache off. Reports pgbench's failed transactions, the most PostgreSQL
#    client backends seen at once (pg_stat_activity sampled every 100 ms, by
#    application), and checks the TPC-B tables: history rows = transactions pgbench
#    counted, and the sums of deltas, account, teller and branch balances agree.
# 2. Against PgBouncer in transaction mode (default_pool_size 20), 256 clients,
#    select-only and TPC-B-like, alternating rounds: tps of each and spillway /
#    PgBouncer. -M prepared only where PgBouncer tracks prepared statements (1.21+,
#    max_prepared_statements); otherwise -M extended (unnamed statements).
#
# Usage: loadtest/pgbench/pool.sh [-c 1000] [-b 256] [-T 30] [-r 3] [-s 10]
# Env:   SPILLWAY_BIN (default: target/release/spillway, rebuilt first when not set)
set -euo pipefail
CLIENTS=1000 VS=256 DURATION=30 ROUNDS=3 SCALE=10
while getopts "c:b:T:r:s:h" opt; do
  case $opt in
    c) CLIENTS=$OPTARG ;; b) VS=$OPTARG ;; T) DURATION=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    s) SCALE=$OPTARG ;; *) sed -n '2,17p' "$0"; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
bench_init
export PG_MAX_CONNECTIONS=100
start_postgres "$SCALE"
echo '"bench" "bench-password"' > "$WORK/auth.txt"
SERVER_EXTRA="max_client_conn = $((CLIENTS + 100))"
start_spillway spillway "${SPILLWAY_EXTRA:-}
[pool]
mode = \"transaction\"
size = 20
[auth]
file = \"$WORK/auth.txt\""
export PGPASSWORD=bench-password
wait_ready "$SW_PORT"
PB_POOL_MODE=transaction PB_MAX_CLIENTS=$((VS + 50)) PB_POOL_SIZE=20 start_pgbouncer ||
  { echo "pgbouncer not installed (apt-get install pgbouncer): part 2 skipped" >&2; PB_PORT=""; }
PB_MODE=extended
if [ -n "$PB_PORT" ] && printf '%s\n' "1.21.0" "$(pgbouncer --version | awk 'NR == 1 {print $2}')" | sort -V -C; then
  echo "max_prepared_statements = 200" >> "$WORK/pgbouncer.ini"
  kill -HUP "$(cat "$WORK/pgbouncer.pid")"
  PB_MODE=prepared
fi
[ -n "$PB_PORT" ] && wait_ready "$PB_PORT"
echo "pool.sh: $CLIENTS clients on a pool of 20; PgBouncer comparison at $VS; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

direct_sql() { psql -X -At -h 127.0.0.1 -p "$PG_PORT" -U bench -d postgres -c "$1"; }
sample_backends() { # -> file with the most client backends seen at once, by application
  while :; do
    direct_sql "SELECT sum(n) || ' ' || string_agg(a || ':' || n, ',') FROM (SELECT coalesce(nullif(application_name, ''), '-') a, count(*) n FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY 1) s" 2>/dev/null
    sleep 0.1
  done > "$WORK/backends.txt"
}
check_tpcb() { # transactions -> prints the check, returns 1 when it fails
  local sums
  sums=$(direct_sql "SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(delta) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches)")
  IFS='|' read -r rows delta a t b <<<"$sums"
  echo "    history rows $rows (pgbench counted $1), sum(delta) $delta, accounts $a, tellers $t, branches $b"
  [ "$rows" = "$1" ] && [ "$delta" = "$a" ] && [ "$a" = "$t" ] && [ "$t" = "$b" ]
}
run_many() { # label pgbench-args...
  local label=$1; shift
  direct_sql "TRUNCATE pgbench_history; UPDATE pgbench_accounts SET abalance = 0 WHERE abalance <> 0; UPDATE pgbench_tellers SET tbalance = 0; UPDATE pgbench_branches SET bbalance = 0" >/dev/null
  sample_backends & local sampler=$!
  pgbench -h 127.0.0.1 -p "$SW_PORT" -U bench -n -c "$CLIENTS" -j 2 -T "$DURATION" "$@" postgres >"$WORK/many.log" 2>&1 || true
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  local tx failed tps most
  tx=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' "$WORK/many.log")
  failed=$(awk -F': ' '/number of failed transactions/ {print $2}' "$WORK/many.log")
  tps=$(awk '/^tps = / {print $3; exit}' "$WORK/many.log")
  most=$(sort -n "$WORK/backends.txt" | tail -1)
  echo "  $label: $tx transactions, failed ${failed:-?}, $tps tps; most PostgreSQL client backends at once: $most (count, then by application_name; the sampler's own excluded)"
  grep -m3 -i "error\|fatal" "$WORK/many.log" | sed 's/^/    pgbench: /' || true
  if [ "$label" = tpcb ]; then check_tpcb "$tx" || echo "    CHECK FAILED"; fi
}

echo "## $CLIENTS clients through spillway, pool.mode = transaction, size 20, -M prepared, $DURATION s"
run_many select-only -M prepared -S
run_many tpcb -M prepared

if [ -n "$PB_PORT" ]; then
  echo "## spillway (transaction pool of 20) against PgBouncer (transaction, pool of 20), $VS clients, $ROUNDS rounds of $DURATION s, alternating"
  for spec in "-M $PB_MODE -S" "-M $PB_MODE"; do
    sw=() pb=()
    for r in $(seq "$ROUNDS"); do
      for target in spillway pgbouncer; do
        port=$SW_PORT; [ "$target" = pgbouncer ] && port=$PB_PORT
        # shellcheck disable=SC2086 # spec is a list of flags
        t=$( (pgbench -h 127.0.0.1 -p "$port" -U bench -n -c "$VS" -j 2 -T "$DURATION" $spec postgres 2>&1 || true) |
          awk '/^tps = / {print $3; exit}')
        echo "  round $r $target ($spec): ${t:-failed} tps" >&2
        if [ "$target" = spillway ]; then sw+=("${t:-0}"); else pb+=("${t:-0}"); fi
      done
    done
    ratios=$(for i in "${!sw[@]}"; do echo "${sw[$i]} ${pb[$i]}" | awk '{ if ($2 > 0) printf "%.2f ", $1 / $2; else printf "- " }'; done)
    echo "  $spec: spillway ${sw[*]} tps, PgBouncer ${pb[*]} tps; spillway / PgBouncer per round: $ratios(medians $(printf '%s\n' "${sw[@]}" | median) / $(printf '%s\n' "${pb[@]}" | median))"
  done
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
