// pgJDBC through pgiam's transaction pooling, as an unmodified application would use it.
//
// Usage: java -cp postgresql.jar JdbcTransactions.java JDBC_URL
// Six connections (more than pgiam's backends) in threads: statements reused until pgJDBC
// prepares them on the server (prepareThreshold, named S_n by each connection alike, for
// different SQL), transactions (autocommit off), batches. Exits non-zero at the first wrong
// answer.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcTransactions {
    static final int CONNECTIONS = 6;
    static final int ROUNDS = 30;

    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection c = DriverManager.getConnection(url)) {
            c.createStatement().execute("CREATE TABLE IF NOT EXISTS tx_jdbc (x int)");
        }
        ExecutorService pool = Executors.newFixedThreadPool(CONNECTIONS);
        List<Future<?>> done = new ArrayList<>();
        for (int i = 0; i < CONNECTIONS; i++) {
            final int w = i;
            done.add(pool.submit(() -> {
                work(url, w);
                return null;
            }));
        }
        for (Future<?> f : done) {
            f.get();
        }
        pool.shutdown();
        try (Connection c = DriverManager.getConnection(url);
             ResultSet r = c.createStatement().executeQuery("SELECT count(*) FROM tx_jdbc WHERE x >= 0")) {
            r.next();
            check("total", r.getInt(1), CONNECTIONS * ROUNDS);
        }
        System.out.println("all checks passed");
    }

    static void work(String url, int w) throws SQLException {
        try (Connection c = DriverManager.getConnection(url);
             // Each connection's first statements get the same server names, for other SQL.
             PreparedStatement add = c.prepareStatement("SELECT ?::int + " + w);
             PreparedStatement insert = c.prepareStatement("INSERT INTO tx_jdbc VALUES (?)");
             PreparedStatement count = c.prepareStatement("SELECT count(*) FROM tx_jdbc WHERE x = ?")) {
            for (int j = 0; j < ROUNDS; j++) {
                add.setInt(1, j);
                try (ResultSet r = add.executeQuery()) {
                    r.next();
                    check("add", r.getInt(1), j + w);
                }
                c.setAutoCommit(false);
                insert.setInt(1, w * 1000 + j);
                insert.executeUpdate();
                count.setInt(1, w * 1000 + j);
                try (ResultSet r = count.executeQuery()) {
                    r.next();
                    check("count", r.getInt(1), 1);
                }
                c.commit();
                c.setAutoCommit(true);
            }
            try (PreparedStatement batch = c.prepareStatement("INSERT INTO tx_jdbc VALUES (?)")) {
                for (int k = 1; k <= 3; k++) {
                    batch.setInt(1, -k);
                    batch.addBatch();
                }
                batch.executeBatch();
            }
        }
    }

    static void check(String what, int got, int want) {
        if (got != want) {
            System.out.println("FAIL " + what + ": got " + got + ", want " + want);
            System.exit(1);
        }
    }
}
