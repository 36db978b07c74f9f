// pgJDBC against PostgreSQL's own address, as an unmodified application would use it.
//
// Usage: java -cp /usr/share/java/postgresql.jar JdbcCheck.java URL ROLE
// (the password, if any, from PGPASSWORD). ROLE is the current_user the session must have.
// Prints one line per check and exits non-zero at the first failure.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Arrays;
import java.util.Objects;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;

public class JdbcCheck {
    static String url;

    static void fail(String msg) {
        System.out.println("FAIL jdbc " + url + ": " + msg);
        System.out.flush();
        System.exit(1);
    }

    static void check(String name, Object got, Object want) {
        if (!Objects.deepEquals(got, want)) {
            fail(name + ": got " + show(got) + ", want " + show(want));
        }
        String shown = show(got);
        System.out.println("ok " + name + ": " + (shown.length() <= 100 ? shown : shown.substring(0, 97) + "..."));
    }

    static String show(Object o) {
        if (o instanceof int[]) {
            return Arrays.toString((int[]) o);
        }
        return String.valueOf(o);
    }

    static Object one(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            if (!rs.next()) {
                fail("no row from " + sql);
            }
            return rs.getObject(1);
        }
    }

    static Connection connect() throws SQLException {
        Properties props = new Properties();
        String password = System.getenv("PGPASSWORD");
        if (password != null) {
            props.setProperty("password", password);
        }
        props.setProperty("connectTimeout", "10");
        return DriverManager.getConnection(url, props);
    }

    public static void main(String[] args) {
        url = args[0];
        try {
            checks(args[1]);
        } catch (Exception e) {
            e.printStackTrace(System.out);
            fail(e.toString());
        }
    }

    static void checks(String role) throws Exception {
        try (Connection c = connect()) {
            check("current_user", one(c, "SELECT current_user"), role);
            int pid = ((PGConnection) c).getBackendPID();
            check("getBackendPID() == pg_backend_pid()", one(c, "SELECT pg_backend_pid()"), pid);

            // A PreparedStatement run again and again: from the 5th execution pgJDBC uses a
            // named server-side statement.
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2, ?::text || 'x'")) {
                for (int i = 0; i < 12; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "v" + i);
                    try (ResultSet rs = ps.executeQuery()) {
                        if (!rs.next() || rs.getInt(1) != i * 2 || !rs.getString(2).equals("v" + i + "x")) {
                            fail("prepared statement, execution " + i + ": wrong answer");
                        }
                    }
                }
                check("prepared statement, 12 executions, server-prepared",
                        ps.unwrap(PGStatement.class).isUseServerPrepare(), true);
                check("named statement on the server",
                        one(c, "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int * 2%'"),
                        1L);
            }

            try (Statement st = c.createStatement()) {
                st.execute("CREATE TEMP TABLE batch (i int, s text)");
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO batch VALUES (?, ?)")) {
                for (int i = 0; i < 500; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row " + i);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                int[] ones = new int[500];
                Arrays.fill(ones, 1);
                check("batch insert update counts", counts, ones);
            }
            check("batch rows", one(c, "SELECT count(*) || ' ' || sum(i) FROM batch"), "500 124750");

            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO batch VALUES (1000, 'committed')");
                c.commit();
                st.executeUpdate("INSERT INTO batch VALUES (2000, 'rolled back')");
                check("inside the transaction", one(c, "SELECT count(*) FROM batch WHERE i >= 1000"), 2L);
                c.rollback();
            }
            c.setAutoCommit(true);
            check("after commit and rollback", one(c, "SELECT string_agg(s, ',') FROM batch WHERE i >= 1000"), "committed");

            // Statement.cancel() from another thread, once the statement runs.
            try (Statement st = c.createStatement()) {
                Thread canceller = new Thread(() -> {
                    try (Connection monitor = connect();
                            PreparedStatement q = monitor.prepareStatement(
                                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ? AND state = 'active' AND query LIKE '%pg_sleep%'")) {
                        q.setInt(1, pid);
                        for (int i = 0; ; i++) {
                            try (ResultSet rs = q.executeQuery()) {
                                rs.next();
                                if (rs.getLong(1) == 1) {
                                    break;
                                }
                            }
                            if (i == 200) {
                                fail("the backend never started its pg_sleep");
                            }
                            Thread.sleep(50);
                        }
                        st.cancel();
                    } catch (Exception e) {
                        fail("cancel(): " + e);
                    }
                });
                long started = System.nanoTime();
                canceller.start();
                try {
                    st.execute("SELECT pg_sleep(30)");
                    fail("pg_sleep(30) returned instead of being cancelled");
                } catch (SQLException e) {
                    check("Statement.cancel(): SQLState", e.getSQLState(), "57014");
                }
                canceller.join();
                long ms = (System.nanoTime() - started) / 1_000_000;
                check("cancelled within 10 s", ms < 10_000, true);
            }
            check("usable after the cancel", one(c, "SELECT 41 + 1"), 42);
        }
        System.out.println("pgJDBC " + org.postgresql.util.DriverInfo.DRIVER_VERSION + " " + url + ": all checks passed");
    }
}
