"""psycopg 3 LISTEN/NOTIFY through transaction pooling: an autocommit connection
LISTENs (psycopg runs it through the extended protocol), another NOTIFYs, and the
listener reads with conn.notifies(); a second channel is UNLISTENed and gets nothing.
Then LISTEN inside a transaction (psycopg's default, not autocommit) still delivers.
Prints JSON."""
import json
import sys

import psycopg


def main(url):
    out = {}
    listener = psycopg.connect(url, autocommit=True)
    sender = psycopg.connect(url, autocommit=True)
    listener.execute("LISTEN psy_chan")
    listener.execute("LISTEN psy_other")
    listener.execute("UNLISTEN psy_other")
    sender.execute("NOTIFY psy_other, 'not for you'")
    sender.execute("SELECT pg_notify('psy_chan', 'hello psycopg')")
    got = [
        (n.channel, n.payload, n.pid == sender.info.backend_pid)
        for n in listener.notifies(timeout=5, stop_after=1)
    ]
    out["autocommit"] = got
    # Nothing more arrives (the UNLISTENed channel).
    out["after"] = [n.payload for n in listener.notifies(timeout=0.5)]

    in_tx = psycopg.connect(url)  # not autocommit: LISTEN runs in a transaction
    in_tx.execute("LISTEN psy_tx")
    in_tx.commit()
    sender.execute("NOTIFY psy_tx, 'in a transaction'")
    out["in_transaction"] = [
        n.payload for n in in_tx.notifies(timeout=5, stop_after=1)
    ]
    for c in (listener, sender, in_tx):
        c.close()
    print(json.dumps(out, sort_keys=True))


main(sys.argv[1])
