#!/usr/bin/env bash
# Instructions and system calls per request: figures that noise on a shared machine
# does not move. Each server runs under `valgrind --tool=callgrind` while a client
# sends a fixed number of requests, N and then 2N, each window opened with
# `callgrind_control --zero` and closed with `--dump`; the difference divided by N is
# the user-space instructions of one request, start-up, connection set-up and
# teardown cancelled out. System calls the same way from `strace -c -f` on a native
# run (every thread and child of the process).
#
# Measured, on a point SELECT (`SELECT balance FROM lt_accounts WHERE id = $1`, keys
# 1..100 so that hits stay hits) and one deferred UPDATE:
#   spillway   hit in the simple, prepared and extended-unnamed protocol (Parse, Bind,
#              Describe of the statement, Execute, Sync: tokio-postgres query_typed,
#              sent by extended_client.py), miss (every request a new key), pass-through
#              (cache off), deferred acknowledgement (write-back UPDATE, journal fsync
#              "always", flushed before the window closes)
#   pgbouncer  pass-through, simple and prepared (session pooling)
#   pooled     pass-through in transaction mode (pool of 20, cache off, auth file),
#              spillway against PgBouncer (transaction pooling), `-M extended`, one
#              client: a transaction leases and returns a server connection
#   postgres   the backend process of a point SELECT, simple, prepared, extended
#   generators pgbench and spillway-loadtest, point-read, prepared, 8 clients: the
#              client's own cost per request, which caps every ratio it reports on
#              shared cores; both run against a spillway whose /metrics counts the
#              requests of a -g second window cut out of the running client
#
# Usage: loadtest/instructions.sh [-n requests] [-g seconds] [-o "spillway pgbouncer pooled postgres generators"]
# Env:   SPILLWAY_BIN, LOADTEST_BIN (default: target/release/…, rebuilt when not set)
#        SPILLWAY_PG_BIN (directory with initdb/pg_ctl/postgres)
# Needs valgrind (callgrind_control, vgdb), strace, pgbench, psql, python3, bc, curl.
# Takes a few minutes at the default -n 2000; everything stays on 127.0.0.1 and stops.
set -euo pipefail
shopt -s inherit_errexit

N=2000 GEN_SECONDS=10 ONLY="spillway pgbouncer pooled postgres generators"
while getopts "n:g:o:h" opt; do
  case $opt in
    n) N=$OPTARG ;; g) GEN_SECONDS=$OPTARG ;; o) ONLY=$OPTARG ;;
    *) sed -n '2,31p' "$0"; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=loadtest/pgbench/lib.sh
. "$ROOT/loadtest/pgbench/lib.sh"
for tool in valgrind callgrind_control vgdb strace; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install valgrind strace)" >&2; exit 1; }
done
want() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
need_loadtest
bench_init
start_postgres 1 noinit
DIRECT_URL="postgres://bench@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
"$LOADTEST_BIN" setup --target "$DIRECT_URL" --scale 1 -s point-read -s write-update \
  --config-out "$WORK/tables.toml" >/dev/null 2>&1
mkdir -p "$WORK/cg"
if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK/cg"; fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

cat > "$WORK/hit.sql" <<'SQL'
\set id random(1, 100)
SELECT balance FROM lt_accounts WHERE id = :id;
SQL
cat > "$WORK/miss.sql" <<'SQL'
\set id random(1, 100000)
\set r random(1, 2000000000)
SELECT balance FROM lt_accounts WHERE id = :id AND :r > 0;
SQL
cat > "$WORK/update.sql" <<'SQL'
\set id random(1, 100000)
UPDATE lt_balances SET balance = balance + 1 WHERE id = :id;
SQL

