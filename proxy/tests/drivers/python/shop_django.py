"""The shop of shop_sqlalchemy.py on Django 5.2's ORM over psycopg 3: users, products
with a version column, orders and lines, counters (upserts), sessions with jsonb and
timestamps, bulk inserts (bulk_create) and deletes. Run once through spillway and once
directly; prints the final contents as the client reads them (JSON). Usage:
shop_django.py URL."""
import datetime as dt
import decimal
import json
import random
import sys
from urllib.parse import urlsplit

import django
import psycopg
from django.conf import settings

from shop_common import BASE, dump, rng_uuid

URL = sys.argv[1]
parts = urlsplit(URL)
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
    # Django sets the session's TimeZone to UTC (set_config) when the server's differs.
    USE_TZ=True,
    TIME_ZONE="Europe/Berlin",
    INSTALLED_APPS=["django.contrib.contenttypes"],
)
django.setup()
from django.contrib.postgres.fields import ArrayField  # noqa: E402
from django.db import connection, models, transaction  # noqa: E402
from django.db.models import F  # noqa: E402
from django.db.models.functions import Now  # noqa: E402

APP = "contenttypes"  # an installed app; the tables exist (managed = False)


class User(models.Model):
    id = models.UUIDField(primary_key=True)
    email = models.CharField(max_length=120)
    name = models.CharField(max_length=80)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(db_default=Now())
    last_login = models.DateTimeField(null=True)

    class Meta:
        app_label = APP
        db_table = "users"
        managed = False


class Product(models.Model):
    id = models.BigAutoField(primary_key=True)
    sku = models.CharField(max_length=32)
    name = models.TextField()
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.IntegerField()
    version = models.IntegerField()
    weight = models.FloatField(null=True)
    rating = models.FloatField(null=True)
    tags = ArrayField(models.TextField(), null=True)
    added_on = models.DateField(null=True)

    class Meta:
        app_label = APP
        db_table = "products"
        managed = False


class Order(models.Model):
    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(User, on_delete=models.DO_NOTHING, db_constraint=False)
    status = models.CharField(max_length=16, db_default="new")
    total = models.DecimalField(max_digits=12, decimal_places=2, default=0)
    note = models.TextField(null=True)
    placed_at = models.DateTimeField(db_default=Now())
    ship_by = models.DateField(null=True)
    slot = models.TimeField(null=True)

    class Meta:
        app_label = APP
        db_table = "orders"
        managed = False


class OrderLine(models.Model):
    id = models.BigAutoField(primary_key=True)
    order = models.ForeignKey(Order, on_delete=models.DO_NOTHING, db_constraint=False)
    product = models.ForeignKey(Product, on_delete=models.DO_NOTHING, db_constraint=False)
    qty = models.IntegerField()
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        app_label = APP
        db_table = "order_lines"
        managed = False


class Counter(models.Model):
    name = models.CharField(max_length=64, primary_key=True)
    value = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        app_label = APP
        db_table = "counters"
        managed = False


class WebSession(models.Model):
    key = models.CharField(max_length=40, primary_key=True)
    data = models.JSONField()
    user_id = models.UUIDField(null=True)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    ttl = models.DurationField(null=True)
    token = models.BinaryField(null=True)

    class Meta:
        app_label = APP
        db_table = "sessions"
        managed = False


rng = random.Random(13)
seen = {"users.created_at": {}, "orders.placed_at": {}}
names = {"products": {}, "orders": {}, "order_lines": {}}

# Users in bulk (bulk_create: INSERT … SELECT * FROM UNNEST in Django 5.2), then one
# more by save().
users = [
    User(id=rng_uuid(rng), email=f"user{i}@example.com", name=f"User {i}")
    for i in range(11)
]
User.objects.bulk_create(users)
extra = User(id=rng_uuid(rng), email="late@example.com", name="Late")
extra.save(force_insert=True)
users.append(extra)
for u in User.objects.filter(id__in=[u.id for u in users]):
    seen["users.created_at"][str(u.id)] = u.created_at
user_ids = [u.id for u in users]

