"""asyncpg's listener: a session that LISTENs and NOTIFYs itself gets the
notification with its own server pid (asyncpg's test_listeners). Also a query
cancelled by a timeout (asyncpg sends a CancelRequest with its key). Prints JSON."""
import asyncio
import json
import sys
import time

import asyncpg


async def main(url):
    out = {}
    con = await asyncpg.connect(url)
    got = asyncio.get_running_loop().create_future()

    def listener(connection, pid, channel, payload):
        if not got.done():
            got.set_result((pid, channel, payload))

    await con.add_listener("spillway_chan", listener)
    await con.execute("NOTIFY spillway_chan, 'hello'")
    pid, channel, payload = await asyncio.wait_for(got, 10)
    out["notification_pid_is_own"] = pid == con.get_server_pid()
    out["notification_pid_is_pg_backend_pid"] = pid == await con.fetchval(
        "SELECT pg_backend_pid()"
    )
    out["channel"] = channel
    out["payload"] = payload
    await con.remove_listener("spillway_chan", listener)

    started = time.monotonic()
    try:
        await con.fetchval("SELECT pg_sleep(20)", timeout=0.5)
        out["timeout"] = "not cancelled"
    except asyncio.TimeoutError:
        out["timeout"] = "TimeoutError"
    out["cancel_within_10s"] = time.monotonic() - started < 10
    out["usable_after_cancel"] = await con.fetchval("SELECT 1")
    # The server is no longer running the cancelled query.
    out["sleeping_after_cancel"] = await con.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' "
        "AND state = 'active'"
    )
    await con.close()
    print(json.dumps(out, sort_keys=True))


asyncio.run(main(sys.argv[1]))
