//! Transaction pooling: a session's backend goes back to the pool between its transactions,
//! for the next transaction of any session of the same principal; a session that holds state
//! a later transaction needs keeps its backend; what a session parsed follows it to the
//! backend it lands on; a cancel reaches the backend the session is on. (That nothing crosses
//! to another principal is the role-safety suite's, in `pooling`.)

use std::process::Command;

use super::fixture::*;

fn transaction_pooled(max_backends: usize) -> Env {
    Env::with(Setup {
        mapping: "pool = \"transaction\"".into(),
        extra: format!("[pool]\nsize = {max_backends}\nmax_backends = {max_backends}\n"),
        ..Setup::default()
    })
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

/// Three sessions at once on two backends: the one that set something for its session
/// keeps one backend and its setting through every transaction; the other two take turns
/// on the other backend, and never see that setting.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_share_backends_between_transactions_unless_they_hold_session_state() {
    let env = transaction_pooled(2);
    env.items("(0)");
    let dsn = env.tcp_dsn("");
    let (pinned, a, b) = (
        tokio_client(&dsn).await,
        tokio_client(&dsn).await,
        tokio_client(&dsn).await,
    );
    pinned.simple_query("SET work_mem = '7MB'").await.unwrap();
    let pinned_pid = one(&pinned, "SELECT pg_backend_pid()").await;
    let mut shared = std::collections::BTreeSet::new();
    for _ in 0..10 {
        assert_eq!(
            one(
                &pinned,
                "SELECT pg_backend_pid() || '/' || current_setting('work_mem')"
            )
            .await,
            format!("{pinned_pid}/7MB"),
            "the session that set work_mem keeps its backend and its setting"
        );
        for c in [&a, &b] {
            let seen = one(
                c,
                "SELECT pg_backend_pid() || '/' || current_setting('work_mem')",
            )
            .await;
            let (pid, work_mem) = seen.split_once('/').unwrap();
            assert_ne!(pid, pinned_pid, "{seen}");
            assert_eq!(
                work_mem, "4MB",
                "another session's setting was seen: {seen}"
            );
            shared.insert(pid.to_owned());
        }
    }
    assert_eq!(shared.len(), 1, "two sessions, one backend: {shared:?}");
    // A transaction block holds its backend to its end: the other session's statement
    // waits for it (two backends, one pinned).
    a.simple_query("BEGIN; INSERT INTO items VALUES (1)")
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let dsn = dsn.clone();
        async move {
            let c = tokio_client(&dsn).await;
            let started = std::time::Instant::now();
            let n = one(&c, "SELECT count(*) FROM items").await;
            (n, started.elapsed())
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a backend in a transaction block was shared"
    );
    a.simple_query("COMMIT").await.unwrap();
    let (n, _) = waiting.await.unwrap();
    assert_eq!(n, "2", "the waiting session ran after the COMMIT");
    assert_eq!(
        env.direct(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
        )),
        "2",
        "four sessions, two backends"
    );
}

/// Raw protocol: a session parses the unnamed statement and syncs; another session's
/// transaction takes the backend (the only one) and parses its own; the first session's
/// Bind still runs what it parsed, and sees nothing of pgiam's own Parse. The same for two
/// statements of one name.
#[test]
fn the_unnamed_statement_follows_its_session_to_the_backend_it_lands_on() {
    let env = transaction_pooled(1);
    let open = || {
        let mut raw = Raw::connect(env.tcp);
        raw.startup();
        raw.until_ready();
        raw
    };
    let (mut a, mut b) = (open(), open());
    a.send(&[parse("", "SELECT 'A'::text"), sync()].concat());
    let tags: Vec<u8> = a.until_ready().iter().map(|m| m.0).collect();
    assert_eq!(tags, b"1Z");
    b.send(&[parse("", "SELECT 'B'::text"), bind(""), execute(), sync()].concat());
    let seen = b.until_ready();
    assert!(
        seen.iter().any(|m| m.0 == b'D' && m.1.ends_with(b"B")),
        "{seen:?}"
    );
    a.send(&[bind(""), execute(), sync()].concat());
    let seen = a.until_ready();
    let tags: Vec<u8> = seen.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"2DCZ", "{seen:?}");
    assert!(
        seen[1].1.ends_with(b"A"),
        "A ran another's statement: {seen:?}"
    );

    // One name, two statements: each session runs its own, whichever parsed last.
    a.send(&[parse("s1", "SELECT 'A1'::text"), sync()].concat());
    a.until_ready();
    b.send(
        &[
            parse("s1", "SELECT 'B1'::text"),
            bind("s1"),
            execute(),
            sync(),
        ]
        .concat(),
    );
    let seen = b.until_ready();
    let tags: Vec<u8> = seen.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"12DCZ", "{seen:?}");
    assert!(seen[2].1.ends_with(b"B1"), "{seen:?}");
    for _ in 0..2 {
        a.send(&[bind("s1"), execute(), sync()].concat());
        let seen = a.until_ready();
        let tags: Vec<u8> = seen.iter().map(|m| m.0).collect();
        assert_eq!(tags, b"2DCZ", "{seen:?}");
        assert!(seen[1].1.ends_with(b"A1"), "A ran another's s1: {seen:?}");
    }
    // A name the session holds already is refused as the server refuses it.
    a.send(&[parse("s1", "SELECT 'again'::text"), sync()].concat());
    let seen = a.until_ready();
    assert_eq!(seen[0].0, b'E', "{seen:?}");
    assert!(
        String::from_utf8_lossy(&seen[0].1).contains("42P05"),
        "{seen:?}"
    );
}