# The catalogue.
products = Product.objects.bulk_create(
    [
        Product(
            sku=f"SKU-{i:03}",
            name=f"Product {i}",
            price=decimal.Decimal(f"{rng.randint(100, 9999) / 100:.2f}"),
            stock=100,
            version=1,
            weight=rng.choice([0.1, 1.5, 2.25, None]),
            rating=rng.random() * 5,
            tags=["tag", f"t{i % 3}"] if i % 2 else [],
            added_on=BASE.date() + dt.timedelta(days=i),
        )
        for i in range(10)
    ]
)
catalogue = {p.id: p.price for p in products}
for i, p in enumerate(products):
    names["products"][p.id] = f"p{i}"
product_ids = sorted(catalogue)

# Orders and their lines, each in a transaction; every fourth also takes the stock
# with a version check.
order_ids = []
for i in range(16):
    with transaction.atomic():
        order = Order.objects.create(
            user_id=user_ids[i % len(user_ids)],
            note=None if i % 3 else f"gift {i}",
            ship_by=BASE.date() + dt.timedelta(days=3 + i),
            slot=dt.time(9 + i % 8, 30),
        )
        lines = []
        for j in range(1 + i % 3):
            pid = product_ids[(i + j) % len(product_ids)]
            lines.append(
                OrderLine.objects.create(
                    order_id=order.id, product_id=pid, qty=1 + j, unit_price=catalogue[pid]
                )
            )
        Order.objects.filter(id=order.id).update(
            total=sum(l.unit_price * l.qty for l in lines)
        )
    order.refresh_from_db()
    seen["orders.placed_at"][str(order.id)] = order.placed_at
    order_ids.append(order.id)
    names["orders"][order.id] = f"o{i}"
    for j, l in enumerate(lines):
        names["order_lines"][l.id] = f"o{i}.{j}"
    if i % 4 == 0:
        with transaction.atomic():
            for l in lines:
                p = Product.objects.select_for_update().get(id=l.product_id)
                Product.objects.filter(id=p.id, version=p.version).update(
                    stock=p.stock - l.qty, version=p.version + 1
                )

# Counters: upserts (bulk_create with update_conflicts).
for i in range(24):
    name = ["page_views", "orders", "signups"][i % 3]
    Counter.objects.bulk_create(
        [Counter(name=name, value=1 + i % 2)],
        update_conflicts=True,
        unique_fields=["name"],
        update_fields=["value"],
    )

# Sessions: created in bulk, then touched and expired without reading them.
WebSession.objects.bulk_create(
    [
        WebSession(
            key=f"s{i:03}",
            data={"cart": [i, i + 1], "theme": "dark" if i % 2 else "light", "n": 1.5},
            user_id=user_ids[i % len(user_ids)] if i % 4 else None,
            created_at=BASE + dt.timedelta(minutes=i),
            expires_at=(BASE + dt.timedelta(days=1, minutes=i)).astimezone(
                dt.timezone(dt.timedelta(hours=-5))
            ),
            ttl=dt.timedelta(days=1, seconds=i * 61),
            token=bytes([i, 255 - i, 0]) if i % 3 else None,
        )
        for i in range(10)
    ]
)
for i in range(0, 10, 2):
    WebSession.objects.filter(key=f"s{i:03}").update(
        data={"cart": [], "seen": i}, expires_at=BASE + dt.timedelta(days=2)
    )
for key in ["s001", "s003", "s005"]:
    WebSession(key=key).delete()

# Logins by the server's clock; orders paid; a cancelled order's lines deleted.
for uid in user_ids[:4]:
    User.objects.filter(id=uid).update(last_login=Now())
Order.objects.filter(id__in=order_ids[::2]).update(status="paid")
cancelled = order_ids[1]
for line in list(OrderLine.objects.filter(order_id=cancelled)):
    line.delete()
Order.objects.filter(id=cancelled).update(status="cancelled", total=0)

connection.close()
with psycopg.connect(URL) as conn:
    print(json.dumps(dump(conn, seen, names), sort_keys=True))
