//! The policy decides: what a refusal looks like, reloading (atomic, bad files refused),
//! the pgbench workload through every protocol route under a policy that allows just it, and
//! decision records on disk before the database sees a statement even when pgiam is killed.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::fixture::*;

const READ_ITEMS: &str = r#"
@id("connect")
permit(principal, action == PgIam::Action::"connect", resource);
@id("read-items")
permit(principal, action == PgIam::Action::"select", resource == PgIam::Table::"app.public.items");
"#;

fn env_with(policy: &str) -> Env {
    env_with_upstream(policy, None)
}

fn env_with_upstream(policy: &str, upstream: Option<&str>) -> Env {
    let env = Env::with(Setup {
        policy: policy.into(),
        upstream: upstream.map(str::to_owned),
        ..Setup::default()
    });
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE TABLE items (id int); INSERT INTO items VALUES (1); \
                 CREATE TABLE secret (v text); GRANT ALL ON items, secret TO {ROLE}"
            ),
        )
        .unwrap();
    env
}

#[test]
fn a_refusal_names_the_action_and_resource_and_the_audit_record() {
    let env = env_with(READ_ITEMS);
    assert_eq!(psql_ok(&env.tcp_dsn(""), "SELECT id FROM items"), "1");
    let out = psql(&env.tcp_dsn(""), "SELECT * FROM secret");
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("ERROR:  pgiam: permission denied: select on table public.secret"),
        "{err}"
    );
    assert!(err.contains("HINT:  pgiam audit record"), "{err}");
    // The client's error carries no policy text.
    assert!(
        !err.contains("read-items") && !err.contains("permit"),
        "{err}"
    );
    let records = env.audit_records();
    let deny = records
        .iter()
        .find(|r| r["kind"] == "statement" && r["decision"] == "deny")
        .expect("a deny record");
    assert!(err.contains(deny["id"].as_str().unwrap()), "{err}");
    assert_eq!(deny["denied"], "select on table public.secret");
    assert_eq!(deny["sql"], "SELECT * FROM secret");
    // The identity is the session record's, which the statement record names.
    let session = records
        .iter()
        .find(|r| r["kind"] == "session" && r["id"] == deny["session"])
        .expect("the deny record's session");
    assert_eq!(session["identity"]["uid"], nix::unistd::geteuid().as_raw());
    // What reached the server in the refused statement's place fails in its parse analysis,
    // and its log says so as pgiam's refusal with the record to look up, not a syntax error.
    let pg_log = env.pg.log();
    let id = deny["id"].as_str().unwrap();
    assert!(
        pg_log.contains(&format!(
            "pgiam: statement refused by policy, audit record {id}"
        )),
        "{pg_log}"
    );
    assert!(!pg_log.contains("syntax error"), "{pg_log}");
    assert!(
        !pg_log.contains("secret"),
        "the refused text never reached the server: {pg_log}"
    );

    // No policy lets this principal connect to another database.
    let env2 = env_with(
        "permit(principal, action == PgIam::Action::\"connect\", resource == PgIam::Database::\"other\");",
    );
    let out = psql(&env2.tcp_dsn(""), "SELECT 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permission denied: connect to database app"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_is_atomic_and_applies_to_open_sessions() {
    let env = env_with(READ_ITEMS);
    let client = tokio_client(&env.tcp_dsn("")).await;
    let select = client.prepare("SELECT id FROM items").await.unwrap();
    assert_eq!(client.query(&select, &[]).await.unwrap().len(), 1);
    let policy_file = env.dir.path().join("policy.cedar");
    let hup = || kill(Pid::from_raw(env.pgiam.pid()), Signal::SIGHUP).unwrap();
    let wait_log = |needle: &str, count: usize| {
        for _ in 0..250 {
            if env.pgiam.log().matches(needle).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no {needle:?} in the log:\n{}", env.pgiam.log());
    };

    // Revoked: the statement prepared under the old policy is refused at its next Execute.
    std::fs::write(
        &policy_file,
        "permit(principal, action == PgIam::Action::\"connect\", resource);",
    )
    .unwrap();
    hup();
    wait_log("SIGHUP: policy reloaded", 1);
    let e = client.query(&select, &[]).await.unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("42501"),
        "{e}"
    );

    // A file that does not validate is refused, and the policy in force stays.
    std::fs::write(
        &policy_file,
        "permit(principal, action == PgIam::Action::\"selekt\", resource);",
    )
    .unwrap();
    hup();
    wait_log("policy not reloaded", 1);
    assert!(env.pgiam.log().contains("selekt"));
    assert!(client.query("SELECT id FROM items", &[]).await.is_err());
    let fresh = tokio_client(&env.tcp_dsn("")).await;
    assert!(fresh.simple_query("SELECT 1").await.is_ok());

    // Granted again.
    std::fs::write(&policy_file, READ_ITEMS).unwrap();
    hup();
    wait_log("SIGHUP: policy reloaded", 2);
    assert_eq!(client.query(&select, &[]).await.unwrap().len(), 1);
}

/// What pgbench needs (its four tables, count() for its scale check) and nothing more.
const PGBENCH: &str = r#"
@id("connect")
permit(principal, action == PgIam::Action::"connect", resource == PgIam::Database::"app");
@id("pgbench-read")
permit(principal, action == PgIam::Action::"select", resource in PgIam::Schema::"app.public")
  when { resource.name like "pgbench_*" };
@id("pgbench-write")
permit(principal, action in [PgIam::Action::"insert", PgIam::Action::"update"],
       resource in PgIam::Schema::"app.public")
  when { resource.name like "pgbench_*" && resource.name != "pgbench_history" };
permit(principal, action == PgIam::Action::"insert", resource == PgIam::Table::"app.public.pgbench_history");
@id("count")
permit(principal, action == PgIam::Action::"execute", resource) when { resource.name == "count" };
"#;

fn pgbench(env: &Env, mode: &str) -> (bool, String) {
    let out = run(
        "pgbench",
        &[
            "-M",
            mode,
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "50",
            "-n",
            &env.tcp_dsn(""),
        ],
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out),
    )
}

