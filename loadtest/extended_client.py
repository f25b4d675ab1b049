#!/usr/bin/env python3
"""A fixed number of point SELECTs in the extended protocol exactly as tokio-postgres'
query_typed sends them (the loadtest's `extended` mode): Parse of the unnamed
statement with the parameter type, Bind (binary int8 parameter, binary results),
Describe of the *statement*, Execute, Sync, in one write, then read to ReadyForQuery.
pgbench's extended mode describes the portal instead, so loadtest/instructions.sh
uses this client for that case. Standard library only; trust authentication only.

Usage: extended_client.py PORT REQUESTS [KEYS] [USER] [DATABASE]
Keys cycle through 1..KEYS (default 100). Exits non-zero on an ErrorResponse.
"""
import socket
import struct
import sys

SQL = b"SELECT balance FROM lt_accounts WHERE id = $1"
INT8_OID = 20


def message(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


def read_until_ready(sock, buf):
    """Reads messages until ReadyForQuery; returns the rest of the buffer."""
    while True:
        while len(buf) >= 5:
            tag = buf[0:1]
            (length,) = struct.unpack("!i", buf[1:5])
            if len(buf) < 1 + length:
                break
            body = buf[5 : 1 + length]
            buf = buf[1 + length :]
            if tag == b"E":
                sys.exit("ErrorResponse: " + body.decode(errors="replace"))
            if tag == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                sys.exit("the server asks for a password: use trust authentication")
            if tag == b"Z":
                return buf
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk


def main():
    port, requests = int(sys.argv[1]), int(sys.argv[2])
    keys = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    user = sys.argv[4] if len(sys.argv) > 4 else "bench"
    database = sys.argv[5] if len(sys.argv) > 5 else "postgres"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!i", 196608) + params
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    buf = read_until_ready(sock, b"")
    parse = message(b"P", b"\0" + SQL + b"\0" + struct.pack("!hi", 1, INT8_OID))
    describe = message(b"D", b"S\0")
    execute = message(b"E", b"\0" + struct.pack("!i", 0))
    sync = message(b"S", b"")
    for i in range(requests):
        key = struct.pack("!q", i % keys + 1)
        bind = message(
            b"B",
            b"\0\0" + struct.pack("!hhhi", 1, 1, 1, 8) + key + struct.pack("!hh", 1, 1),
        )
        sock.sendall(parse + bind + describe + execute + sync)
        buf = read_until_ready(sock, buf)
    sock.sendall(message(b"X", b""))
    sock.close()


if __name__ == "__main__":
    main()
