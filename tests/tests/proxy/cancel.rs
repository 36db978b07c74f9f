//! Cancellation through pgiam: clients hold their backend's pid with pgiam's secret, never the
//! backend's own secret.

use std::time::Duration;

use crate::fixture::*;

fn key_data(messages: &[(u8, Vec<u8>)]) -> (i32, i32) {
    let (_, body) = messages
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    (
        i32::from_be_bytes(body[0..4].try_into().unwrap()),
        i32::from_be_bytes(body[4..8].try_into().unwrap()),
    )
}

fn send_cancel(env: &Env, pid: i32, key: i32) {
    let mut c = Raw::connect(env.tcp);
    c.send(&cancel_request(pid, key));
    c.expect_closed();
}

fn result_of_query(raw: &mut Raw) -> Result<(), String> {
    let mut error = None;
    for (tag, body) in raw.until_ready() {
        if tag == b'E' {
            error = Some(String::from_utf8_lossy(&body).into_owned());
        }
    }
    error.map_or(Ok(()), Err)
}

#[test]
fn forged_or_stale_keys_cancel_nothing_and_the_real_key_cancels() {
    let env = Env::start();
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    let (pid, key) = key_data(&raw.until_ready());

    // The pid is the backend's own; the secret is pgiam's, not the server's: sent straight to
    // PostgreSQL the key cancels nothing.
    raw.send(&query_bytes("select pg_backend_pid()"));
    let rows = raw.until_ready();
    let (_, row) = rows.iter().find(|(t, _)| *t == b'D').unwrap();
    let real_pid: i32 = String::from_utf8_lossy(&row[6..]).parse().unwrap();
    assert_eq!(pid, real_pid, "the client is told its backend's pid");
    raw.send(&query_bytes("select pg_sleep(1.5)"));
    wait_for_sleep(&env);
    let mut direct = Raw::connect(format!("127.0.0.1:{}", env.pg.port).parse().unwrap());
    direct.send(&cancel_request(pid, key));
    direct.expect_closed();
    assert_eq!(
        result_of_query(&mut raw),
        Ok(()),
        "pgiam's key is not the server's"
    );

    // Forged keys while a query runs: it completes.
    raw.send(&query_bytes("select pg_sleep(1.5)"));
    wait_for_sleep(&env);
    send_cancel(&env, pid, key ^ 1);
    send_cancel(&env, pid.wrapping_add(1), key);
    assert_eq!(
        result_of_query(&mut raw),
        Ok(()),
        "a forged key cancelled the query"
    );

    // The real key: the query is cancelled (57014).
    raw.send(&query_bytes("select pg_sleep(60)"));
    wait_for_sleep(&env);
    send_cancel(&env, pid, key);
    let err = result_of_query(&mut raw).expect_err("the query must be cancelled");
    assert!(err.contains("57014"), "{err}");

    // Once the session is gone its key is stale.
    raw.send(&[b'X', 0, 0, 0, 4]);
    raw.expect_closed();
    let mut other = Raw::connect(env.tcp);
    other.startup();
    other.until_ready();
    other.send(&query_bytes("select pg_sleep(1)"));
    wait_for_sleep(&env);
    send_cancel(&env, pid, key);
    assert_eq!(result_of_query(&mut other), Ok(()));
    assert!(env
        .pgiam
        .log()
        .contains("cancel request with an unknown key ignored"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_token_stops_pg_sleep() {
    let env = Env::start();
    let client = tokio_client(&env.tcp_dsn("")).await;
    let token = client.cancel_token();
    let sleeper =
        tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await.map(|_| ()) });
    let env_ref = &env;
    tokio::task::block_in_place(|| wait_for_sleep(env_ref));
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), sleeper)
        .await
        .expect("cancel did not stop pg_sleep")
        .unwrap();
    let err = result.expect_err("query was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
}