# Clients: one connection, a fixed number of requests ($1), to port $CPORT.
pg() {
  pgbench -h 127.0.0.1 -p "$CPORT" -U bench -n -c 1 -t "$1" "${@:2}" postgres >"$WORK/client.log" 2>&1 ||
    { echo "pgbench against port $CPORT failed:" >&2; cat "$WORK/client.log" >&2; return 1; }
}
hit_simple() { pg "$1" -M simple -f "$WORK/hit.sql"; }
hit_prepared() { pg "$1" -M prepared -f "$WORK/hit.sql"; }
hit_pooled() { pg "$1" -M extended -f "$WORK/hit.sql"; }
hit_extended() { python3 "$ROOT/loadtest/extended_client.py" "$CPORT" "$1" 100; }
miss_prepared() { pg "$1" -M prepared -f "$WORK/miss.sql"; }
deferred() {
  pg "$1" -M prepared -f "$WORK/update.sql"
  # Its flush belongs to the requests: applied before the window closes.
  psql -X -q -h 127.0.0.1 -p "$CPORT" -U bench -d postgres -c 'SPILLWAY FLUSH' >/dev/null
}

# The pid of the process under callgrind whose command line contains $1.
cg_pid() {
  local p
  for _ in $(seq 300); do
    p=$( (vgdb -l 2>/dev/null || true) | awk -v pat="$1" 'index($0, pat) {sub("--pid=", "", $2); print $2; exit}')
    if [ -n "$p" ]; then echo "$p"; return 0; fi
    sleep 0.2
  done
  echo "no callgrind process matching $1" >&2
  return 1
}
# callgrind_control as the process's owner: vgdb names its pipes after the user.
cg_ctl() {
  if [ "$(id -u)" = 0 ] && [ "$(stat -c %U "/proc/$2")" = postgres ]; then
    runuser -u postgres -- callgrind_control "$@"
  else
    callgrind_control "$@"
  fi
}
cg_total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# Instructions of callgrind process $1 while client $2 sends $3 requests.
cg_window() {
  cg_ctl -z "$1" >/dev/null 2>&1
  "$2" "$3"
  cg_ctl -d "$1" >/dev/null 2>&1
  # shellcheck disable=SC2012 # names are ours
  cg_total "$(ls -t "$WORK/cg/"*".$1."* | head -1)"
}
# System calls of process $1 (all threads and children) while client $2 sends $3.
strace_window() {
  strace -c -f -q -p "$1" -o "$WORK/strace.out" &
  local s=$!
  sleep 0.5
  "$2" "$3"
  sleep 0.2
  kill -INT "$s"
  wait "$s" 2>/dev/null || true
  awk '$NF == "total" {print $4}' "$WORK/strace.out"
}
per() { printf '%.1f' "$(echo "($2 - $1) / $3" | bc -l)"; }
declare -a ROWS
row() { ROWS+=("$(printf '%-18s %-32s %14s %10s' "$1" "$2" "$3" "$4")"); echo "  $1 $2: $3 instructions, $4 system calls per request" >&2; }
# Instructions (callgrind pid $1) and system calls (native pid $2) per request of client $3.
measure() {
  local a b sa sb
  a=$(cg_window "$1" "$3" "$N"); b=$(cg_window "$1" "$3" $((2 * N)))
  sa=$(strace_window "$2" "$3" "$N"); sb=$(strace_window "$2" "$3" $((2 * N)))
  row "$4" "$5" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "$(per "$sa" "$sb" "$N")"
}
wait_up() { # port seconds
  for _ in $(seq $(($2 * 5))); do
    psql -X -q -h 127.0.0.1 -p "$1" -U bench -d postgres -c 'select 1' >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "nothing answers on port $1 after $2 s" >&2
  return 1
}
cg_wrapper() { # name -> a script that runs spillway under callgrind
  printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/cg/%s.%%p "%s" "$@" 2>%s/%s.valgrind.log\n' \
    "$WORK" "$1" "$SPILLWAY_BIN" "$WORK" "$1" > "$WORK/$1.sh"
  chmod +x "$WORK/$1.sh"
  echo "$WORK/$1.sh"
}

echo "instructions.sh: $N and $((2 * N)) requests per window; load average $LOAD_START" >&2
DEFERRED_TOML=$(cat "$ROOT/loadtest/config/balances.toml")

if want spillway; then
  echo "spillway (cache on, lt_balances write-back, journal fsync always)..." >&2
  # The wrapper execs valgrind, which keeps the pid: PIDS' last entry is the process.
  BENCH_BIN_cg_cached=$(cg_wrapper cg_cached) start_spillway cg_cached "$DEFERRED_TOML"
  CG_CACHED=$SW_PORT CG1=${PIDS[-1]}
  BENCH_BIN_cg_pass=$(cg_wrapper cg_pass) start_spillway cg_pass "[cache]
