//! Faults around pgiam: the database restarted under a live session, an upstream that accepts
//! connections and never answers, a client that stops reading a large result. Clients get a clean error, pgiam keeps serving, and nothing
//! of the ended sessions is left behind.

use std::time::{Duration, Instant};

use crate::fixture::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_ends_its_sessions_cleanly_and_pgiam_serves_the_next_ones() {
    let env = Env::start();
    let client = tokio_client(&env.tcp_dsn("")).await;
    client.simple_query("SELECT 1").await.unwrap();
    env.pg.restart().unwrap();
    // The session is over: the server's own 57P01 reached the client, or its connection is
    // closed; never a hang, never a wrong answer.
    let e = tokio::time::timeout(Duration::from_secs(20), client.simple_query("SELECT 1"))
        .await
        .expect("no hang")
        .unwrap_err();
    if let Some(d) = e.as_db_error() {
        assert_eq!(d.code().code(), "57P01", "{d:?}");
    } else {
        assert!(client.is_closed(), "{e}");
    }
    // The next session works at once, through the same pgiam.
    assert_eq!(psql_ok(&env.tcp_dsn(""), "SELECT 'back'"), "back");
    // Nothing of the ended session is left: no live session but none, its end recorded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.pgiam.cli(&["sessions", "--json"]);
        let live: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        if live.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "sessions left: {live:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let records = env.audit_records();
    let sessions = records
        .iter()
        .filter(|r| r["kind"] == "session" && r["decision"] == "allow")
        .count();
    let ends = records
        .iter()
        .filter(|r| r["kind"] == "session_end")
        .count();
    assert_eq!(sessions, ends, "every session has its end record");
}

#[test]
fn an_upstream_that_never_answers_fails_the_login_within_its_bound() {
    // Accepts connections (the kernel completes the handshake into the backlog) and never
    // reads or writes: a black-holed server as pgiam sees it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let env = Env::with(Setup {
        upstream: Some(format!("host = \"127.0.0.1\"\nport = {port}")),
        limits: "startup_timeout_secs = 2".into(),
        ..Setup::default()
    });
    let started = Instant::now();
    let out = psql(&env.tcp_dsn("sslmode=disable"), "SELECT 1");
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("08006") || err.contains("within 2s"), "{err}");
    // A liveness bound, not a measurement: without one the login would wait for ever.
    assert!(took < Duration::from_secs(15), "{took:?}");
    // pgiam itself still answers (its admin socket, here).
    assert!(env.pgiam.cli(&["status", "--json"]).status.success());
    drop(silent);
}

/// pgiam's resident peak, in KiB.
fn peak_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A client that asks for a ~1 GB result and reads none of it: pgiam holds no more than its
/// buffers (it stops reading the server once the client's socket is full), the backend waits
/// on its own write (back-pressured, not buffering in pgiam), other sessions are served, and
/// when the client goes the backend goes with it.
#[test]
fn a_client_that_stops_reading_a_large_result_holds_pgiam_memory_bounded() {
    let env = Env::start();
    let before = peak_kib(env.pgiam.pid());
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    raw.until_ready();
    raw.send(&query_bytes(
        "SELECT repeat('x', 1000) FROM generate_series(1, 1000000)",
    ));
    // The backend fills the socket buffers on both sides of pgiam, then waits to write.
    let mut waiting = String::new();
    for _ in 0..200 {
        waiting = env.direct(&format!(
            "SELECT wait_event FROM pg_stat_activity WHERE usename = '{ROLE}' AND state = 'active'"
        ));
        if waiting == "ClientWrite" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(waiting, "ClientWrite", "the backend is held back by pgiam");
    std::thread::sleep(Duration::from_secs(1));
    let grown = peak_kib(env.pgiam.pid()).saturating_sub(before);
    eprintln!("pgiam's peak grew {grown} KiB while a ~1 GB result waited for its reader");
    assert!(grown < 16 * 1024, "pgiam buffered the result: {grown} KiB");
    assert_eq!(
        psql_ok(&env.tcp_dsn(""), "SELECT 7"),
        "7",
        "others are served"
    );

    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = env.direct(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
        ));
        if n == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned backend remains");
        std::thread::sleep(Duration::from_millis(50));
    }
}