#[test]
fn pgbench_through_every_route_under_a_policy_that_allows_just_it() {
    let env = Env::with(Setup {
        policy: PGBENCH.into(),
        ..Setup::default()
    });
    env.pgbench_tables();
    for mode in ["simple", "extended", "prepared"] {
        let (ok, text) = pgbench(&env, mode);
        assert!(
            ok && text.contains("number of failed transactions: 0 ")
                && text.contains("number of transactions actually processed: 200/200"),
            "pgbench -M {mode}: {text}"
        );
    }
    // Without the history insert, every TPC-B transaction is refused at that statement.
    let file = env.dir.path().join("policy.cedar");
    let history = "permit(principal, action == PgIam::Action::\"insert\", resource == PgIam::Table::\"app.public.pgbench_history\");";
    assert!(PGBENCH.contains(history));
    let without = PGBENCH.replace(history, "");
    std::fs::write(&file, without).unwrap();
    kill(Pid::from_raw(env.pgiam.pid()), Signal::SIGHUP).unwrap();
    for _ in 0..250 {
        if env.pgiam.log().contains("SIGHUP: policy reloaded") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = env
        .pg
        .psql_db(DB, "SELECT count(*) FROM pgbench_history")
        .unwrap();
    let (ok, text) = pgbench(&env, "prepared");
    assert!(!ok, "pgbench must fail: {text}");
    assert!(
        text.contains("permission denied: insert on table public.pgbench_history"),
        "{text}"
    );
    assert_eq!(
        env.pg
            .psql_db(DB, "SELECT count(*) FROM pgbench_history")
            .unwrap(),
        before,
        "no history row was written"
    );
}

/// `kill -9` during a load with the default durability (`changes`): every statement the
/// database executed, and every statement the client got an answer to, has its decision record
/// in the audit file (records reach the kernel before their statements are forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_executed_statement_survives_kill_9_in_the_audit_file() {
    kill_9_during_load("").await
}

/// The same with durability `always`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_executed_statement_survives_kill_9_with_durability_always() {
    kill_9_during_load("durability = \"always\"").await
}

