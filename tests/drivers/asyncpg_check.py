"""asyncpg against PostgreSQL's own address, as an unmodified application would use it.

Usage: asyncpg_check.py HOST PORT DBNAME USER SSLMODE CAFILE ROLE
(the password, if any, from PGPASSWORD). SSLMODE is disable, require or verify-full; CAFILE is
the root certificate for verify-full; ROLE is the current_user the session must have.
Prints one line per check and exits non-zero at the first failure.
"""

import asyncio
import hashlib
import io
import ssl
import sys
import time
import traceback

import asyncpg

HOST, PORT, DBNAME, USER, SSLMODE, CAFILE, ROLE = sys.argv[1:8]
ROWS = 2000


def fail(msg):
    print(f"FAIL asyncpg {SSLMODE}: {msg}", flush=True)
    sys.exit(1)


def check(name, got, want):
    if got != want:
        fail(f"{name}: got {got!r}, want {want!r}")
    shown = repr(got)
    print(f"ok {name}: {shown if len(shown) <= 100 else shown[:97] + '...'}", flush=True)


def ssl_arg():
    if SSLMODE == "disable":
        return False
    if SSLMODE == "require":
        return "require"
    if SSLMODE == "verify-full":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=CAFILE)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx
    fail(f"unknown sslmode {SSLMODE}")


async def connect():
    return await asyncpg.connect(
        host=HOST, port=int(PORT), database=DBNAME, user=USER, ssl=ssl_arg(), timeout=10
    )


async def closed_cleanly(name, conn, quiet=False):
    try:
        await conn.close(timeout=10)
    except Exception as e:  # the regression: PermissionError [Errno 13] from close()
        fail(f"{name}: close() raised {type(e).__name__}: {e}")
    if not conn.is_closed():
        fail(f"{name}: not closed after close()")
    if not quiet:
        print(f"ok {name}: close() clean", flush=True)


async def main():
    conn = await connect()
    check("current_user", await conn.fetchval("SELECT current_user"), ROLE)
    check("ssl in use", conn._transport.get_extra_info("ssl_object") is not None,
          SSLMODE != "disable")
    check("pg_backend_pid() == get_server_pid()",
          await conn.fetchval("SELECT pg_backend_pid()"), conn.get_server_pid())

    rows = await conn.fetch(
        "SELECT i, $2::text || i AS s FROM generate_series(1, $1::int) i", 50, "n"
    )
    check("fetch with parameters", [(r["i"], r["s"]) for r in rows],
          [(i, f"n{i}") for i in range(1, 51)])

    stmt = await conn.prepare("SELECT $1::int * 3, $2::text")
    got = [tuple(await stmt.fetchrow(i, str(i))) for i in range(20)]
    check("prepared statement, 20 executions", got, [(i * 3, str(i)) for i in range(20)])
    check("prepared statement on the server",
          await conn.fetchval("SELECT count(*) FROM pg_prepared_statements "
                              "WHERE statement = 'SELECT $1::int * 3, $2::text'"), 1)

    await conn.execute("CREATE TEMP TABLE tx (i int)")
    async with conn.transaction():
        await conn.executemany("INSERT INTO tx VALUES ($1)", [(i,) for i in range(10)])
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO tx VALUES (100)")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    check("transaction committed, then one rolled back",
          await conn.fetchval("SELECT sum(i) FROM tx"), sum(range(10)))

    async with conn.transaction():
        total, n = 0, 0
        async for r in conn.cursor("SELECT i FROM generate_series(1, $1::int) i", ROWS, prefetch=100):
            total += r["i"]
            n += 1
        check("cursor in a transaction (iteration)", (n, total), (ROWS, sum(range(1, ROWS + 1))))
        cur = await conn.cursor("SELECT i FROM generate_series(1, 100) i")
        check("cursor in a transaction (fetch)", [r[0] for r in await cur.fetch(5)], [1, 2, 3, 4, 5])
        await cur.forward(10)
        check("cursor in a transaction (after forward)", await cur.fetchrow(), (16,))

    await conn.execute("CREATE TEMP TABLE copied (i int, s text)")
    records = [(i, f"row {i}\t{'x' * (i % 13)}") for i in range(ROWS)]
    result = await conn.copy_records_to_table("copied", records=records, columns=["i", "s"])
    check("copy_records_to_table", result, f"COPY {ROWS}")
    want_md5 = hashlib.md5(",".join(s for _, s in records).encode()).hexdigest()
    check("copied rows", tuple(await conn.fetchrow(
        "SELECT count(*), sum(i), md5(string_agg(s, ',' ORDER BY i)) FROM copied")),
        (ROWS, sum(range(ROWS)), want_md5))

    out = io.BytesIO()
    result = await conn.copy_from_query(
        "SELECT i, md5(i::text) FROM generate_series(1, $1::int) i", ROWS, output=out,
        format="csv")
    check("copy_from_query", result, f"COPY {ROWS}")
    want = "".join(f"{i},{hashlib.md5(str(i).encode()).hexdigest()}\n" for i in range(1, ROWS + 1))
    check("copy_from_query contents", out.getvalue().decode() == want, True)

    # LISTEN/NOTIFY: the sender pid is the pid each connection was told.
    got = asyncio.Queue()

    def on_notify(_conn, pid, channel, payload):
        got.put_nowait((channel, payload, pid))

    await conn.add_listener("drivers_ch", on_notify)
    other = await connect()
    await other.execute("NOTIFY drivers_ch, 'from the other'")
    await conn.execute("NOTIFY drivers_ch, 'from myself'")
    notes = [await asyncio.wait_for(got.get(), 10) for _ in range(2)]
    check("notifications and sender pids", sorted(notes), sorted([
        ("drivers_ch", "from the other", other.get_server_pid()),
        ("drivers_ch", "from myself", conn.get_server_pid()),
    ]))
    await conn.remove_listener("drivers_ch", on_notify)
    await closed_cleanly("second connection", other)

    # A query timeout: asyncpg sends a CancelRequest (inside TLS when the session uses it).
    started = time.monotonic()
    try:
        await conn.fetchval("SELECT pg_sleep(30)", timeout=1)
        fail("pg_sleep(30) returned instead of timing out")
    except asyncio.TimeoutError:
        pass
    check("query timeout", time.monotonic() - started < 5, True)
    started = time.monotonic()
    check("connection usable after the timeout", await conn.fetchval("SELECT 41 + 1"), 42)
    check("the server query was cancelled, not waited for", time.monotonic() - started < 5, True)

    await closed_cleanly("main connection", conn)

    # Many short sessions with queries, each closed: none may raise.
    n = 10
    answers = []
    for i in range(n):
        c = await connect()
        answers.append(await c.fetchval("SELECT $1::int + 1", i))
        await closed_cleanly(f"short session {i}", c, quiet=True)
    check(f"{n} short sessions, each closed cleanly", answers, list(range(1, n + 1)))

    print(f"asyncpg {asyncpg.__version__} {SSLMODE}: all checks passed")


try:
    asyncio.run(main())
except Exception as e:
    traceback.print_exc()
    fail(f"{type(e).__name__}: {e}")
