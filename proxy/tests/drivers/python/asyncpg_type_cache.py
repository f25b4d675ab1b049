"""asyncpg's own type-cache invalidation scenarios (its test_cache_invalidation.py):
DDL on a composite type a table uses, then the same prepared SELECT again. Prints one
JSON object: each scenario's steps as "ok <row>" or "err <exception class>"."""
import asyncio
import json
import os
import sys

import asyncpg


async def step(steps, call):
    try:
        steps.append("ok " + repr(tuple(await call())))
    except Exception as e:  # the class is what the scenarios compare
        steps.append("err " + type(e).__name__)


async def fresh(con):
    await con.execute("DROP TABLE IF EXISTS tab1; DROP TYPE IF EXISTS typ1")
    await con.execute("CREATE TYPE typ1 AS (x int, y int)")
    await con.execute("CREATE TABLE tab1(a int, b typ1)")
    await con.execute("INSERT INTO tab1 VALUES (1, (2, 3))")


async def in_transaction(url):
    con = await asyncpg.connect(url)
    await fresh(con)
    steps = []
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    async with con.transaction():
        await con.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
        await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
        await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.close()
    return steps


async def in_cancelled_transaction(url):
    con = await asyncpg.connect(url)
    await fresh(con)
    steps = []
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    try:
        async with con.transaction():
            await con.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
            await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
            await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
            raise UserWarning  # ROLLBACK
    except UserWarning:
        pass
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.close()
    return steps


async def autocommit(url):
    con = await asyncpg.connect(url)
    await fresh(con)
    steps = []
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.execute("ALTER TYPE typ1 DROP ATTRIBUTE x")
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.close()
    return steps


async def other_session(url):
    """The DDL comes from another connection (asyncpg's pool scenario)."""
    con = await asyncpg.connect(url)
    other = await asyncpg.connect(url)
    await fresh(con)
    steps = []
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await other.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await other.close()
    await con.close()
    return steps


async def table_type_changed(url):
    """ALTER TABLE … SET DATA TYPE: PostgreSQL refuses the prepared statement inside a
    transaction ("cached plan must not change result type")."""
    con = await asyncpg.connect(url)
    await con.execute("DROP TABLE IF EXISTS tab1; DROP TYPE IF EXISTS typ1")
    await con.execute("CREATE TABLE tab1(a int, b int)")
    await con.execute("INSERT INTO tab1 VALUES (1, 2)")
    steps = []
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.execute("ALTER TABLE tab1 ALTER COLUMN b SET DATA TYPE text")
    try:
        async with con.transaction():
            await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    except Exception as e:
        steps.append("tx " + type(e).__name__)
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.close()
    return steps


async def prepared(url):
    """One prepared statement kept across the type change (asyncpg's
    test_prepared_type_cache_invalidation)."""
    con = await asyncpg.connect(url)
    await fresh(con)
    steps = []
    prep = await con._prepare("SELECT * FROM tab1", use_cache=True)
    await step(steps, lambda: prep.fetchrow())
    await step(steps, lambda: prep.fetchrow())
    try:
        async with con.transaction():
            await con.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
            await step(steps, lambda: prep.fetchrow())
            await step(steps, lambda: prep.fetchrow())
            prep = await con._prepare("SELECT * FROM tab1", use_cache=True)
            await step(steps, lambda: prep.fetchrow())
            raise UserWarning  # ROLLBACK
    except UserWarning:
        pass
    await step(steps, lambda: prep.fetchrow())
    prep = await con._prepare("SELECT * FROM tab1", use_cache=True)
    await step(steps, lambda: prep.fetchrow())
    await con.close()
    return steps


async def change_attr(url):
    con = await asyncpg.connect(url)
    await fresh(con)
    steps = []
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.execute("ALTER TYPE typ1 DROP ATTRIBUTE y")
    await con.execute("ALTER TYPE typ1 ADD ATTRIBUTE y bigint")
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con.fetchrow("SELECT * FROM tab1"))
    await con.close()
    return steps


async def two_databases(url):
    """The same schema in a second database; DDL in both (asyncpg's pool scenario)."""
    con = await asyncpg.connect(url)
    # A name of its own: spillway keeps a service connection to every database its
    # clients used, which a DROP DATABASE would wait for.
    name = "typdb_%d" % os.getpid()
    await con.execute("CREATE DATABASE " + name)
    other_url = url.replace("/postgres?", "/%s?" % name)
    await fresh(con)
    con1 = await asyncpg.connect(url)
    con2 = await asyncpg.connect(url)
    chk = await asyncpg.connect(other_url)
    await fresh(chk)
    steps = []
    for c in (con1, con2, chk):
        await step(steps, lambda: c.fetchrow("SELECT * FROM tab1"))
        await step(steps, lambda: c.fetchrow("SELECT * FROM tab1"))
    await con.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
    await chk.execute("ALTER TYPE typ1 ADD ATTRIBUTE c text")
    await step(steps, lambda: con1.fetchrow("SELECT * FROM tab1"))
    async with con2.transaction():
        await step(steps, lambda: con2.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: con1.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: chk.fetchrow("SELECT * FROM tab1"))
    await step(steps, lambda: chk.fetchrow("SELECT * FROM tab1"))
    for c in (con1, con2, chk):
        await c.close()
    await con.close()
    return steps


async def main(url):
    out = {}
    for scenario in (in_transaction, in_cancelled_transaction, autocommit, other_session,
                     table_type_changed, prepared, change_attr, two_databases):
        out[scenario.__name__] = await scenario(url)
    print(json.dumps(out))


asyncio.run(main(sys.argv[1]))