/// Extended-protocol messages without a Sync run in an implicit transaction that lasts until
/// the Sync: the backend stays with its session until then, even with every answer read (the
/// server's last ReadyForQuery said idle).
#[test]
fn a_backend_stays_with_its_session_until_the_sync_ends_its_implicit_transaction() {
    let env = transaction_pooled(1);
    env.items("(1)");
    let open = || {
        let mut raw = Raw::connect(env.tcp);
        raw.startup();
        raw.until_ready();
        raw
    };
    let mut a = open();
    a.send(
        &[
            parse("", "INSERT INTO items VALUES (7)"),
            bind(""),
            execute(),
            flush(),
        ]
        .concat(),
    );
    for want in [b'1', b'2', b'C'] {
        let (tag, body) = a.read().expect("an answer before the Sync");
        assert_eq!(tag, want, "{:?}", String::from_utf8_lossy(&body));
    }
    // Another session's statement waits for the backend: it must not run inside A's
    // transaction (where it would see A's row, and its end would commit it).
    let b = std::thread::spawn({
        let dsn = env.tcp_dsn("");
        move || psql_ok(&dsn, "SELECT count(*) FROM items")
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(
        !b.is_finished(),
        "another session ran inside an open implicit transaction"
    );
    a.send(&sync());
    let tags: Vec<u8> = a.until_ready().iter().map(|m| m.0).collect();
    assert_eq!(tags, b"Z");
    assert_eq!(
        b.join().unwrap(),
        "2",
        "the other session ran after A's Sync"
    );
}

/// A cancel reaches the backend the session is on now, whatever the pid it was told.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_reaches_the_backend_the_session_is_on() {
    let env = transaction_pooled(2);
    let dsn = env.tcp_dsn("");
    let other = tokio_client(&dsn).await;
    let client = tokio_client(&dsn).await;
    one(&other, "SELECT 1").await;
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(30)")
            .await
            .map(|_| ())
            .map_err(|e| e.as_db_error().map(|d| d.code().code().to_owned()))
    });
    wait_for_sleep(&env);
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), sleeping)
        .await
        .expect("the cancel ended the statement")
        .unwrap();
    assert_eq!(outcome, Err(Some("57014".to_owned())));
    assert_eq!(one(&other, "SELECT 'still here'").await, "still here");
}

/// pgbench in every protocol mode, more clients than backends: no failure, and the database
/// sees no more backends than the cap. (A thread per client: pgbench 15 prepares with a
/// blocking PQprepare, so a thread whose client waits for a backend would stall the others
/// it serves, which hold the backends in their transactions.)
#[test]
fn pgbench_runs_in_every_protocol_mode_through_few_backends() {
    let env = transaction_pooled(2);
    env.pgbench_tables();
    let before = env.connections_received();
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new(pgiam_tests::pg_bin_dir().join("pgbench"))
            .args(["-n", "-M", mode, "-c", "6", "-j", "6", "-t", "100"])
            .arg(env.tcp_dsn(""))
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            report.contains("number of failed transactions: 0"),
            "{mode}: {report}"
        );
    }
    let opened = env.connections_received() - before;
    assert!(opened <= 2, "{opened} backends opened, more than the cap");
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let body = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
    frame(b'P', &body)
}

fn bind(statement: &str) -> Vec<u8> {
    // No portal name, no parameter formats, no parameters, no result formats.
    let body = [b"\0", statement.as_bytes(), b"\0\0\0\0\0\0\0"].concat();
    frame(b'B', &body)
}

fn execute() -> Vec<u8> {
    frame(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

fn flush() -> Vec<u8> {
    frame(b'H', b"")
}