async fn kill_9_during_load(audit_settings: &str) {
    let mut env = Env::with(Setup {
        extra: audit_settings.into(),
        ..Setup::default()
    });
    env.pg
        .psql_db(
            DB,
            &format!("CREATE TABLE load (marker text); GRANT ALL ON load TO {ROLE}"),
        )
        .unwrap();
    // Autocommit writers (each statement waits for its record before it is forwarded), writers
    // in transaction blocks (the INSERT runs while its record syncs; the COMMIT waits), and
    // readers (they run while their records sync; the answer waits).
    let mut writers = Vec::new();
    for w in 0..2 {
        let dsn = env.tcp_dsn("");
        writers.push(tokio::spawn(async move {
            let client = tokio_client(&dsn).await;
            for n in 0.. {
                let sql = format!("INSERT INTO load VALUES ('w{w}-n{n}-end')");
                if client.simple_query(&sql).await.is_err() {
                    return n;
                }
            }
            unreachable!()
        }));
    }
    for w in 0..2 {
        let dsn = env.tcp_dsn("");
        writers.push(tokio::spawn(async move {
            let client = tokio_client(&dsn).await;
            for n in 0.. {
                let insert = format!("INSERT INTO load VALUES ('b{w}-n{n}-end')");
                for sql in ["BEGIN", &insert, "COMMIT"] {
                    if client.simple_query(sql).await.is_err() {
                        return n;
                    }
                }
            }
            unreachable!()
        }));
    }
    let mut readers = Vec::new();
    for w in 0..2 {
        let dsn = env.tcp_dsn("");
        readers.push(tokio::spawn(async move {
            let client = tokio_client(&dsn).await;
            let mut answered = Vec::new();
            for n in 0.. {
                let marker = format!("r{w}-n{n}-end");
                match client.simple_query(&format!("SELECT '{marker}'")).await {
                    Ok(_) => answered.push(marker),
                    Err(_) => return answered,
                }
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill(Pid::from_raw(env.pgiam.pid()), Signal::SIGKILL).unwrap();
    let mut sent = 0;
    for w in writers {
        sent += w.await.unwrap();
    }
    assert!(sent > 20, "the load ran ({sent} transactions)");
    let mut answered = Vec::new();
    for r in readers {
        answered.extend(r.await.unwrap());
    }
    assert!(answered.len() > 20, "the reads ran ({})", answered.len());
    env.pgiam.stop();
    let executed = env
        .pg
        .psql_db(DB, "SELECT string_agg(marker, ' ') FROM load")
        .unwrap();
    // The statements with a decision record (a torn last line, if any, is not one).
    let audit: std::collections::HashSet<String> = std::fs::read_to_string(env.audit_path())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| Some(r["sql"].as_str()?.to_owned()))
        .collect();
    let markers: Vec<&str> = executed.split_whitespace().collect();
    assert!(markers.len() > 20, "{} rows", markers.len());
    assert!(
        markers.iter().any(|m| m.starts_with('b')),
        "transaction blocks committed"
    );
    for m in markers {
        assert!(
            audit.contains(&format!("INSERT INTO load VALUES ('{m}')")),
            "{m} was executed but has no decision record"
        );
    }
    for m in answered {
        assert!(
            audit.contains(&format!("SELECT '{m}'")),
            "{m} was answered but has no decision record"
        );
    }
}

/// A policy reload that takes away `connect` ends the principal's sessions at once: an idle one,
/// one that has not sent anything (no backend yet), and one in the middle of a long statement
/// (which is cancelled). New sessions are refused. (`connect = "deferred"`, so that the one
/// that has not spoken holds no backend yet.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_connect_ends_live_sessions() {
    let env = env_with_upstream(
        &format!(
            "{READ_ITEMS}\npermit(principal, action == PgIam::Action::\"execute\", resource);"
        ),
        Some("host = \"127.0.0.1\"\nport = PGPORT\nconnect = \"deferred\""),
    );
    let idle = tokio_client(&env.tcp_dsn("")).await;
    assert!(idle.simple_query("SELECT 1").await.is_ok());
    let busy = tokio_client(&env.tcp_dsn("")).await;
    let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(60)").await });
    let backends = || {
        env.pg
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"
            ))
            .unwrap()
    };
    // Both sessions have their backend (the sleeper is running).
    for _ in 0..250 {
        if backends() == "2" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backends(), "2");
    // A third session that has not sent anything yet (it holds no backend).
    let waiting = tokio_client(&env.tcp_dsn("")).await;
    assert_eq!(backends(), "2");

    std::fs::write(
        env.dir.path().join("policy.cedar"),
        "permit(principal, action == PgIam::Action::\"select\", resource);",
    )
    .unwrap();
    kill(Pid::from_raw(env.pgiam.pid()), Signal::SIGHUP).unwrap();

    // The long statement ends with the session, well before its 60 s (a liveness bound, not
    // a measurement).
    let r = tokio::time::timeout(Duration::from_secs(30), sleeping)
        .await
        .expect("the busy session was ended")
        .unwrap();
    assert!(r.is_err(), "the running statement did not complete");
    // The idle session was told why (or is already gone).
    let e = idle.simple_query("SELECT 1").await.unwrap_err();
    match e.as_db_error() {
        Some(d) => {
            assert_eq!(d.code().code(), "57P01", "{d:?}");
            assert!(d.message().contains("revoked"), "{d:?}");
        }
        None => assert!(idle.is_closed(), "{e}"),
    }
    // So was the one that never needed a backend.
    let e = waiting.simple_query("SELECT 1").await.unwrap_err();
    match e.as_db_error() {
        Some(d) => assert_eq!(d.code().code(), "57P01", "{d:?}"),
        None => assert!(waiting.is_closed(), "{e}"),
    }
    for _ in 0..250 {
        if backends() == "0" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backends(), "0", "no backend of a revoked session is left");
    let out = psql(&env.tcp_dsn(""), "SELECT 1");
    assert!(
        stderr(&out).contains("permission denied: connect"),
        "{}",
        stderr(&out)
    );
    let records = env.audit_records();
    assert_eq!(
        records
            .iter()
            .filter(|r| r["kind"] == "session_revoked")
            .count(),
        3
    );
}

/// A role default can choose the client encoding too: one whose characters can contain ASCII
/// bytes (SJIS) would make the server split statements differently from pgiam, so such a
/// session is refused before the client can send anything.
#[test]
fn a_role_default_client_encoding_pgiam_cannot_read_is_refused() {
    let env = env_with(READ_ITEMS);
    env.pg
        .psql(&format!("ALTER ROLE {ROLE} SET client_encoding = 'SJIS'"))
        .unwrap();
    let mut raw = Raw::connect(env.tcp);
    raw.startup();
    let (code, message) = raw.expect_fatal();
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("client_encoding"), "{message}");
}

/// After a COPY FROM STDIN through a driver that sends Bind, Execute, Sync before the data
/// (tokio-postgres), a refusal is still pgiam's 42501: the Sync the server ignored in copy-in
/// mode is owed no answer, so later answers stay matched to their requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_a_copy_in_is_still_pgiams() {
    use futures_util::SinkExt;
    let env = env_with(&format!(
        "{READ_ITEMS}\npermit(principal, action == PgIam::Action::\"copy_in\", resource == PgIam::Table::\"app.public.items\");"
    ));
    let client = tokio_client(&env.tcp_dsn("")).await;
    for _ in 0..2 {
        let sink = client
            .copy_in::<_, bytes::Bytes>("COPY items FROM STDIN")
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        sink.send(bytes::Bytes::from_static(b"2\n3\n"))
            .await
            .unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), 2);
        let e = client
            .simple_query("SELECT * FROM secret")
            .await
            .expect_err("refused");
        let db = e.as_db_error().expect("an error from pgiam");
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert!(db.message().contains("pgiam: permission denied"), "{db:?}");
        // And the session goes on, matched: a read still answers.
        let rows = client.query("SELECT id FROM items", &[]).await.unwrap();
        assert!(rows.len() >= 3, "{rows:?}");
    }
}
