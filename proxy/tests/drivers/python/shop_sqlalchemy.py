"""A small shop on the SQLAlchemy 2 ORM over psycopg 3, as an application would write
it: users, products with a version column (optimistic locking), orders and their
lines, counters (upserts), sessions with jsonb and timestamps, bulk inserts and bulk
deletes. Run once through spillway and once directly; prints the final contents as the
client reads them (JSON), with server-made timestamps checked against what the client
was told and then replaced by their order. Usage: shop_sqlalchemy.py URL."""
import datetime as dt
import decimal
import json
import random
import sys
import uuid
from typing import Optional

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Identity,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    create_engine,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, REAL, DOUBLE_PRECISION
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from shop_common import BASE, dump, rng_uuid

URL = sys.argv[1].replace("postgresql://", "postgresql+psycopg://", 1)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(120))
    name: Mapped[str] = mapped_column(String(80))
    is_active: Mapped[bool] = mapped_column(server_default=text("true"))
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_login: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    sku: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(Text)
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    stock: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    weight: Mapped[Optional[float]] = mapped_column(REAL)
    rating: Mapped[Optional[float]] = mapped_column(DOUBLE_PRECISION)
    tags: Mapped[Optional[list]] = mapped_column(ARRAY(Text))
    added_on: Mapped[Optional[dt.date]] = mapped_column(Date)
    __mapper_args__ = {"version_id_col": version}


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(
        Enum("new", "paid", "shipped", "cancelled", name="order_status", create_type=False),
        server_default="new",
    )
    total: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2), server_default="0")
    note: Mapped[Optional[str]] = mapped_column(Text)
    placed_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    ship_by: Mapped[Optional[dt.date]] = mapped_column(Date)
    slot: Mapped[Optional[dt.time]] = mapped_column(Time)


class OrderLine(Base):
    __tablename__ = "order_lines"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    qty: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))


class Counter(Base):
    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class WebSession(Base):
    __tablename__ = "sessions"
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    data: Mapped[dict] = mapped_column(JSONB)
    user_id: Mapped[Optional[uuid.UUID]]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ttl: Mapped[Optional[dt.timedelta]] = mapped_column(Interval)
    token: Mapped[Optional[bytes]] = mapped_column(LargeBinary)


rng = random.Random(13)
# The session's time zone is not the server's: what the client sends without an
# offset is read in it.
engine = create_engine(URL, connect_args={"options": "-c timezone=Europe/Berlin"})
seen = {"users.created_at": {}, "orders.placed_at": {}}
names = {"products": {}, "orders": {}, "order_lines": {}}

# Users, in one transaction (insertmanyvalues; created_at comes back by RETURNING).
with Session(engine) as s:
    users = [
        User(id=rng_uuid(rng), email=f"user{i}@example.com", name=f"User {i}")
        for i in range(12)
    ]
    s.add_all(users)
    s.commit()
    for u in users:
        seen["users.created_at"][str(u.id)] = u.created_at
    user_ids = [u.id for u in users]

# The catalogue: identity keys, numeric, float4/float8, arrays, dates.
with Session(engine) as s:
    products = [
        Product(
            sku=f"SKU-{i:03}",
            name=f"Product {i}",
            price=decimal.Decimal(f"{rng.randint(100, 9999) / 100:.2f}"),
            stock=100,
            weight=rng.choice([0.1, 1.5, 2.25, None]),
            rating=rng.random() * 5,
            tags=["tag", f"t{i % 3}"] if i % 2 else [],
            added_on=BASE.date() + dt.timedelta(days=i),
        )
        for i in range(10)
    ]
    s.add_all(products)
    s.commit()
    catalogue = {p.id: p.price for p in products}
    for i, p in enumerate(products):
        names["products"][p.id] = f"p{i}"
product_ids = sorted(catalogue)

