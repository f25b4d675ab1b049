"""Connecting with sslmode=prefer to a server that is out of connection slots: the
refusal must be "too many clients" (53300), not a failed SSL upgrade. Prints what
psycopg and asyncpg report, as JSON."""
import asyncio
import json
import sys

import asyncpg
import psycopg

url = sys.argv[1]
out = {}

try:
    psycopg.connect(url, sslmode="prefer").close()
    out["psycopg"] = "connected"
except psycopg.Error as e:
    # libpq keeps no SQLSTATE for a refused connection, only the server's message.
    said = "too many" if "too many client" in str(e) else repr(str(e))
    out["psycopg"] = "%s %s" % (type(e).__name__, said)


async def with_asyncpg():
    try:
        con = await asyncpg.connect(url, ssl="prefer")
        await con.close()
        return "connected"
    except Exception as e:  # the class is what the test checks
        return "%s %s" % (type(e).__name__, getattr(e, "sqlstate", None))


out["asyncpg"] = asyncio.run(with_asyncpg())
print(json.dumps(out, sort_keys=True))
