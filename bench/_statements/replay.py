"""Run the statements a `declic serve` process ran (bench/_statements/sitecustomize.py, $DECLIC_STATEMENTS_LOG)
again, in the same order and transactions, on the bare sqlite3 cursor, and print as JSON the CPU and wall time
they took: what the rows Declic reads and writes cost SQLite and the disk with no Python around them. It also
says how many deliveries the copy has recorded as sent, as a check that the replay did the server's work.

    python bench/_statements/replay.py DATABASE LOG

DATABASE is a copy of the server's database taken when the log started (e2e.py takes it with SQLite's backup
API); the connection gets Declic's own settings (WAL, synchronous=FULL, foreign keys: gateway/store/db.py).
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import sys
import time

from declic_gateway.store.db import _sqlite_on_connect


def main() -> None:
    database, log = sys.argv[1], sys.argv[2]
    with open(log, "rb") as kept:
        statements = pickle.load(kept)
    conn = sqlite3.connect(database, isolation_level=None)
    _sqlite_on_connect(conn, None)
    cursor = conn.cursor()
    failed = 0
    cpu, wall = time.thread_time(), time.perf_counter()
    for kind, text, parameters in statements:
        if kind == "commit":
            if conn.in_transaction:
                conn.commit()
        elif kind == "rollback":
            if conn.in_transaction:
                conn.rollback()
        else:
            try:
                if kind == "many":
                    cursor.executemany(text, parameters)
                else:
                    cursor.execute(text, parameters)
                    cursor.fetchall()  # SQLAlchemy read what it returned; a statement is done when read
            except sqlite3.Error:
                failed += 1  # a replay that went another way than the server: said beside the figures
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    # The same work done: the sends the server recorded are recorded in the copy too.
    sent = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'sent'").fetchone()[0]
    conn.close()
    print(json.dumps({"cpu": cpu, "wall": wall, "statements": len(statements), "failed": failed, "sent": sent}))


if __name__ == "__main__":
    main()
