//! Deferred server connections: once pgiam has seen a login with the same role, parameters and
//! server, the next such client is answered at once and its backend opens at its first message.

use std::time::Duration;

use crate::fixture::*;

fn backends(env: &Env) -> String {
    env.direct(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
    ))
}

/// Logins of the mapped role PostgreSQL has seen, from its own log.
fn role_logins(env: &Env) -> usize {
    env.pg
        .log()
        .matches(&format!("connection authorized: user={ROLE} "))
        .count()
}

fn wait_for_backends(env: &Env, n: &str) {
    for _ in 0..250 {
        if backends(env) == n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backends(env), n);
}

/// A second client with the same login holds no backend until it says something; one that
/// leaves without a statement never costs the database a connection; a cancel before the
/// backend exists is harmless. With `connect = "at-login"`, every login opens its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opens_its_backend_at_its_first_statement() {
    let env = Env::start();
    let dsn = env.tcp_dsn("");
    let first = tokio_client(&dsn).await;
    first.simple_query("SELECT 1").await.unwrap();
    drop(first);
    wait_for_backends(&env, "0");

    let before = role_logins(&env);
    let client = tokio_client(&dsn).await;
    assert_eq!(backends(&env), "0", "logged in without a backend");
    client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let rows = client.simple_query("SELECT 41 + 1").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
    );
    assert_eq!(backends(&env), "1");
    assert_eq!(role_logins(&env), before + 1);

    let spare = tokio_client(&dsn).await;
    drop(spare);
    drop(client);
    wait_for_backends(&env, "0");
    assert_eq!(
        role_logins(&env),
        before + 1,
        "the spare connection never reached the database"
    );
    let records = env.audit_records_until(|r| {
        r.iter()
            .filter(|r| r["kind"] == "session_end" && r["ended_by"] == "client terminated")
            .count()
            >= 3
    });
    assert_eq!(
        records.iter().filter(|r| r["kind"] == "session").count(),
        3,
        "every login is recorded, with or without a backend"
    );

    let eager = Env::with(Setup {
        upstream: Some("host = \"127.0.0.1\"\nport = PGPORT\nconnect = \"at-login\"".into()),
        ..Setup::default()
    });
    let dsn = eager.tcp_dsn("");
    tokio_client(&dsn)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    wait_for_backends(&eager, "0");
    let _idle = tokio_client(&dsn).await;
    assert_eq!(
        backends(&eager),
        "1",
        "at-login: the backend opens with the login"
    );
}

/// The greeting a deferred client gets is the last login's; what the real login reports
/// differently since (a role default changed) reaches the client before its first answer.
#[test]
fn what_changed_since_the_remembered_login_arrives_before_the_first_answer() {
    let env = Env::start();
    let date_style = |messages: &[(u8, Vec<u8>)]| -> Vec<String> {
        messages
            .iter()
            .filter(|(tag, body)| *tag == b'S' && body.starts_with(b"DateStyle\0"))
            .map(|(_, body)| String::from_utf8_lossy(&body[10..body.len() - 1]).into_owned())
            .collect()
    };
    let mut first = Raw::connect(env.tcp);
    first.startup();
    assert_eq!(date_style(&first.until_ready()), ["ISO, MDY"]);
    first.send(&query_bytes("SELECT 1"));
    first.until_ready();
    first.send(&[b'X', 0, 0, 0, 4]);

    env.direct(&format!("ALTER ROLE {ROLE} SET DateStyle = 'SQL, DMY'"));
    let mut second = Raw::connect(env.tcp);
    second.startup();
    assert_eq!(
        date_style(&second.until_ready()),
        ["ISO, MDY"],
        "greeted from the remembered login"
    );
    second.send(&query_bytes("SELECT 1"));
    let answer = second.until_ready();
    assert_eq!(
        answer.first().map(|(tag, _)| *tag),
        Some(b'S'),
        "{answer:?}"
    );
    assert_eq!(date_style(&answer), ["SQL, DMY"]);
    assert!(answer.iter().any(|(tag, _)| *tag == b'T'), "{answer:?}");
}

/// A deferred login the server refuses by the time it happens (its database is gone) fails at
/// the first statement with the server's own error, and nothing is executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_login_the_server_refuses_fails_the_first_statement() {
    let env = Env::with(Setup {
        extra: format!(
            "[[mapping]]\nprincipal = \"uid:{}\"\ndatabase = \"gone\"\nrole = \"{ROLE}\"\n",
            nix::unistd::geteuid()
        ),
        ..Setup::default()
    });
    env.direct(&format!("CREATE DATABASE gone OWNER {ROLE}"));
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=gone user=anyone",
        env.tcp.port()
    );
    tokio_client(&dsn)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    env.direct("DROP DATABASE gone WITH (FORCE)");

    let client = tokio_client(&dsn).await;
    let e = client
        .simple_query("CREATE TABLE never (x int)")
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(db.code().code(), "3D000", "{db:?}");
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());
    let records = env.audit_records_until(|r| {
        r.iter()
            .any(|r| r["kind"] == "session_end" && r["ended_by"] == "the server refused the login")
    });
    assert!(
        !records
            .iter()
            .any(|r| r["sql"].as_str().is_some_and(|s| s.contains("never"))),
        "the statement was never decided, let alone forwarded"
    );
}

/// A client whose first bytes after a remembered login begin no message (an unknown type, an
/// impossible length) gets a protocol violation at once, and the database never sees a login
/// for it.
#[test]
fn garbage_before_the_first_statement_costs_the_database_no_login() {
    let env = Env::start();
    let mut first = Raw::connect(env.tcp);
    first.startup();
    first.until_ready();
    first.send(&query_bytes("SELECT 1"));
    first.until_ready();
    first.send(&[b'X', 0, 0, 0, 4]);
    wait_for_backends(&env, "0");
    let before = role_logins(&env);

    for garbage in [&[b'?', 0, 0, 0, 4][..], &[b'Q', 0, 0, 0, 1][..]] {
        let mut client = Raw::connect(env.tcp);
        client.startup();
        client.until_ready();
        client.send(garbage);
        let (tag, body) = client
            .read()
            .expect("an error before the connection closes");
        assert_eq!(tag, b'E', "{garbage:?}");
        assert!(
            body.windows(7).any(|w| w == b"C08P01\0"),
            "{garbage:?}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            client.read().is_none(),
            "{garbage:?}: the connection is closed"
        );
    }
    let records = env.audit_records_until(|r| {
        r.iter()
            .filter(|r| {
                r["kind"] == "session_end"
                    && r["ended_by"]
                        .as_str()
                        .is_some_and(|e| e.contains("message type") || e.contains("length"))
            })
            .count()
            >= 2
    });
    assert_eq!(
        records.iter().filter(|r| r["kind"] == "statement").count(),
        1
    );
    assert_eq!(role_logins(&env), before, "no backend login for either");
}
