//! Deferred server connections (`connect = "deferred"`): once pgiam has seen a login with the
//! same role, parameters and server, the next such client is answered at once and its backend
//! opens at its first message. And the default, `at-login`: the client is told its backend's
//! real pid.

use std::time::Duration;

use crate::fixture::*;

const DEFERRED: &str = "host = \"127.0.0.1\"\nport = PGPORT\nconnect = \"deferred\"";

fn deferred() -> Env {
    Env::with(Setup {
        upstream: Some(DEFERRED.into()),
        ..Setup::default()
    })
}

fn backends(env: &Env) -> String {
    env.direct(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
    ))
}

/// Logins of the mapped role PostgreSQL has seen for sessions, from its own log.
fn role_logins(env: &Env) -> usize {
    env.pg.session_logins(&format!("user={ROLE} "))
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
    let env = deferred();
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

    let eager = Env::start();
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
    let env = deferred();
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
        upstream: Some(DEFERRED.into()),
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
    let env = deferred();
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

/// By default a client is told its own backend's pid (with pgiam's secret, not the server's):
/// `pg_backend_pid()` equals it, `pg_terminate_backend` of it ends this very session, NOTIFY
/// names it as the sender, and a cancel with the key still reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_told_its_real_backend_pid() {
    let env = Env::start();
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    let greeting = raw.until_ready();
    let (_, key) = greeting
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    let told = i32::from_be_bytes(key[0..4].try_into().unwrap());
    raw.send(&query_bytes("SELECT pg_backend_pid()"));
    let answer = raw.until_ready();
    let (_, row) = answer.iter().find(|(t, _)| *t == b'D').expect("a row");
    // One column: count (2), length (4), text.
    let pid: i32 = String::from_utf8_lossy(&row[6..]).parse().unwrap();
    assert_eq!(pid, told, "BackendKeyData names the backend");
    assert_eq!(
        env.direct(&format!(
            "SELECT usename FROM pg_stat_activity WHERE pid = {told}"
        )),
        ROLE
    );

    // NOTIFY from this session names this session's pid, as the client was told.
    let dsn = env.tcp_dsn("");
    let (client, mut rx) = listening_client(&dsn).await;
    client.batch_execute("LISTEN ch; NOTIFY ch").await.unwrap();
    let sender = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the notification arrives")
        .unwrap()
        .process_id();
    let own: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sender, own);

    // A cancel with the key reaches the backend the pid names.
    let token = client.cancel_token();
    let running = client.simple_query("SELECT pg_sleep(30)");
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    };
    let (result, ()) = tokio::join!(running, cancel);
    let err = result.expect_err("cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );

    // pg_terminate_backend of the pid it was told ends the raw client's session.
    let terminated = client
        .query_one(&format!("SELECT pg_terminate_backend({told})"), &[])
        .await
        .unwrap();
    assert!(terminated.get::<_, bool>(0));
    // The server's FATAL reaches the raw client, then the connection closes.
    let after = std::iter::from_fn(|| raw.read()).collect::<Vec<_>>();
    assert!(
        after
            .iter()
            .any(|(t, b)| *t == b'E' && String::from_utf8_lossy(b).contains("57P01")),
        "{after:?}"
    );
}
