# Shared by the pgbench scripts in this directory (sourced, not run): tool checks, a
# throwaway PostgreSQL, spillway instances, cleanup of everything started, medians.
# Expects ROOT to be the repository root. Everything listens on 127.0.0.1 only.

# PostgreSQL and PgBouncer refuse to run as root: run them as postgres then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { printf "%.2f" "$(echo "$1 / $2" | bc -l)"; }

bench_init() {
  if [ -z "${SPILLWAY_BIN:-}" ]; then
    # Always (re)build: a stale binary would measure old code. A no-op when up to date.
    echo "building spillway (release)..." >&2
    (cd "$ROOT" && cargo build --release -p spillway >&2)
    SPILLWAY_BIN=$ROOT/target/release/spillway
  fi
  for tool in pgbench psql python3 bc; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
  done
  PG_BIN=${SPILLWAY_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
  [ -x "$PG_BIN/pg_ctl" ] || { echo "PostgreSQL server binaries not found (set SPILLWAY_PG_BIN)" >&2; exit 1; }
  WORK=$(mktemp -d /tmp/spillway-bench.XXXXXX)
  if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK"; fi
  PIDS=()
  trap bench_cleanup EXIT INT TERM
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  # The link's closing line: how late its chunks left, how much it queued.
  if [ -f "$WORK/link.log" ]; then tail -1 "$WORK/link.log" >&2; fi
  if [ -f "$WORK/pgbouncer.pid" ]; then kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true; fi
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  # BENCH_KEEP=1 keeps the logs and configs for a look after a failure.
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

start_postgres() { # scale [noinit]; DURABLE=1 keeps PostgreSQL's synchronous_commit = on
  PG_PORT=$(free_port)
  as_pg "$PG_BIN/initdb" -D "$WORK/data" -U bench --auth=trust -N -E UTF8 --locale=C >/dev/null
  cat >> "$WORK/data/postgresql.conf" <<CONF
max_connections = ${PG_MAX_CONNECTIONS:-100}
shared_buffers = 256MB
CONF
  if [ "${DURABLE:-0}" != 1 ]; then
    echo "synchronous_commit = off" >> "$WORK/data/postgresql.conf"
  fi
  # INVALIDATION=replication: spillway follows the logical replication stream.
  if [ "${INVALIDATION:-}" = replication ]; then
    echo "wal_level = logical" >> "$WORK/data/postgresql.conf"
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w \
    -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null
  [ "${2:-}" = noinit ] && return 0
  echo "PostgreSQL on 127.0.0.1:$PG_PORT; pgbench -i -s $1..." >&2
  pgbench -h 127.0.0.1 -p "$PG_PORT" -U bench -i -q -s "$1" postgres >/dev/null 2>&1
}

# The spillway-loadtest scenarios (loadtest/src/scenario/mod.rs is the reference; a
# unit test there checks this table against it): scenario -> table group, whose setup
# SQL is loadtest/sql/GROUP.sql and spillway table config loadtest/config/GROUP.toml.
SCENARIOS_ALL="point-read read-mostly join-read write-update write-insert hot-counters orm-tx mixed-session"
scenario_group() {
  case $1 in
    point-read) echo accounts ;;
    read-mostly) echo accounts ;;
    join-read) echo shop ;;
    write-update) echo balances ;;
    write-insert) echo events ;;
    hot-counters) echo counters ;;
    orm-tx) echo orm ;;
    mixed-session) echo sessions ;;
    *) return 1 ;;
  esac
}

setup_scenarios() { # scale scenario... : creates each table group once, through psql
  local scale=$1 done_groups=" " g
  shift
  # Quiet: DROP TABLE IF EXISTS on a fresh server prints a NOTICE per table. Only for
  # psql here: PgBouncer refuses the startup option.
  PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U bench -d postgres \
    -f "$ROOT/loadtest/sql/meta.sql" >/dev/null
  for s in "$@"; do
    g=$(scenario_group "$s")
    case $done_groups in *" $g "*) continue ;; esac
    echo "setting up $g (scale $scale)..." >&2
    PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -v scale="$scale" -h 127.0.0.1 -p "$PG_PORT" -U bench \
      -d postgres -f "$ROOT/loadtest/sql/$g.sql" >/dev/null
    done_groups="$done_groups$g "
  done
}

