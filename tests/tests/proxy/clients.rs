//! Real clients through both listeners: the database sees the mapped role.

use crate::fixture::*;

#[test]
fn psql_through_unix_and_tcp_is_the_mapped_role() {
    let env = Env::start();
    for dsn in [env.unix_dsn(""), env.tcp_dsn("sslmode=disable")] {
        assert_eq!(
            psql_ok(&dsn, "select current_user || ',' || session_user"),
            format!("{ROLE},{ROLE}"),
            "{dsn}"
        );
    }
    // pgiam says who it let in: the process that connected, with its uid and executable.
    let log = env.pgiam.log();
    let established: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session established"))
        .collect();
    assert_eq!(established.len(), 2, "{log}");
    let uid = nix::unistd::geteuid();
    for line in established {
        assert!(line.contains(&format!("uid={uid}")), "{line}");
        assert!(line.contains("exe=") && line.contains("psql"), "{line}");
        assert!(line.contains(&format!("role={ROLE}")), "{line}");
    }
}

#[tokio::test]
async fn tokio_postgres_through_unix_and_tcp() {
    let env = Env::start();
    for dsn in [env.unix_dsn(""), env.tcp_dsn("")] {
        let client = tokio_client(&dsn).await;
        let row = client
            .query_one("select current_user::text, $1::int + 1", &[&41i32])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), ROLE);
        assert_eq!(row.get::<_, i32>(1), 42);
        // A transaction, an error inside it, and recovery: state flows through untouched.
        client
            .batch_execute("create table if not exists t(x int)")
            .await
            .unwrap();
        client
            .batch_execute("begin; insert into t values (1)")
            .await
            .unwrap();
        assert!(client.batch_execute("select 1/0").await.is_err());
        client.batch_execute("rollback").await.unwrap();
        let n: i64 = client
            .query_one("select count(*) from t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
    // Large values both ways (bigger than any single read buffer).
    let client = tokio_client(&env.tcp_dsn("")).await;
    let big = "x".repeat(3 << 20);
    let back: String = client
        .query_one("select $1::text", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back.len(), big.len());
}

#[test]
fn pgbench_all_protocol_modes_zero_failures() {
    let env = Env::start();
    let init = run("pgbench", &["-i", "-q", "-s", "1", &env.tcp_dsn("")]);
    assert!(init.status.success(), "pgbench -i: {}", stderr(&init));
    for dsn in [env.tcp_dsn(""), env.unix_dsn("")] {
        for mode in ["simple", "extended", "prepared"] {
            let out = run(
                "pgbench",
                &["-M", mode, "-c", "4", "-j", "2", "-t", "50", "-n", &dsn],
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "pgbench -M {mode}: {}{text}",
                stderr(&out)
            );
            assert!(
                text.contains("number of failed transactions: 0 ")
                    && text.contains("number of transactions actually processed: 200/200"),
                "pgbench -M {mode} via {dsn}: {text}"
            );
        }
    }
}

#[test]
fn closing_either_side_closes_the_other() {
    let env = Env::start();
    // The client goes away: its backend goes too.
    let out = psql_ok(&env.tcp_dsn(""), "select pg_backend_pid()");
    assert!(!out.is_empty());
    let mut gone = false;
    for _ in 0..100 {
        let n = env.direct(&format!(
            "select count(*) from pg_stat_activity where usename = '{ROLE}'"
        ));
        if n == "0" {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(gone, "backend still present after the client left");

    // The server ends the backend: the client sees the error and the end of the connection.
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    raw.until_ready();
    env.direct(&format!(
        "select pg_terminate_backend(pid) from pg_stat_activity where usename = '{ROLE}'"
    ));
    let (code, _) = raw.expect_fatal();
    assert_eq!(code, "57P01", "admin shutdown is passed through");
    // pgiam itself is unaffected.
    assert_eq!(psql_ok(&env.tcp_dsn(""), "select 1"), "1");
}

#[test]
fn upstream_md5_and_cleartext_password_logins() {
    for method in ["md5", "password"] {
        let env = Env::with(Setup {
            pg: pgiam_tests::PgOptions {
                extra_conf: vec!["password_encryption = 'md5'".into()],
                hba_lines: Some(vec![
                    "local all all trust".into(),
                    format!("host all all 127.0.0.1/32 {method}"),
                ]),
                ..Default::default()
            },
            ..Setup::default()
        });
        assert_eq!(
            psql_ok(&env.tcp_dsn(""), "select current_user"),
            ROLE,
            "{method}"
        );
        let log = env.pg.log();
        assert!(
            log.contains(&format!("method={method}")),
            "PostgreSQL authenticated pgiam with {method}: {log}"
        );
    }
}

#[test]
fn upstream_scram_with_a_wrong_password_file_is_refused_cleanly() {
    let env = Env::start();
    std::fs::write(env.dir.path().join("app_rw.password"), "wrong\n").unwrap();
    let out = psql(&env.tcp_dsn(""), "select 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    // The password file is read at every login: fixing it needs no restart.
    std::fs::write(env.dir.path().join("app_rw.password"), "rw-secret\n").unwrap();
    assert_eq!(psql_ok(&env.tcp_dsn(""), "select current_user"), ROLE);
    assert!(env.pg.log().contains("method=scram-sha-256"));
}