# Orders: the order and its lines in one transaction, no reads (prices from the
# catalogue the application loaded); then the stock, read and written with its
# version check (a read-modify-write transaction).
order_ids = []
for i in range(16):
    with Session(engine) as s:
        order = Order(
            user_id=user_ids[i % len(user_ids)],
            note=None if i % 3 else f"gift {i}",
            ship_by=BASE.date() + dt.timedelta(days=3 + i),
            slot=dt.time(9 + i % 8, 30),
        )
        s.add(order)
        s.flush()
        lines = []
        for j in range(1 + i % 3):
            pid = product_ids[(i + j) % len(product_ids)]
            lines.append(
                OrderLine(order_id=order.id, product_id=pid, qty=1 + j, unit_price=catalogue[pid])
            )
        s.add_all(lines)
        order.total = sum(l.unit_price * l.qty for l in lines)
        s.commit()
        seen["orders.placed_at"][str(order.id)] = order.placed_at
        order_ids.append(order.id)
        names["orders"][order.id] = f"o{i}"
        for j, l in enumerate(lines):
            names["order_lines"][l.id] = f"o{i}.{j}"
        wanted = [(l.product_id, l.qty) for l in lines]
    if i % 4 == 0:
        with Session(engine) as s:
            for pid, qty in wanted:
                p = s.get(Product, pid)
                p.stock -= qty
            s.commit()

# Counters: upserts in autocommit (ON CONFLICT on the primary key).
with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
    for i in range(24):
        name = ["page_views", "orders", "signups"][i % 3]
        stmt = pg_insert(Counter).values(name=name, value=1 + i % 2)
        stmt = stmt.on_conflict_do_update(
            index_elements=[Counter.name],
            set_={"value": Counter.value + stmt.excluded.value, "updated_at": func.now()},
        )
        c.execute(stmt)

# Sessions: created in bulk, then touched and expired, without reading them.
with Session(engine) as s:
    for i in range(10):
        s.add(
            WebSession(
                key=f"s{i:03}",
                data={"cart": [i, i + 1], "theme": "dark" if i % 2 else "light", "n": 1.5},
                user_id=user_ids[i % len(user_ids)] if i % 4 else None,
                created_at=BASE + dt.timedelta(minutes=i),
                # Aware in another zone, and naive (read in the session's time zone).
                expires_at=(BASE + dt.timedelta(days=1, minutes=i)).astimezone(
                    dt.timezone(dt.timedelta(hours=-5))
                )
                if i % 2
                else (BASE + dt.timedelta(days=1)).replace(tzinfo=None),
                ttl=dt.timedelta(days=1, seconds=i * 61),
                token=bytes([i, 255 - i, 0]) if i % 3 else None,
            )
        )
    s.commit()
with Session(engine) as s:
    for i in range(0, 10, 2):
        s.execute(
            update(WebSession)
            .where(WebSession.key == f"s{i:03}")
            .values(data={"cart": [], "seen": i}, expires_at=BASE + dt.timedelta(days=2))
        )
    s.execute(delete(WebSession).where(WebSession.key.in_(["s001", "s003", "s005"])))
    s.commit()

# Logins: last_login set by the server's clock; orders paid in bulk; a cancelled
# order's lines removed by their keys.
with Session(engine) as s:
    for uid in user_ids[:4]:
        s.execute(update(User).where(User.id == uid).values(last_login=func.now()))
    s.commit()
with Session(engine) as s:
    s.execute(update(Order).where(Order.id.in_(order_ids[::2])).values(status="paid"))
    s.commit()
with Session(engine) as s:
    cancelled = order_ids[1]
    doomed = [lid for lid in s.scalars(select(OrderLine.id).where(OrderLine.order_id == cancelled))]
    s.execute(delete(OrderLine).where(OrderLine.id.in_(doomed)))
    s.execute(update(Order).where(Order.id == cancelled).values(status="cancelled", total=0))
    s.commit()

with engine.connect() as c:
    print(json.dumps(dump(c.connection.dbapi_connection, seen, names), sort_keys=True))
engine.dispose()
