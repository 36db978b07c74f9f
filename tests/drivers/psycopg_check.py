"""psycopg 3 against PostgreSQL's own address, as an unmodified application would use it.

Usage: psycopg_check.py HOST PORT DBNAME USER SSLMODE CAFILE ROLE
(the password, if any, from PGPASSWORD). SSLMODE is disable, require or verify-full; CAFILE is
the root certificate for verify-full; ROLE is the current_user the session must have.
Prints one line per check and exits non-zero at the first failure.
"""

import asyncio
import hashlib
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

HOST, PORT, DBNAME, USER, SSLMODE, CAFILE, ROLE = sys.argv[1:8]
PARAMS = dict(host=HOST, port=PORT, dbname=DBNAME, user=USER, sslmode=SSLMODE, connect_timeout=10)
if SSLMODE == "verify-full":
    PARAMS["sslrootcert"] = CAFILE
CONNINFO = psycopg.conninfo.make_conninfo(**PARAMS)
ROWS = 2000


def fail(msg):
    print(f"FAIL psycopg {SSLMODE}: {msg}", flush=True)
    sys.exit(1)


def check(name, got, want):
    if got != want:
        fail(f"{name}: got {got!r}, want {want!r}")
    shown = repr(got)
    print(f"ok {name}: {shown if len(shown) <= 100 else shown[:97] + '...'}", flush=True)


def connect(**kw):
    return psycopg.connect(CONNINFO, **kw)


