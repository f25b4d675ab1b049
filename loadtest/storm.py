#!/usr/bin/env python3
"""Connection storms against spillway (issue 18), standard library only.

1. `--connections N` clients connect at once, each as a driver with sslmode=prefer
   does (SSLRequest, then the StartupMessage in plain text after 'N'), and wait for
   the outcome: served (ReadyForQuery) or refused (an ErrorResponse and its SQLSTATE;
   `refused-at-accept` when it came instead of the SSLRequest's answer, which drivers
   report as a failed SSL negotiation rather than as "too many clients").
   All stay open until every one has its outcome, then all close.
2. `--vanish N` times, a client connects and goes away mid-startup (after nothing,
   after the SSLRequest, or after half a StartupMessage), several at once.
3. A fresh client must then be served.

spillway's RSS (`--pid`) is sampled before, every 50 ms during the storm (peak), and
after the clients closed (after a settle delay). Prints one JSON object; exits 1 when
a connection ended any other way than served or refused with 53300, or the fresh
client is not served.
"""

import argparse
import asyncio
import json
import resource
import struct
import sys
import time

SSL_REQUEST = struct.pack(">II", 8, 80877103)


def startup_message(user, database):
    body = struct.pack(">I", 196608)
    for k, v in (("user", user), ("database", database), ("application_name", "storm")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack(">I", len(body) + 4) + body


def rss_kib(pid):
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def sqlstate(body):
    for field in body.split(b"\0"):
        if field[:1] == b"C":
            return field[1:].decode(errors="replace")
    return "?"


async def read_message(reader):
    head = await reader.readexactly(5)
    tag, length = head[:1], struct.unpack(">I", head[1:])[0]
    body = await reader.readexactly(length - 4)
    return tag, body


async def one_client(host, port, user, database, timeout, hold, decided):
    """Returns 'served', 'refused:<SQLSTATE>' or 'failed:<why>'; once it knows, it
    appends that to `decided` and keeps the connection open until `hold` is set."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(SSL_REQUEST)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(1), timeout)
        if answer == b"E":
            # Refused before its SSLRequest was answered (spillway's refusals still
            # negotiating are at their bound): an ErrorResponse instead of 'N'.
            length = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), timeout))[0]
            body = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            outcome = f"refused-at-accept:{sqlstate(body)}"
            decided.append(outcome)
            await hold.wait()
            return outcome
        if answer != b"N":
            decided.append("failed")
            return f"failed:ssl answer {answer!r}"
        writer.write(startup_message(user, database))
        await writer.drain()
        while True:
            tag, body = await asyncio.wait_for(read_message(reader), timeout)
            if tag == b"Z":
                outcome = "served"
                break
            if tag == b"E":
                outcome = f"refused:{sqlstate(body)}"
                break
            if tag == b"R" and struct.unpack(">I", body[:4])[0] != 0:
                decided.append("failed")
                return "failed:authentication requested (use trust)"
        decided.append(outcome)
        await hold.wait()
        return outcome
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        decided.append("failed")
        return f"failed:{type(e).__name__}"
    finally:
        if writer is not None:
            writer.close()


async def vanish(host, port, user, database, i):
    """Connects and goes away mid-startup, in one of three places."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        if i % 3 >= 1:
            writer.write(SSL_REQUEST)
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 5)
        if i % 3 == 2:
            msg = startup_message(user, database)
            writer.write(msg[: len(msg) // 2])
            await writer.drain()
        writer.transport.abort()
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass


async def storm(args):
    hold = asyncio.Event()
    before = rss_kib(args.pid)
    peak = before or 0
    started = time.monotonic()
    decided = []
    tasks = [
        asyncio.create_task(one_client(args.host, args.port, args.user, args.database, args.timeout, hold, decided))
        for _ in range(args.connections)
    ]
    # Every client has its outcome once `decided` is full (the timeouts bound this).
    while len(decided) < args.connections:
        peak = max(peak, rss_kib(args.pid) or 0)
        await asyncio.sleep(0.05)
    at_peak = rss_kib(args.pid)
    peak = max(peak, at_peak or 0)
    hold.set()
    results = await asyncio.gather(*tasks)
    storm_seconds = time.monotonic() - started
    counts = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1

    for start in range(0, args.vanish, args.vanish_batch):
        await asyncio.gather(
            *(vanish(args.host, args.port, args.user, args.database, i) for i in range(start, min(args.vanish, start + args.vanish_batch)))
        )
        peak = max(peak, rss_kib(args.pid) or 0)

    await asyncio.sleep(args.settle)
    after = rss_kib(args.pid)
    fresh_hold = asyncio.Event()
    fresh_hold.set()
    fresh = await one_client(args.host, args.port, args.user, args.database, args.timeout, fresh_hold, [])
    return {
        "connections": args.connections,
        "outcomes": counts,
        "storm_seconds": round(storm_seconds, 2),
        "vanished": args.vanish,
        "fresh_client": fresh,
        "rss_kib": {"before": before, "peak": peak or None, "after": after},
    }


async def storms(args):
    """`--storms` storms one after the other: memory after each shows whether what a
    storm took is reused (bounded) or grows per storm."""
    runs = [await storm(args) for _ in range(args.storms)]
    result = dict(runs[-1])
    result["storms"] = args.storms
    result["rss_kib_after_each"] = [r["rss_kib"]["after"] for r in runs]
    result["rss_kib"] = {
        "before": runs[0]["rss_kib"]["before"],
        "peak": max((r["rss_kib"]["peak"] or 0) for r in runs) or None,
        "after": runs[-1]["rss_kib"]["after"],
    }
    merged = {}
    for r in runs:
        for k, v in r["outcomes"].items():
            merged[k] = merged.get(k, 0) + v
    result["outcomes"] = merged
    result["fresh_client"] = "served" if all(r["fresh_client"] == "served" for r in runs) else "not served"
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="bench")
    p.add_argument("--database", default="postgres")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--vanish", type=int, default=2000)
    p.add_argument("--vanish-batch", type=int, default=200)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--pid", type=int, help="spillway's process id, for RSS")
    p.add_argument("--storms", type=int, default=1, help="storms one after the other")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    result = asyncio.run(storms(args))
    print(json.dumps(result, sort_keys=True))
    bad = {k: v for k, v in result["outcomes"].items() if k not in ("served", "refused:53300")}
    sys.exit(1 if bad or result["fresh_client"] != "served" else 0)


if __name__ == "__main__":
    main()
