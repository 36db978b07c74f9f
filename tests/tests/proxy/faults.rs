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

/// A client that asks for a ~1 GB result and reads none of it: pgiam holds no more than its
/// buffers (it stops reading the server once the client's socket is full), the backend waits
/// on its own write (back-pressured, not buffering in pgiam), other sessions are served, and
/// when the client goes the backend goes with it.
#[test]
fn a_client_that_stops_reading_a_large_result_holds_pgiam_memory_bounded() {
    let _alone = measuring_alone();
    let env = Env::start();
    let before = pgiam_tests::status_kib(env.pgiam.pid(), "VmHWM");
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    raw.until_ready();
    raw.send(&query_bytes(
        "SELECT repeat('x', 1000) FROM generate_series(1, 1000000)",
    ));
    // The backend fills the socket buffers on both sides of pgiam, then waits to write.
    let waiting = env.direct_until(
        &format!(
            "SELECT wait_event FROM pg_stat_activity WHERE usename = '{ROLE}' AND state = 'active'"
        ),
        "ClientWrite",
    );
    assert_eq!(waiting, "ClientWrite", "the backend is held back by pgiam");
    std::thread::sleep(Duration::from_secs(1));
    let grown = pgiam_tests::status_kib(env.pgiam.pid(), "VmHWM").saturating_sub(before);
    eprintln!("pgiam's peak grew {grown} KiB while a ~1 GB result waited for its reader");
    assert!(grown < 16 * 1024, "pgiam buffered the result: {grown} KiB");
    assert_eq!(
        psql_ok(&env.tcp_dsn(""), "SELECT 7"),
        "7",
        "others are served"
    );

    drop(raw);
    let left = env.direct_until(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"),
        "0",
    );
    assert_eq!(left, "0", "the abandoned backend remains");
}

/// 10,000 clients logged in at once over the unix socket and left idle (connect = "deferred":
/// no backend each): pgiam serves every one within its file-descriptor limit, holds a few KB
/// for each, still answers a new client, and lets them all go when they leave.
#[test]
fn ten_thousand_concurrent_clients_are_served_and_let_go() {
    let _alone = measuring_alone();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(ten_thousand_clients());
}

async fn ten_thousand_clients() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CLIENTS: usize = 10_000;
    // This test process holds one end of each connection (pgiam raises its own limit the same
    // way: soft to hard).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= CLIENTS as u64 + 512,
        "the open file hard limit ({hard}) is below what {CLIENTS} clients need"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the open file limit");
    let env = Env::with(Setup {
        upstream: Some("host = \"127.0.0.1\"\nport = PGPORT\nconnect = \"deferred\"".into()),
        ..Setup::default()
    });
    let path = env.unix_dir.join(format!(".s.PGSQL.{}", env.unix_port));
    let startup = Raw::startup_bytes(3 << 16, &[("user", "x"), ("database", DB)]);
    let login = |path: std::path::PathBuf, startup: Vec<u8>| async move {
        let mut s = tokio::net::UnixStream::connect(&path).await?;
        s.write_all(&startup).await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed during login"));
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(s)
    };
    // The first login is made (and its greeting remembered); the rest are answered from it.
    let first = login(path.clone(), startup.clone()).await.unwrap();
    let before = pgiam_tests::status_kib(env.pgiam.pid(), "VmRSS");
    let mut clients = vec![first];
    while clients.len() < CLIENTS {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..500.min(CLIENTS - clients.len()) {
            batch.spawn(login(path.clone(), startup.clone()));
        }
        while let Some(r) = batch.join_next().await {
            clients.push(r.unwrap().expect("a client logged in"));
        }
    }
    let grown = pgiam_tests::status_kib(env.pgiam.pid(), "VmRSS").saturating_sub(before);
    let per_session = grown * 1024 / CLIENTS as u64;
    eprintln!("{CLIENTS} idle clients: pgiam grew {grown} KiB ({per_session} bytes each)");
    assert!(
        per_session < 16 * 1024,
        "{per_session} bytes per idle session"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&env.pgiam.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["sessions"]["live"], CLIENTS, "{status}");
    let backends = env.direct(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
    ));
    assert!(
        backends.parse::<u32>().unwrap() <= 1,
        "{backends} backends for idle clients"
    );
    assert_eq!(
        psql_ok(&env.unix_dsn(""), "SELECT 5"),
        "5",
        "a new client is served"
    );

    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: serde_json::Value =
            serde_json::from_slice(&env.pgiam.cli(&["status", "--json"]).stdout).unwrap();
        if status["sessions"]["live"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions left: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
