"""Every pinned Python driver connects and reads the same rows: psycopg 3, asyncpg,
SQLAlchemy 2 (over psycopg) and Django's ORM (over psycopg). Prints JSON."""
import asyncio
import json
import sys
from urllib.parse import urlsplit

import asyncpg
import django
import psycopg
import sqlalchemy
from django.conf import settings

url = sys.argv[1]
query = "SELECT g, md5(g::text) FROM generate_series(1, 3) g ORDER BY g"
out = {}

with psycopg.connect(url) as conn:
    out["psycopg"] = [list(r) for r in conn.execute(query)]


async def with_asyncpg():
    con = await asyncpg.connect(url)
    rows = [list(r) for r in await con.fetch(query)]
    await con.close()
    return rows


out["asyncpg"] = asyncio.run(with_asyncpg())

engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
with engine.connect() as conn:
    out["sqlalchemy"] = [list(r) for r in conn.execute(sqlalchemy.text(query))]
engine.dispose()

parts = urlsplit(url)
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": parts.username,
            "HOST": parts.hostname,
            "PORT": parts.port,
            "OPTIONS": {"sslmode": "disable"},
        }
    },
    USE_TZ=True,
)
django.setup()
from django.db import connection  # noqa: E402 (needs the settings above)

with connection.cursor() as cursor:
    cursor.execute(query)
    out["django"] = [list(r) for r in cursor.fetchall()]
connection.close()

out["versions"] = {
    "psycopg": psycopg.__version__,
    "asyncpg": asyncpg.__version__,
    "sqlalchemy": sqlalchemy.__version__,
    "django": django.get_version(),
}
print(json.dumps(out, sort_keys=True))
