//! An idle session gives its relay back (`pgiam_sessions_rested_total`) and takes it up again
//! for whatever comes next: the client's statement, the server's notification or its FATAL, an
//! operator's order, a policy that revokes it. Each case waits until the session has rested
//! (the counter moved with only that session open) before it acts.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::fixture::*;
use pgiam_tests::{metric, scrape};

fn env_with_metrics() -> (Env, String) {
    let addr = format!("127.0.0.1:{}", pgiam_tests::free_port());
    let env = Env::with(Setup {
        admin: format!("metrics = \"{addr}\""),
        ..Setup::default()
    });
    (env, addr)
}

fn rested(addr: &str) -> f64 {
    metric(&scrape(addr), "pgiam_sessions_rested_total")
}

/// Waits until sessions have rested more than `before` times (a session rests after a second
/// or two of quiet; the bound is for a loaded machine).
async fn rests_after(addr: &str, before: f64) -> f64 {
    for _ in 0..300 {
        let now = rested(addr);
        if now > before {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no session rested within 15 s ({before} before)");
}

/// The client's next statement finds the session as it left it (its settings, its prepared
/// statement, its backend), and a notification the server sends a resting session reaches
/// the client at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_session_wakes_for_its_client_and_for_its_server() {
    let (env, addr) = env_with_metrics();
    let (client, mut rx) = listening_client(&env.tcp_dsn("")).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute("LISTEN ch; SET application_name = 'resting'")
        .await
        .unwrap();
    let prepared = client.prepare("SELECT $1::int + 1").await.unwrap();
    let before = rested(&addr);
    let once = rests_after(&addr, before).await;

    // The server speaks first.
    env.pg.psql_db(DB, "NOTIFY ch, 'woken'").unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the notification reaches the resting session's client")
        .unwrap();
    assert_eq!(payload.payload(), "woken");

    // It rests again, and the client speaks: the same backend, as the session left it.
    let twice = rests_after(&addr, once).await;
    let row = client.query_one(&prepared, &[&41]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        pid,
        "the backend is kept while resting"
    );
    assert_eq!(row.get::<_, String>(1), "resting");

    // Resting again, the server ends it: its FATAL reaches the client.
    rests_after(&addr, twice).await;
    env.direct(&format!("SELECT pg_terminate_backend({pid})"));
    for _ in 0..200 {
        if client.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.is_closed(), "the server's end reached the client");
    let records = env.audit_records_until(|r| r.iter().any(|r| r["kind"] == "session_end"));
    let statements: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .filter_map(|r| r["sql"].as_str())
        .collect();
    assert!(
        statements.contains(&"SELECT pg_backend_pid(), current_setting('application_name')"),
        "{statements:?}"
    );
}

/// An order, and a policy that no longer lets the session connect, end a resting session as
/// they end a busy one: the client is told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_session_is_ended_by_an_order_and_by_a_revoking_policy() {
    let (env, addr) = env_with_metrics();
    let idle_client = |env: &Env| {
        let mut raw = Raw::connect(env.tcp);
        raw.startup();
        raw.until_ready();
        raw.send(&query_bytes("SELECT 1"));
        raw.until_ready();
        raw
    };

    let mut raw = idle_client(&env);
    let before = rested(&addr);
    rests_after(&addr, before).await;
    let out = env.pgiam.cli(&["sessions", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sessions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = sessions[0]["id"].as_str().unwrap().to_owned();
    let out = env.pgiam.cli(&["kill", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, message) = raw.expect_fatal();
    assert_eq!(code, "57P01");
    assert!(message.contains("administrator command"), "{message}");

    let mut raw = idle_client(&env);
    let before = rested(&addr);
    rests_after(&addr, before).await;
    std::fs::write(
        env.dir.path().join("policy.cedar"),
        "permit(principal, action == PgIam::Action::\"select\", resource);",
    )
    .unwrap();
    kill(Pid::from_raw(env.pgiam.pid()), Signal::SIGHUP).unwrap();
    let (code, message) = raw.expect_fatal();
    assert_eq!(code, "57P01");
    assert!(message.contains("revoked"), "{message}");
}