enabled = false"
  CG_PASS=$SW_PORT CG2=${PIDS[-1]}
  start_spillway cached "$DEFERRED_TOML"
  CACHED=$SW_PORT N1=${PIDS[-1]}
  start_spillway pass "[cache]
enabled = false"
  PASS=$SW_PORT N2=${PIDS[-1]}
  wait_up "$CG_CACHED" 120
  wait_up "$CG_PASS" 120
  wait_up "$CACHED" 20
  wait_up "$PASS" 20
  for m in hit_simple hit_prepared hit_extended; do
    # Fill the cache for these 100 keys in this protocol (each mode has its own keys).
    CPORT=$CG_CACHED "$m" 1000
    CPORT=$CACHED "$m" 1000
  done
  measure_on() { # cg_port native_port cg_pid native_pid client label
    local a b sa sb
    a=$(CPORT=$1 cg_window "$3" "$5" "$N"); b=$(CPORT=$1 cg_window "$3" "$5" $((2 * N)))
    sa=$(CPORT=$2 strace_window "$4" "$5" "$N"); sb=$(CPORT=$2 strace_window "$4" "$5" $((2 * N)))
    row spillway "$6" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "$(per "$sa" "$sb" "$N")"
  }
  measure_on "$CG_CACHED" "$CACHED" "$CG1" "$N1" hit_simple "hit, simple"
  measure_on "$CG_CACHED" "$CACHED" "$CG1" "$N1" hit_prepared "hit, prepared"
  measure_on "$CG_CACHED" "$CACHED" "$CG1" "$N1" hit_extended "hit, extended unnamed"
  measure_on "$CG_CACHED" "$CACHED" "$CG1" "$N1" miss_prepared "miss, prepared"
  measure_on "$CG_PASS" "$PASS" "$CG2" "$N2" hit_prepared "pass-through, prepared"
  measure_on "$CG_PASS" "$PASS" "$CG2" "$N2" hit_simple "pass-through, simple"
  measure_on "$CG_CACHED" "$CACHED" "$CG1" "$N1" deferred "deferred ack (write-back)"
fi

if want pgbouncer && start_pgbouncer; then
  echo "pgbouncer (session pooling)..." >&2
  wait_up "$PB_PORT" 20
  PB_NATIVE=$(cat "$WORK/pgbouncer.pid")
  CPORT=$PB_PORT hit_prepared 10
  sa=$(CPORT=$PB_PORT strace_window "$PB_NATIVE" hit_prepared "$N")
  sb=$(CPORT=$PB_PORT strace_window "$PB_NATIVE" hit_prepared $((2 * N)))
  ss=$(CPORT=$PB_PORT strace_window "$PB_NATIVE" hit_simple "$N")
  sc=$(CPORT=$PB_PORT strace_window "$PB_NATIVE" hit_simple $((2 * N)))
  kill "$PB_NATIVE"
  while kill -0 "$PB_NATIVE" 2>/dev/null; do sleep 0.1; done
  rm -f "$WORK/pgbouncer.pid"
  as_pg valgrind --tool=callgrind --callgrind-out-file="$WORK/cg/pb.%p" pgbouncer -q "$WORK/pgbouncer.ini" \
    2>"$WORK/pb.valgrind.log" &
  PIDS+=($!)
  wait_up "$PB_PORT" 60
  PB=$(cg_pid pgbouncer.ini)
  # The pooled server connection is opened once, outside the windows.
  CPORT=$PB_PORT hit_prepared 10
  a=$(CPORT=$PB_PORT cg_window "$PB" hit_prepared "$N"); b=$(CPORT=$PB_PORT cg_window "$PB" hit_prepared $((2 * N)))
  row pgbouncer "pass-through, prepared" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "$(per "$sa" "$sb" "$N")"
  a=$(CPORT=$PB_PORT cg_window "$PB" hit_simple "$N"); b=$(CPORT=$PB_PORT cg_window "$PB" hit_simple $((2 * N)))
  row pgbouncer "pass-through, simple" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "$(per "$ss" "$sc" "$N")"
fi

