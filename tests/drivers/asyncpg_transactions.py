"""asyncpg through pgiam's transaction pooling, as an unmodified application would use it.

Usage: asyncpg_transactions.py HOST PORT DBNAME USER
Its own pool of connections (more than pgiam's backends) runs, at once: statements asyncpg
prepares itself (named), explicit prepared statements used across other connections'
transactions, transaction blocks, a cursor, executemany; each connection's release runs
asyncpg's reset (RESET ALL among it). Exits non-zero at the first wrong answer.
"""

import asyncio
import sys

import asyncpg

HOST, PORT, DBNAME, USER = sys.argv[1:5]
CONNECTIONS = 6
WORKERS = 12
ROUNDS = 40


def connect_args():
    return dict(host=HOST, port=int(PORT), database=DBNAME, user=USER, ssl=False, timeout=10)


async def worker(pool, i):
    for j in range(ROUNDS):
        async with pool.acquire() as c:
            v = await c.fetchval(f"SELECT $1::int + {i % 7}", j)
            assert v == j + i % 7, (v, j, i)
            rows = await c.fetch("SELECT g FROM generate_series(1, $1::int) g", i % 5 + 1)
            assert [r[0] for r in rows] == list(range(1, i % 5 + 2)), rows
            async with c.transaction():
                await c.execute("INSERT INTO tx_items VALUES ($1)", i * 1000 + j)
                n = await c.fetchval("SELECT count(*) FROM tx_items WHERE x = $1", i * 1000 + j)
                assert n == 1, n
            st = await c.prepare("SELECT $1::text || '-' || $2::text")
            assert await st.fetchval("a", str(i)) == f"a-{i}"


async def main():
    args = connect_args()
    c = await asyncpg.connect(**args)
    await c.execute("CREATE TABLE IF NOT EXISTS tx_items (x int)")
    # Prepared now, used after many other connections' transactions.
    doubled = await c.prepare("SELECT $1::int * 2")
    pool = await asyncpg.create_pool(min_size=CONNECTIONS, max_size=CONNECTIONS, **args)
    await asyncio.gather(*(worker(pool, i) for i in range(WORKERS)))
    assert await doubled.fetchval(21) == 42
    async with c.transaction():
        cur = await c.cursor("SELECT g FROM generate_series(1, 100) g")
        got = await cur.fetch(10)
        assert [r[0] for r in got] == list(range(1, 11)), got
    await c.executemany("INSERT INTO tx_items VALUES ($1)", [(k,) for k in range(100)])
    n = await c.fetchval("SELECT count(*) FROM tx_items")
    assert n == WORKERS * ROUNDS + 100, n
    await pool.close()
    await c.close()
    print("all checks passed", flush=True)


asyncio.run(main())
