#!/usr/bin/env python3
"""Idle client connections (issue 16): memory each costs a pooler, standard library only.

Opens `--clients N` connections to 127.0.0.1:`--port`, `--batch` at a time, each logging
in with SCRAM-SHA-256 (or md5, or trust: whatever the server asks for) as `--user` with
`--password`, running `SELECT 1` once, then staying idle. The pooler's RSS
(`/proc/PID/status` VmRSS of every `--pid`) is read before the first connection, after
every `--sample` connections, and once all are idle (after `--settle` seconds); then
one more connection must be served. Prints one JSON object:
{"clients", "rss_kib": [[connected, kib], ...], "per_client_bytes", "last_served"}.
Exits 1 when a login failed or the last client was not served.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import time


def msg(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def startup(user, database):
    body = struct.pack(">I", 196608)
    for k, v in (("user", user), ("database", database), ("application_name", "idle")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    return struct.pack(">I", len(body) + 5) + body + b"\0"


async def read_msg(reader):
    head = await reader.readexactly(5)
    (length,) = struct.unpack(">I", head[1:])
    return head[:1], await reader.readexactly(length - 4)


def scram_first(user):
    nonce = base64.b64encode(os.urandom(18)).decode()
    bare = f"n=,r={nonce}"
    return nonce, bare, ("n,," + bare).encode()


def scram_final(password, bare, server_first):
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salt = base64.b64decode(attrs["s"])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    without_proof = "c=biws,r=" + attrs["r"]
    auth_msg = f"{bare},{server_first},{without_proof}".encode()
    sig = hmac.new(stored, auth_msg, hashlib.sha256).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig))).decode()
    return f"{without_proof},p={proof}".encode()


async def login(port, user, password, database):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(startup(user, database))
    bare = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        if tag == b"R":
            (code,) = struct.unpack(">I", body[:4])
            if code == 10:  # SASL
                _, bare, first = scram_first(user)
                mech = b"SCRAM-SHA-256\0"
                writer.write(msg(b"p", mech + struct.pack(">I", len(first)) + first))
            elif code == 11:  # SASL continue
                writer.write(msg(b"p", scram_final(password, bare, body[4:].decode())))
            elif code == 5:  # md5
                inner = hashlib.md5((password + user).encode()).hexdigest()
                outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                writer.write(msg(b"p", b"md5" + outer.encode() + b"\0"))
            elif code == 3:  # cleartext
                writer.write(msg(b"p", password.encode() + b"\0"))
        elif tag == b"Z":
            break
    writer.write(msg(b"Q", b"SELECT 1\0"))
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        if tag == b"Z":
            return reader, writer


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, action="append", required=True)
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--sample", type=int, default=1000)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--user", default="bench")
    p.add_argument("--password", default="bench-password")
    p.add_argument("--database", default="postgres")
    a = p.parse_args()
    samples = [[0, rss_kib(a.pid)]]
    conns = []
    start = time.monotonic()
    while len(conns) < a.clients:
        n = min(a.batch, a.clients - len(conns))
        got = await asyncio.gather(
            *(login(a.port, a.user, a.password, a.database) for _ in range(n)),
            return_exceptions=True,
        )
        for g in got:
            if isinstance(g, BaseException):
                print(f"login failed after {len(conns)} clients: {g}", file=sys.stderr)
                sys.exit(1)
            conns.append(g)
        if len(conns) % a.sample == 0:
            samples.append([len(conns), rss_kib(a.pid)])
    await asyncio.sleep(a.settle)
    samples.append([len(conns), rss_kib(a.pid)])
    served = True
    try:
        _, w = await asyncio.wait_for(login(a.port, a.user, a.password, a.database), 10)
        w.close()
    except Exception as e:  # noqa: BLE001 - any failure means not served
        print(f"the last client was not served: {e}", file=sys.stderr)
        served = False
    per = (samples[-1][1] - samples[0][1]) * 1024 / max(len(conns), 1)
    print(json.dumps({
        "clients": len(conns),
        "seconds": round(time.monotonic() - start, 1),
        "rss_kib": samples,
        "per_client_bytes": round(per),
        "last_served": served,
    }))
    for _, w in conns:
        w.close()
    sys.exit(0 if served else 1)


asyncio.run(main())
