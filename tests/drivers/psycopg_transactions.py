"""psycopg 3 through pgiam's transaction pooling, as an unmodified application would use it.

Usage: psycopg_transactions.py HOST PORT DBNAME USER
Six connections (more than pgiam's backends) in threads, each preparing every statement
(prepare_threshold=0: psycopg names them itself), in transaction blocks, in pipeline mode, and
with executemany. Exits non-zero at the first wrong answer.
"""

import sys
import threading

import psycopg

HOST, PORT, DBNAME, USER = sys.argv[1:5]
DSN = f"host={HOST} port={PORT} dbname={DBNAME} user={USER} sslmode=disable"
CONNECTIONS = 6
ROUNDS = 30
errors = []


def worker(i):
    try:
        with psycopg.connect(DSN, prepare_threshold=0, autocommit=True) as c:
            for j in range(ROUNDS):
                v = c.execute("SELECT %s::int + %s", (j, i), prepare=True).fetchone()[0]
                assert v == i + j, (v, i, j)
                with c.transaction():
                    c.execute("INSERT INTO tx_psycopg VALUES (%s)", (i * 1000 + j,))
                    n = c.execute(
                        "SELECT count(*) FROM tx_psycopg WHERE x = %s", (i * 1000 + j,)
                    ).fetchone()[0]
                    assert n == 1, n
                with c.pipeline():
                    first = c.execute("SELECT %s::text", (f"p{i}",))
                    second = c.execute("SELECT %s::int * 3", (j,))
                assert first.fetchone()[0] == f"p{i}"
                assert second.fetchone()[0] == j * 3
                with c.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO tx_psycopg VALUES (%s)", [(-k - 1,) for k in range(3)]
                    )
    except Exception as e:  # reported below, with which connection saw it
        errors.append(f"connection {i}: {type(e).__name__}: {e}")


with psycopg.connect(DSN, autocommit=True) as c:
    c.execute("CREATE TABLE IF NOT EXISTS tx_psycopg (x int)")
threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print("\n".join(errors), flush=True)
    sys.exit(1)
with psycopg.connect(DSN, autocommit=True) as c:
    n = c.execute("SELECT count(*) FROM tx_psycopg WHERE x >= 0").fetchone()[0]
    assert n == CONNECTIONS * ROUNDS, n
print("all checks passed", flush=True)