scenario_tables_toml() { # scenario... : the table config they expect, each group once
  local done_groups=" " g
  for s in "$@"; do
    g=$(scenario_group "$s")
    case $done_groups in *" $g "*) continue ;; esac
    cat "$ROOT/loadtest/config/$g.toml"
    done_groups="$done_groups$g "
  done
}

need_loadtest() { # sets LOADTEST_BIN, building it unless given
  if [ -z "${LOADTEST_BIN:-}" ]; then
    echo "building spillway-loadtest (release)..." >&2
    (cd "$ROOT" && cargo build --release -p spillway-loadtest >&2)
    LOADTEST_BIN=$ROOT/target/release/spillway-loadtest
  fi
}

# PostgreSQL across a modelled network (-L): every path to PostgreSQL, direct clients
# and spillway's or PgBouncer's own connections alike, goes through one link that
# adds RTT. Sets LINK_PORT and UPSTREAM_PORT (what clients and proxies connect to).
start_link() { # rtt
  need_loadtest
  LINK_PORT=$(free_port)
  "$LOADTEST_BIN" link --listen "127.0.0.1:$LINK_PORT" --to "127.0.0.1:$PG_PORT" --rtt "$1" \
    2>"$WORK/link.log" &
  PIDS+=($!)
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$LINK_PORT") 2>/dev/null && break
    sleep 0.1
  done
  UPSTREAM_PORT=$LINK_PORT
  echo "PostgreSQL behind a link adding a $1 round trip (127.0.0.1:$LINK_PORT)" >&2
}

start_spillway() { # name [extra TOML] -> sets SW_PORT and SW_METRICS (its /metrics URL)
  # BENCH_BIN_<name> (e.g. BENCH_BIN_old) runs another binary under that name; SW_DB
  # names the database of backend.url (default postgres); SERVER_EXTRA goes into its
  # [server] table.
  local bin_var="BENCH_BIN_$1"
  local bin=${!bin_var:-$SPILLWAY_BIN}
  SW_PORT=$(free_port)
  local metrics_port
  metrics_port=$(free_port)
  SW_METRICS="http://127.0.0.1:$metrics_port/metrics"
  # INVALIDATION and CACHE_TTL go into the [cache] table, the extra TOML's own if it
  # has one (a second [cache] header would make the file invalid).
  local cache_keys="" extra=${2:-}
  [ -n "${INVALIDATION:-}" ] && cache_keys+="invalidation = \"$INVALIDATION\""$'\n'
  [ -n "${CACHE_TTL:-}" ] && cache_keys+="ttl = \"$CACHE_TTL\""$'\n'
  if [ -n "$cache_keys" ]; then
    if grep -qx '\[cache\]' <<<"$extra"; then
      extra=$(awk -v keys="$cache_keys" '{ print } $0 == "[cache]" { printf "%s", keys }' <<<"$extra")
    else
      extra="[cache]"$'\n'"$cache_keys$extra"
    fi
  fi
  cat > "$WORK/$1.toml" <<CONF
[server]
listen = "127.0.0.1:$SW_PORT"
${SERVER_EXTRA:-}
[backend]
url = "postgres://bench@127.0.0.1:${UPSTREAM_PORT:-$PG_PORT}/${SW_DB:-postgres}?sslmode=disable"
[journal]
dir = "$WORK/journal-$1"
${JOURNAL_EXTRA:-}
[metrics]
listen = "127.0.0.1:$metrics_port"
[log]
level = "warn"
${extra}
CONF
  "$bin" run --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
  PIDS+=($!)
}

start_pgbouncer() { # -> sets PB_PORT, or returns 1 when not installed
  command -v pgbouncer >/dev/null || return 1
  PB_PORT=$(free_port)
  cat > "$WORK/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=${UPSTREAM_PORT:-$PG_PORT}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = ${PB_POOL_MODE:-session}
max_client_conn = ${PB_MAX_CLIENTS:-200}
default_pool_size = ${PB_POOL_SIZE:-50}
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
CONF
  echo '"bench" ""' > "$WORK/userlist.txt"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"; fi
  # Daemonized with a pidfile: killing a runuser wrapper would orphan PgBouncer.
  as_pg pgbouncer -d -q "$WORK/pgbouncer.ini"
}

wait_ready() { # port...
  for port in "$@"; do
    for _ in $(seq 50); do
      psql -X -q -h 127.0.0.1 -p "$port" -U bench -d postgres -c 'select 1' >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
}