/// A cancel sent a moment after its statement cancels it, though pgiam still holds the
/// statement: here `connect = "deferred"` and a server whose logins take a second
/// (`post_auth_delay`), so the session's first statement waits for its backend (an audit flush
/// makes the same wait, shorter). Directly, PostgreSQL honours such a cancel; one that
/// overtook its statement would find no backend, or an idle one, and be lost.
#[test]
fn a_cancel_does_not_overtake_its_statement() {
    let env = Env::with(Setup {
        upstream: Some("host = \"127.0.0.1\"\nport = PGPORT\nconnect = \"deferred\"".into()),
        pg: pgiam_tests::PgOptions {
            extra_conf: vec!["post_auth_delay = 1".into()],
            hba_lines: Some(vec![
                "local all all trust".into(),
                "host all postgres 127.0.0.1/32 trust".into(),
                "host all all 127.0.0.1/32 scram-sha-256".into(),
            ]),
            ..pgiam_tests::PgOptions::default()
        },
        ..Setup::default()
    });
    // PostgreSQL ignores a cancel that reaches the backend before it has read the statement;
    // the client leaves it a moment to do so.
    let moment = Duration::from_millis(100);
    // Directly.
    let pg_addr = format!("127.0.0.1:{}", env.pg.port).parse().unwrap();
    let mut direct = Raw::connect(pg_addr);
    direct.send(&Raw::startup_bytes(
        3 << 16,
        &[("user", "postgres"), ("database", DB)],
    ));
    let (pid, key) = key_data(&direct.until_ready());
    direct.send(&query_bytes("select pg_sleep(10)"));
    std::thread::sleep(moment);
    let mut c = Raw::connect(pg_addr);
    c.send(&cancel_request(pid, key));
    c.expect_closed();
    let err = result_of_query(&mut direct).expect_err("cancelled directly");
    assert!(err.contains("57014"), "{err}");

    // Through pgiam: a session's first statement (its backend logs in meanwhile), and a
    // later one. (The first session with a login logs in at once: pgiam learns what the
    // server tells a client at login; the sessions after it defer.)
    let mut first = Raw::connect(env.tcp);
    first.startup();
    first.until_ready();
    first.send(&[b'X', 0, 0, 0, 4]);
    first.expect_closed();
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    let (pid, key) = key_data(&raw.until_ready());
    for n in 0..2 {
        raw.send(&query_bytes("select pg_sleep(10)"));
        std::thread::sleep(moment);
        send_cancel(&env, pid, key);
        let err =
            result_of_query(&mut raw).expect_err(&format!("statement {n}: the cancel was lost"));
        assert!(err.contains("57014"), "{err}");
    }
}

#[test]
fn repeated_cancels_for_one_statement_open_one_server_connection() {
    let env = Env::start();
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    let (pid, key) = key_data(&raw.until_ready());
    // Directly, every CancelRequest is a connection of its own (what pgiam must not pass on).
    let before = env.connections_received();
    for _ in 0..5 {
        let mut direct = Raw::connect(format!("127.0.0.1:{}", env.pg.port).parse().unwrap());
        direct.send(&cancel_request(pid, key));
        direct.expect_closed();
    }
    assert_eq!(env.connections_received() - before, 5);

    raw.send(&query_bytes("select pg_sleep(60)"));
    wait_for_sleep(&env);
    let before = env.connections_received();
    // 200 cancels for the one statement, from 8 clients at once.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..25 {
                    send_cancel(&env, pid, key);
                }
            });
        }
    });
    let err = result_of_query(&mut raw).expect_err("the query must be cancelled");
    assert!(err.contains("57014"), "{err}");
    assert_eq!(
        env.connections_received() - before,
        1,
        "one cancel reached the server"
    );
    // A new statement can be cancelled again.
    raw.send(&query_bytes("select pg_sleep(60)"));
    wait_for_sleep(&env);
    send_cancel(&env, pid, key);
    let err = result_of_query(&mut raw).expect_err("the second query must be cancelled");
    assert!(err.contains("57014"), "{err}");
}
