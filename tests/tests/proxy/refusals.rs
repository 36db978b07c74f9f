//! Identities without a mapping, and startups that try to choose their own role, never reach
//! PostgreSQL.

use std::process::Command;

use crate::fixture::*;

#[test]
fn unmapped_identity_is_refused_before_any_upstream_connection() {
    let env = Env::start();
    // Warm up: one mapped session proves the path works and the log counts connections.
    psql_ok(&env.unix_dsn(""), "select 1");
    let before = env.connections_received();
    assert!(before >= 1);

    // The same psql binary, run as another OS user that no mapping names.
    let out = Command::new(pgiam_tests::pg_bin_dir().join("psql"))
        .args(["-X", "-c", "select 1", &env.unix_dsn("")])
        .env("PGCONNECT_TIMEOUT", "10")
        .pipe_as("nobody")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("no database role is mapped"), "{err}");
    assert!(
        err.contains("uid=65534"),
        "the client is told who pgiam thinks it is: {err}"
    );

    // Over TCP too (identity from /proc).
    let out = Command::new(pgiam_tests::pg_bin_dir().join("psql"))
        .args(["-X", "-c", "select 1", &env.tcp_dsn("sslmode=disable")])
        .pipe_as("nobody")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("no database role is mapped"),
        "{}",
        stderr(&out)
    );

    // A mapped identity asking for another database is refused the same way.
    let out = psql(&env.tcp_dsn("dbname=postgres sslmode=disable"), "select 1");
    assert!(
        stderr(&out).contains("no database role is mapped"),
        "{}",
        stderr(&out)
    );

    // Raw: SQLSTATE 28000.
    let mut raw = Raw::connect(env.tcp);
    raw.send(&Raw::startup_bytes(
        3 << 16,
        &[("user", "x"), ("database", "postgres")],
    ));
    assert_eq!(raw.expect_fatal().0, "28000");

    assert_eq!(
        env.connections_received(),
        before,
        "PostgreSQL must see no connection for a refused identity"
    );
    assert!(env.pgiam.log().contains("session refused: no mapping"));
}

#[test]
fn role_changes_and_replication_at_startup_are_refused() {
    let env = Env::start();
    psql_ok(&env.tcp_dsn(""), "select 1");
    let before = env.connections_received();
    for options in [
        "options='-c role=postgres'",
        "options='-c session_authorization=postgres'",
        "options='--role=postgres'",
        "options=-cROLE=postgres",
        "replication=database",
    ] {
        let out = psql(
            &env.tcp_dsn(&format!("sslmode=disable {options}")),
            "select current_user",
        );
        assert!(!out.status.success(), "{options} must be refused");
        let err = stderr(&out);
        assert!(err.contains("not allowed"), "{options}: {err}");
    }
    // A startup parameter named like the GUC itself.
    let mut raw = Raw::connect(env.tcp);
    raw.send(&Raw::startup_bytes(
        3 << 16,
        &[("user", "x"), ("database", DB), ("role", "postgres")],
    ));
    assert_eq!(raw.expect_fatal().0, "42501");
    assert_eq!(env.connections_received(), before);

    // Harmless settings still pass: the server applies them.
    assert_eq!(
        psql_ok(&env.tcp_dsn("options='-c work_mem=7MB'"), "show work_mem"),
        "7MB"
    );
    // A search_path chosen at startup is the session's (names are authorized against every
    // schema it names); without one the server uses pgiam's, never a role's default.
    assert_eq!(
        psql_ok(
            &env.tcp_dsn("options='-c search_path=pg_catalog'"),
            "show search_path"
        ),
        "pg_catalog"
    );
    assert_eq!(psql_ok(&env.tcp_dsn(""), "show search_path"), "public");
}

trait RunAs {
    fn pipe_as(&mut self, user: &str) -> &mut Self;
}

impl RunAs for Command {
    fn pipe_as(&mut self, user: &str) -> &mut Self {
        pgiam_tests::run_as(self, user);
        self
    }
}
