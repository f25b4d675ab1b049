"""asyncpg through transaction pooling (issue 16): many connections at once on a small
pool, each using asyncpg's statement cache (named statements `__asyncpg_stmt_N__`,
prepared once per connection and reused across transactions), an explicit prepared
statement, a transaction, executemany and a statement that fails. Prints one JSON
object: per worker, the values it read, in order, and the error class it got."""
import asyncio
import json
import sys

import asyncpg

WORKERS = 12
ROUNDS = 15


async def worker(url, i):
    con = await asyncpg.connect(url)
    seen = []
    for r in range(ROUNDS):
        # The same text each round: asyncpg prepares it once and binds it after.
        seen.append(await con.fetchval("SELECT $1::int * 2 + $2::int", r, i))
        # A text every worker shares, and one of its own.
        seen.append(await con.fetchval("SELECT $1::int + 1000", r))
        seen.append(await con.fetchval(f"SELECT $1::int - {i}", r))
        await asyncio.sleep(0)
    stmt = await con.prepare("SELECT $1::text || '-' || $2::int")
    for r in range(5):
        seen.append(await stmt.fetchval(f"w{i}", r))
    async with con.transaction():
        await con.execute("INSERT INTO pooled_t VALUES ($1, $2)", 1000 + i, i)
        seen.append(await con.fetchval("SELECT v FROM pooled_t WHERE id = $1", 1000 + i))
    await con.executemany(
        "INSERT INTO pooled_t VALUES ($1, $2)",
        [(2000 + i * 10 + k, k) for k in range(3)],
    )
    seen.append(
        await con.fetchval(
            "SELECT count(*) FROM pooled_t WHERE id >= $1 AND id < $2",
            2000 + i * 10,
            2010 + i * 10,
        )
    )
    error = None
    try:
        await con.fetchval("SELECT 1 / $1::int", 0)
    except asyncpg.PostgresError as e:
        error = type(e).__name__
    # The connection goes on after the error, its statements intact.
    seen.append(await con.fetchval("SELECT $1::int * 2 + $2::int", 1, i))
    seen.append(await stmt.fetchval("after", i))
    await con.close()
    return {"seen": seen, "error": error}


async def main(url):
    results = await asyncio.gather(*(worker(url, i) for i in range(WORKERS)))
    print(json.dumps({"workers": results}))


asyncio.run(main(sys.argv[1]))