if want pooled; then
  echo "pooled pass-through (transaction mode, pool of 20, -M extended)..." >&2
  echo '"bench" "bench-password"' > "$WORK/auth.txt"
  POOL_TOML="[cache]
enabled = false
[pool]
mode = \"transaction\"
size = 20
[auth]
file = \"$WORK/auth.txt\""
  BENCH_BIN_cg_pool=$(cg_wrapper cg_pool) start_spillway cg_pool "$POOL_TOML"
  CG_POOL=$SW_PORT CG3=${PIDS[-1]}
  start_spillway pool "$POOL_TOML"
  POOL=$SW_PORT N3=${PIDS[-1]}
  export PGPASSWORD=bench-password
  wait_up "$CG_POOL" 120
  wait_up "$POOL" 20
  CPORT=$CG_POOL hit_pooled 100
  CPORT=$POOL hit_pooled 100
  a=$(CPORT=$CG_POOL cg_window "$CG3" hit_pooled "$N"); b=$(CPORT=$CG_POOL cg_window "$CG3" hit_pooled $((2 * N)))
  sa=$(CPORT=$POOL strace_window "$N3" hit_pooled "$N"); sb=$(CPORT=$POOL strace_window "$N3" hit_pooled $((2 * N)))
  row spillway "pooled, extended" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "$(per "$sa" "$sb" "$N")"
  if PB_POOL_MODE=transaction PB_POOL_SIZE=20 start_pgbouncer; then
    wait_up "$PB_PORT" 20
    PB_NATIVE=$(cat "$WORK/pgbouncer.pid")
    CPORT=$PB_PORT hit_pooled 10
    sa=$(CPORT=$PB_PORT strace_window "$PB_NATIVE" hit_pooled "$N")
    sb=$(CPORT=$PB_PORT strace_window "$PB_NATIVE" hit_pooled $((2 * N)))
    kill "$PB_NATIVE"
    while kill -0 "$PB_NATIVE" 2>/dev/null; do sleep 0.1; done
    rm -f "$WORK/pgbouncer.pid"
    # Its own name: the session-pooling PgBouncer above may still run under callgrind.
    cp "$WORK/pgbouncer.ini" "$WORK/pgbouncer-pool.ini"
    as_pg valgrind --tool=callgrind --callgrind-out-file="$WORK/cg/pbt.%p" pgbouncer -q "$WORK/pgbouncer-pool.ini" \
      2>"$WORK/pbt.valgrind.log" &
    PIDS+=($!)
    wait_up "$PB_PORT" 60
    PBT=$(cg_pid pgbouncer-pool.ini)
    CPORT=$PB_PORT hit_pooled 10
    a=$(CPORT=$PB_PORT cg_window "$PBT" hit_pooled "$N"); b=$(CPORT=$PB_PORT cg_window "$PBT" hit_pooled $((2 * N)))
    row pgbouncer "pooled, extended" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "$(per "$sa" "$sb" "$N")"
  fi
fi

