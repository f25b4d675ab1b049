"""psycopg 3 and the backend pid: the pid in BackendKeyData is PostgreSQL's, so the
server knows it (pg_stat_activity, pg_terminate_backend), and cancel still works.
Prints one JSON object of observations."""
import json
import sys
import threading
import time

import psycopg

url = sys.argv[1]
out = {}

with psycopg.connect(url, autocommit=True) as conn:
    pid = conn.info.backend_pid
    out["pid_is_pg_backend_pid"] = conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    out["rows_in_pg_stat_activity"] = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()[0]

    # Cancel from another thread while a query runs (libpq's PQcancel: a
    # CancelRequest with this connection's key).
    timer = threading.Timer(0.5, conn.cancel_safe)
    timer.start()
    started = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(20)")
        out["cancel"] = "not cancelled"
    except psycopg.Error as e:
        out["cancel"] = type(e).__name__
    out["cancel_within_10s"] = time.monotonic() - started < 10
    timer.join()
    out["usable_after_cancel"] = conn.execute("SELECT 1").fetchone()[0]

victim = psycopg.connect(url, autocommit=True)
with psycopg.connect(url, autocommit=True) as killer:
    out["terminated"] = killer.execute(
        "SELECT pg_terminate_backend(%s)", [victim.info.backend_pid]
    ).fetchone()[0]
time.sleep(0.3)
try:
    victim.execute("SELECT pg_backend_pid()")
    out["victim_after_terminate"] = "still answers"
except psycopg.OperationalError:
    # Which subclass (AdminShutdown, ConnectionFailure) is not this script's concern.
    out["victim_after_terminate"] = "OperationalError"
except psycopg.Error as e:
    out["victim_after_terminate"] = type(e).__name__
out["victim_closed"] = victim.closed
victim.close()

print(json.dumps(out, sort_keys=True))