def wait_until_sleeping(monitor, pid):
    """Waits until backend `pid` is running pg_sleep, so that a cancel cannot come too early."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = monitor.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row and row[0] == "active" and "pg_sleep" in row[1]:
            return
        time.sleep(0.05)
    fail(f"backend {pid} never started its pg_sleep")


def expect_canceled(name, conn, cancel):
    """Runs pg_sleep(30) on `conn` while another thread, once it runs, calls `cancel()`."""
    errors_in_thread = []

    def canceller():
        try:
            with connect(autocommit=True) as monitor:
                wait_until_sleeping(monitor, conn.info.backend_pid)
            cancel()
        except Exception as e:  # reported by the main thread
            errors_in_thread.append(e)

    thread = threading.Thread(target=canceller)
    thread.start()
    started = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(30)")
        fail(f"{name}: pg_sleep(30) returned instead of being cancelled")
    except errors.QueryCanceled as e:
        check(f"{name}: SQLSTATE", e.sqlstate, "57014")
    finally:
        thread.join()
    if errors_in_thread:
        fail(f"{name}: {type(errors_in_thread[0]).__name__}: {errors_in_thread[0]}")
    elapsed = time.monotonic() - started
    if elapsed > 10:
        fail(f"{name}: the cancel took {elapsed:.1f} s")
    check(f"{name}: connection usable after", conn.execute("SELECT 41 + 1").fetchone()[0], 42)


def sync_checks():
    with connect(autocommit=True) as conn:
        check("current_user", conn.execute("SELECT current_user").fetchone()[0], ROLE)
        check("ssl in use", bool(conn.pgconn.ssl_in_use), SSLMODE != "disable")
        check(
            "pg_backend_pid() == info.backend_pid",
            conn.execute("SELECT pg_backend_pid()").fetchone()[0],
            conn.info.backend_pid,
        )
        check(
            "parameters",
            conn.execute("SELECT %s::int + %s::int, %s::text", (40, 2, "é")).fetchone(),
            (42, "é"),
        )

        # Pipeline mode: several statements sent before any result is read.
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
            conn.execute("CREATE TEMP TABLE pipe (i int)")
            conn.cursor().executemany("INSERT INTO pipe VALUES (%s)", [(i,) for i in range(100)])
            total = conn.execute("SELECT sum(i) FROM pipe")
        check("pipeline results", [c.fetchone()[0] for c in curs], [i * 2 for i in range(50)])
        check("pipeline executemany", total.fetchone()[0], sum(range(100)))

        # COPY FROM STDIN.
        conn.execute("CREATE TEMP TABLE copied (i int, s text)")
        with conn.cursor() as cur:
            with cur.copy("COPY copied (i, s) FROM STDIN") as copy:
                for i in range(ROWS):
                    copy.write_row((i, f"row {i}\ttab"))
            check("COPY FROM STDIN rowcount", cur.rowcount, ROWS)
        got = conn.execute(
            "SELECT count(*), sum(i), md5(string_agg(s, ',' ORDER BY i)) FROM copied"
        ).fetchone()
        want_md5 = hashlib.md5(",".join(f"row {i}\ttab" for i in range(ROWS)).encode()).hexdigest()
        check("COPY FROM STDIN contents", got, (ROWS, sum(range(ROWS)), want_md5))

        # COPY TO STDOUT, every row checked.
        with conn.cursor() as cur:
            with cur.copy(
                f"COPY (SELECT i, md5(i::text) FROM generate_series(1, {ROWS}) i) TO STDOUT"
            ) as copy:
                copy.set_types(["int4", "text"])
                rows = list(copy.rows())
        want = [(i, hashlib.md5(str(i).encode()).hexdigest()) for i in range(1, ROWS + 1)]
        check("COPY TO STDOUT rows", len(rows), ROWS)
        check("COPY TO STDOUT contents", rows == want, True)

        # Binary results and parameters.
        with conn.cursor(binary=True) as cur:
            cur.execute(
                "SELECT %b::int8, %b::text, %b::bytea, %b::float8, ARRAY[1, 2, 3]",
                (2**40, "bin", b"\x00\xff\x10", 1.5),
            )
            check("binary cursor result format", cur.pgresult.fformat(0), 1)
            check(
                "binary cursor values",
                cur.fetchone(),
                (2**40, "bin", b"\x00\xff\x10", 1.5, [1, 2, 3]),
            )

    # A server-side (named) cursor, in a transaction.
    with connect() as conn:
        with conn.cursor(name="drivers_named") as cur:
            cur.itersize = 100
            cur.execute("SELECT i FROM generate_series(1, %s) i", (ROWS,))
            first = cur.fetchmany(10)
            check("named cursor fetchmany", [r[0] for r in first], list(range(1, 11)))
            check(
                "named cursor exists on the server",
                conn.execute(
                    "SELECT count(*) FROM pg_cursors WHERE name = 'drivers_named'"
                ).fetchone()[0],
                1,
            )
            rest = sum(r[0] for r in cur)
            check("named cursor iteration", rest, sum(range(11, ROWS + 1)))
        conn.commit()

    # LISTEN/NOTIFY: the sender pid is the pid each connection was told.
    with connect(autocommit=True) as listener, connect(autocommit=True) as sender:
        listener.execute("LISTEN drivers_ch")
        sender.execute("NOTIFY drivers_ch, 'from the other'")
        listener.execute("NOTIFY drivers_ch, 'from myself'")
        got = [(n.channel, n.payload, n.pid) for n in listener.notifies(timeout=10, stop_after=2)]
        check(
            "notifications and sender pids",
            sorted(got),
            sorted(
                [
                    ("drivers_ch", "from the other", sender.info.backend_pid),
                    ("drivers_ch", "from myself", listener.info.backend_pid),
                ]
            ),
        )

    # Cancellation: the legacy PQcancel and libpq 18's PQcancelConn (inside TLS when in use).
    with connect(autocommit=True) as conn:
        expect_canceled("cancel()", conn, conn.cancel)
        expect_canceled("cancel_safe()", conn, lambda: conn.cancel_safe(timeout=10))

    # pg_terminate_backend of a connection's own reported pid ends that connection.
    with connect(autocommit=True) as admin:
        victim = connect(autocommit=True)
        pid = victim.info.backend_pid
        check("victim pid", victim.execute("SELECT pg_backend_pid()").fetchone()[0], pid)
        check(
            "pg_terminate_backend(victim's pid)",
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0],
            True,
        )
        try:
            victim.execute("SELECT 1")
            fail("the terminated connection still answered")
        except psycopg.OperationalError as e:
            check("terminated connection's error", (type(e).__name__, e.sqlstate), ("AdminShutdown", "57P01"))
        check("terminated connection closed", victim.closed, True)
        check(
            "backend gone",
            admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0],
            0,
        )


async def async_checks():
    async with await psycopg.AsyncConnection.connect(CONNINFO, autocommit=True) as conn:
        cur = await conn.execute("SELECT current_user, pg_backend_pid()")
        check("async current_user and pid", await cur.fetchone(), (ROLE, conn.info.backend_pid))
        async with conn.pipeline():
            curs = [await conn.execute("SELECT %s::text || 'x'", (str(i),)) for i in range(20)]
        check("async pipeline", [(await c.fetchone())[0] for c in curs], [f"{i}x" for i in range(20)])

        async def cancel_later():
            async with await psycopg.AsyncConnection.connect(CONNINFO, autocommit=True) as monitor:
                for _ in range(200):
                    cur = await monitor.execute(
                        "SELECT state, query FROM pg_stat_activity WHERE pid = %s",
                        (conn.info.backend_pid,),
                    )
                    row = await cur.fetchone()
                    if row and row[0] == "active" and "pg_sleep" in row[1]:
                        break
                    await asyncio.sleep(0.05)
                else:
                    fail("async: the backend never started its pg_sleep")
            await conn.cancel_safe(timeout=10)

        task = asyncio.create_task(cancel_later())
        started = time.monotonic()
        try:
            await conn.execute("SELECT pg_sleep(30)")
            fail("async cancel_safe(): pg_sleep(30) returned instead of being cancelled")
        except errors.QueryCanceled as e:
            check("async cancel_safe(): SQLSTATE", e.sqlstate, "57014")
        await task
        if time.monotonic() - started > 10:
            fail("async cancel_safe() took too long")
        cur = await conn.execute("SELECT 6 * 7")
        check("async connection usable after cancel", (await cur.fetchone())[0], 42)


try:
    sync_checks()
    asyncio.run(async_checks())
except Exception as e:
    traceback.print_exc()
    fail(f"{type(e).__name__}: {e}")
print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}) {SSLMODE}: all checks passed")