if want generators; then
  # Both generators run the same way: against a native spillway (cache on), whose
  # /metrics counts every request it answers (hits + misses), for minutes; a window
  # of -g seconds is cut out of the running process (callgrind zero/dump, strace
  # attach/detach), and its count divides the instructions or calls. Start-up and
  # connection set-up stay outside the window.
  echo "load generators (point-read, prepared, 8 clients, ${GEN_SECONDS}s windows)..." >&2
  start_spillway gen ""
  GEN_PORT=$SW_PORT GEN_METRICS=$SW_METRICS
  wait_up "$GEN_PORT" 20
  answered() { # requests spillway answered so far
    curl -s "$GEN_METRICS" | awk '/^spillway_cache_(hits|misses)_total/ {n += $NF} END {printf "%d\n", n}'
  }
  # The binary itself: /usr/bin/pgbench is a wrapper script on Debian.
  pgb=("$PG_BIN/pgbench" -h 127.0.0.1 -p "$GEN_PORT" -U bench -n -M prepared -c 8 -j 2 -T 600
    -f "$ROOT/loadtest/pgbench/scenarios/point-read.sql" -D scale=1 postgres)
  lt=("$LOADTEST_BIN" run -s point-read -t "direct=postgres://bench@127.0.0.1:$GEN_PORT/postgres"
    -c 8 --threads 2 --rounds 1 --warmup 0s --duration 600s --mode prepared --progress none
    --seed 1 --out "$WORK/lt")
  generator() { # name command... : one row
    local name=$1 pid a0 a1 b0 b1 ir calls
    shift
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg/$name.%p" "$@" >"$WORK/$name.log" 2>&1 &
    pid=$!
    sleep 5 # connected and running
    cg_ctl -z "$pid" >/dev/null 2>&1
    a0=$(answered)
    sleep "$GEN_SECONDS"
    a1=$(answered)
    cg_ctl -d "$pid" >/dev/null 2>&1
    # shellcheck disable=SC2012 # names are ours
    ir=$(cg_total "$(ls -t "$WORK/cg/$name.$pid."* | head -1)")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    "$@" >"$WORK/$name.log" 2>&1 &
    pid=$!
    sleep 3
    strace -c -f -q -p "$pid" -o "$WORK/strace.out" &
    local s=$!
    sleep 0.5
    b0=$(answered)
    sleep "$GEN_SECONDS"
    b1=$(answered)
    kill -INT "$s"
    wait "$s" 2>/dev/null || true
    calls=$(awk '$NF == "total" {print $4}' "$WORK/strace.out")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    row "$name" "point-read, prepared, 8 clients" "$(printf '%.0f' "$(echo "$ir / ($a1 - $a0)" | bc -l)")" \
      "$(printf '%.1f' "$(echo "$calls / ($b1 - $b0)" | bc -l)")"
    echo "  ($name: $((a1 - a0)) requests under callgrind, $((b1 - b0)) under strace)" >&2
  }
  generator pgbench "${pgb[@]}"
  generator spillway-loadtest "${lt[@]}"
fi

if want postgres; then
  echo "postgres backend (autovacuum off)..." >&2
  PM=$(head -1 "$WORK/data/postmaster.pid")
  declare -A PGSYS
  for m in hit_simple hit_prepared hit_extended; do
    sa=$(CPORT=$PG_PORT strace_window "$PM" "$m" "$N"); sb=$(CPORT=$PG_PORT strace_window "$PM" "$m" $((2 * N)))
    PGSYS[$m]=$(per "$sa" "$sb" "$N")
  done
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null
  as_pg valgrind --tool=callgrind --callgrind-out-file="$WORK/cg/pg.%p" "$PG_BIN/postgres" -D "$WORK/data" \
    -p "$PG_PORT" -k "$WORK" -c listen_addresses=127.0.0.1 -c autovacuum=off 2>"$WORK/pg.valgrind.log" &
  PIDS+=($!)
  wait_up "$PG_PORT" 180
  backend() { # client requests -> instructions of the backend that served it (written at its exit)
    touch "$WORK/mark"
    CPORT=$PG_PORT "$1" "$2"
    # Its file appears when it exits. Of the processes that ended meanwhile, the
    # backend that served the client did by far the most work.
    local f best=0 t
    for _ in $(seq 600); do
      f=$(find "$WORK/cg" -name 'pg.*' -newer "$WORK/mark" | head -1)
      if [ -n "$f" ] && grep -q '^totals:' "$f" 2>/dev/null; then break; fi
      sleep 0.2
    done
    sleep 1
    for f in $(find "$WORK/cg" -name 'pg.*' -newer "$WORK/mark"); do
      t=$(cg_total "$f")
      if [ "${t:-0}" -gt "$best" ]; then best=$t; fi
    done
    echo "$best"
  }
  for m in hit_simple hit_prepared hit_extended; do
    a=$(backend "$m" "$N"); b=$(backend "$m" $((2 * N)))
    row postgres "point SELECT, ${m#hit_} (backend)" "$(printf '%.0f' "$(per "$a" "$b" "$N")")" "${PGSYS[$m]}"
  done
fi

echo
echo "Per request: user-space instructions (callgrind, $N vs $((2 * N)) requests) and system calls (strace -c -f)."
echo "Load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores."
printf '%-18s %-32s %14s %10s\n' process workload instructions syscalls
for r in "${ROWS[@]}"; do echo "$r"; done
