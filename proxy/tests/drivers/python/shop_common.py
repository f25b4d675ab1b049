"""What the Python shop applications share: the base time, seeded keys, and the final
dump of every table as the client reads it.

Timestamps the server made (DEFAULT now(), `now()` in an UPDATE) differ between two
runs, so the dump checks each against what the client was told (RETURNING) and that it
lies within the run, then replaces it by its rank among the column's values: rows
written in one transaction share one value, later transactions get later ones, in
both runs alike."""
import datetime as dt
import decimal
import uuid

BASE = dt.datetime(2024, 3, 30, 23, 15, 0, 250000, tzinfo=dt.timezone.utc)
STARTED = dt.datetime.now(dt.timezone.utc)

# Columns whose values the server's clock made.
SERVER_TIMES = {
    "users": ["created_at", "last_login"],
    "orders": ["placed_at"],
    "counters": ["updated_at"],
}

# Keys PostgreSQL's sequences made: through spillway they come from blocks it reserved,
# so they may differ from a direct run's (gaps are allowed, as PostgreSQL's own). The
# application names each row it created; the dump shows that name instead of the
# number, for the key and for the columns that refer to it.
IDENTITY = {"products": "id", "orders": "id", "order_lines": "id"}
REFERENCES = {"order_lines": {"order_id": "orders", "product_id": "products"}}

TABLES = {
    "users": "id",
    "products": "id",
    "orders": "id",
    "order_lines": "id",
    "counters": "name",
    "sessions": "key",
}


def rng_uuid(rng):
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def plain(v):
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return f"{v.days}d{v.seconds}s{v.microseconds}us"
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, memoryview)):
        return bytes(v).hex()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def dump(conn, seen, names):
    """Every table, ordered by key, through `conn` (a psycopg connection). `names`:
    per table with an identity key, the application's name of each key it made."""
    ended = dt.datetime.now(dt.timezone.utc)
    out = {}
    with conn.cursor() as cur:
        for table, key in TABLES.items():
            cur.execute(f"SELECT * FROM {table} ORDER BY {key}")
            cols = [d.name for d in cur.description]
            out[table] = [dict(zip(cols, row)) for row in cur.fetchall()]
    for table, columns in SERVER_TIMES.items():
        for column in columns:
            told = seen.get(f"{table}.{column}", {})
            values = sorted({r[column] for r in out[table] if r[column] is not None})
            for r in out[table]:
                v = r[column]
                if v is None:
                    continue
                key = str(r[TABLES[table]])
                if key in told and told[key] != v:
                    raise SystemExit(f"{table}.{column} of {key}: told {told[key]}, stored {v}")
                if not (STARTED - dt.timedelta(seconds=5) <= v <= ended + dt.timedelta(seconds=5)):
                    raise SystemExit(f"{table}.{column} of {key}: {v} is outside the run")
                r[column] = f"now#{values.index(v)}"
    for table, column in IDENTITY.items():
        for r in out[table]:
            r[column] = names[table][r[column]]
    for table, refs in REFERENCES.items():
        for column, target in refs.items():
            for r in out[table]:
                r[column] = names[target][r[column]]
    for table, column in IDENTITY.items():
        out[table].sort(key=lambda r: r[column])
    return {t: [{k: plain(v) for k, v in r.items()} for r in rows] for t, rows in out.items()}
