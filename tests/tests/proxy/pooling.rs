//! Session pooling: backends reused across clients, and role safety proven by the database.
//!
//! Client A (one identity) leaves a kind of session state behind on a pooled backend; client
//! B (another identity: another OS user, and in gateway mode another role) lands on the same
//! backend (one backend in the pool, and its pid compared) and asks the database whether any
//! of it is visible or held. Each case is run again against a pgiam whose reset is skipped (a
//! debug build's test switch) to show that the case does leak without it. The suite runs in
//! session and in transaction pooling (where a backend A's transactions left parked goes to
//! B only through the reset, and state pgiam cannot see, left by a function, is a case).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::fixture::*;

const NOBODY_UID: u32 = 65534;
const OTHER_ROLE: &str = "app_ro";
const GATEWAY_ROLE: &str = "pgiam_pool_gw";

/// One kind of state: what A runs (each string one Query), what B asks, and what B must see
/// when nothing crossed (a substring of B's answer).
struct Case {
    what: &'static str,
    leave: &'static [&'static str],
    /// A runs pgbench with this script (named protocol-level prepared statements) instead.
    pgbench: Option<&'static str>,
    check: &'static str,
    clean: &'static str,
    /// Only where a client may do it: gateway mode refuses every role change.
    role_login_only: bool,
}

const CASES: &[Case] = &[
    Case {
        what: "SET and set_config values",
        leave: &[
            "SET work_mem = '7MB'",
            "SELECT set_config('app.tenant', 'A-secret', false)",
        ],
        pgbench: None,
        check: "SELECT current_setting('work_mem') || '/' || coalesce(nullif(current_setting('app.tenant', true), ''), 'unset')",
        clean: "4MB/unset",
        role_login_only: false,
    },
    Case {
        what: "a role changed with SET ROLE",
        leave: &["SET ROLE app_admin"],
        pgbench: None,
        check: "SELECT current_user || '/' || session_user",
        clean: "app_rw/app_rw",
        role_login_only: true,
    },
    Case {
        what: "a temporary table",
        leave: &["CREATE TEMP TABLE a_secret AS SELECT 'A-secret'::text AS s"],
        pgbench: None,
        check: "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "a sequence's currval",
        leave: &["SELECT nextval('seq_a')"],
        pgbench: None,
        check: "SELECT currval('seq_a')",
        clean: "not yet defined in this session",
        role_login_only: false,
    },
    Case {
        what: "an SQL prepared statement",
        leave: &["PREPARE a_secret AS SELECT 'A-secret'"],
        pgbench: None,
        check: "SELECT count(*) FROM pg_prepared_statements",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "protocol prepared statements",
        leave: &[],
        pgbench: Some("SELECT 'A-secret';\n"),
        check: "SELECT count(*) FROM pg_prepared_statements",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "a WITH HOLD cursor",
        leave: &["DECLARE a_cursor CURSOR WITH HOLD FOR SELECT 'A-secret'"],
        pgbench: None,
        check: "SELECT count(*) FROM pg_cursors",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "a LISTEN channel",
        leave: &["LISTEN a_channel"],
        pgbench: None,
        check: "SELECT count(*) FROM pg_listening_channels()",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "an advisory lock",
        leave: &["SELECT pg_advisory_lock(4242)"],
        pgbench: None,
        check: "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "an open transaction",
        leave: &["BEGIN; INSERT INTO items VALUES (666)"],
        pgbench: None,
        check: "SELECT count(*) FROM items WHERE id = 666",
        clean: "0",
        role_login_only: false,
    },
    Case {
        what: "state left by a function pgiam cannot see into",
        leave: &["SELECT a_leaves_state()"],
        pgbench: None,
        check: "SELECT coalesce(nullif(current_setting('app.tenant', true), ''), 'unset') || '/' || (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())",
        clean: "unset/0",
        role_login_only: false,
    },
    Case {
        what: "a failed transaction",
        leave: &["BEGIN; SELECT 1/0"],
        pgbench: None,
        check: "SELECT 'usable'",
        clean: "usable",
        role_login_only: false,
    },
];

/// Same startup parameters from psql and pgbench, whoever runs them: one pool key.
fn dsn(env: &Env) -> String {
    env.tcp_dsn("application_name=rolesafety")
}

fn client(program: &str, as_nobody: bool) -> Command {
    let mut cmd = Command::new(pgiam_tests::pg_bin_dir().join(program));
    cmd.env("PGCLIENTENCODING", "UTF8")
        .env("PGCONNECT_TIMEOUT", "10");
    if as_nobody {
        pgiam_tests::run_as(&mut cmd, "nobody");
    }
    cmd
}

/// Runs each of `sqls` as its own Query through pgiam; the backend pid first. Returns stdout,
/// or "error: …" with stderr when psql failed.
fn psql_queries(env: &Env, as_nobody: bool, sqls: &[&str]) -> String {
    let mut cmd = client("psql", as_nobody);
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", &dsn(env)]);
    for sql in std::iter::once(&"SELECT pg_backend_pid()").chain(sqls) {
        cmd.args(["-c", sql]);
    }
    let out = cmd.output().expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        stdout
    } else {
        format!(
            "{stdout}\nerror: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

fn pgbench_as_a(env: &Env, script: &str) {
    let file = pgiam_tests::write_file(env.dir.path(), "a.sql", script, 0o644);
    let out = client("pgbench", false)
        .args(["-n", "-M", "prepared", "-t", "1", "-f"])
        .arg(&file)
        .arg(dsn(env))
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Closes the pool's idle backends (a reload starts a new pool generation) and waits until
/// pgiam has taken the reload.
fn fresh_pool(env: &Env, reloads: &mut usize) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(env.pgiam.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    *reloads += 1;
    for _ in 0..500 {
        // One line per SIGHUP, written after the pools were renewed.
        if env.pgiam.log().matches("SIGHUP: policy reloaded").count() >= *reloads {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pgiam did not reload:\n{}", env.pgiam.log());
}

/// Every case in turn; returns, per case, B's answer and whether B had A's backend.
fn run_cases(env: &Env, gateway: bool) -> Vec<(&'static str, String, bool)> {
    let mut reloads = 0;
    let mut seen = Vec::new();
    for case in CASES.iter().filter(|c| !(gateway && c.role_login_only)) {
        fresh_pool(env, &mut reloads);
        let a_pid = match case.pgbench {
            Some(script) => {
                pgbench_as_a(env, script);
                None
            }
            None => {
                let out = psql_queries(env, false, case.leave);
                Some(out.lines().next().unwrap_or_default().to_owned())
            }
        };
        let b = psql_queries(env, true, &[case.check]);
        let b_pid = b.lines().next().unwrap_or_default().to_owned();
        let answer = b.lines().skip(1).collect::<Vec<_>>().join("\n");
        let same = a_pid.is_none_or(|a| a == b_pid);
        seen.push((case.what, answer, same));
    }
    seen
}

fn prepare_database(env: &Env) {
    env.items("(1), (2)");
    env.pg
        .psql(&format!(
            "CREATE ROLE app_admin NOLOGIN; GRANT app_admin TO {ROLE}; \
             CREATE ROLE {OTHER_ROLE} NOLOGIN"
        ))
        .unwrap();
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE SEQUENCE seq_a; GRANT ALL ON seq_a TO {ROLE}, {OTHER_ROLE}; \
                 GRANT SELECT ON items TO {OTHER_ROLE}; \
                 CREATE FUNCTION a_leaves_state() RETURNS void LANGUAGE plpgsql AS $$ BEGIN \
                   PERFORM set_config('app.tenant', 'A-secret', false); \
                   CREATE TEMP TABLE IF NOT EXISTS a_hidden (s text); \
                 END $$"
            ),
        )
        .unwrap();
}

fn pooled(gateway: bool, skip_reset: bool, mode: &str, dir: &std::path::Path) -> Setup {
    let mut extra = format!(
        "[pool]\nsize = 1\nmax_backends = 1\n\
         [[mapping]]\nprincipal = \"uid:{NOBODY_UID}\"\ndatabase = \"{DB}\"\nrole = \"{}\"\npool = \"{mode}\"\n",
        if gateway { OTHER_ROLE } else { ROLE }
    );
    let mut upstream = None;
    if gateway {
        let pw = pgiam_tests::write_file(dir, "gw.password", "gw-secret", 0o600);
        extra.push_str(&format!(
            "[roles.{GATEWAY_ROLE}]\npassword_file = \"{}\"\n[roles.{OTHER_ROLE}]\n",
            pw.display()
        ));
        upstream = Some(format!(
            "host = \"127.0.0.1\"\nport = PGPORT\nmode = \"gateway\"\ngateway_role = \"{GATEWAY_ROLE}\""
        ));
    }
    Setup {
        mapping: format!("pool = \"{mode}\""),
        extra,
        upstream,
        env: if skip_reset {
            vec![("PGIAM_TEST_UNSAFE_SKIP_POOL_RESET", "1".into())]
        } else {
            Vec::new()
        },
        ..Setup::default()
    }
}

fn start(gateway: bool, skip_reset: bool, mode: &str) -> (Env, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::with(pooled(gateway, skip_reset, mode, dir.path()));
    prepare_database(&env);
    if gateway {
        env.pg
            .psql(&format!(
                "CREATE ROLE {GATEWAY_ROLE} LOGIN NOINHERIT PASSWORD 'gw-secret'; \
                 GRANT {ROLE}, {OTHER_ROLE} TO {GATEWAY_ROLE}"
            ))
            .unwrap();
    }
    (env, dir)
}

fn role_safety(gateway: bool, mode: &str) {
    // Each case leaks without the reset: the suite can fail.
    let (leaky, _d) = start(gateway, true, mode);
    for (what, answer, _) in run_cases(&leaky, gateway) {
        let case = CASES.iter().find(|c| c.what == what).unwrap();
        assert!(
            !answer.contains(case.clean),
            "without the reset, {what} should have crossed to the next client, which saw: {answer}"
        );
    }
    drop(leaky);

    let (env, _d) = start(gateway, false, mode);
    let cases = run_cases(&env, gateway);
    let expected = CASES
        .iter()
        .filter(|c| !(gateway && c.role_login_only))
        .count();
    assert_eq!(cases.len(), expected);
    for (what, answer, same_backend) in cases {
        let case = CASES.iter().find(|c| c.what == what).unwrap();
        assert!(same_backend, "{what}: B did not get A's backend");
        assert!(
            answer.contains(case.clean),
            "{what} crossed from one client to the next: B saw {answer:?}, expected {:?}",
            case.clean
        );
    }
    // The resets were clean, and the check found nothing left.
    assert!(
        !env.pgiam.log().contains("failed its reset"),
        "{}",
        env.pgiam.log()
    );
    if gateway {
        // Another identity, another role, the same backend: B is its own role and no other.
        let b = psql_queries(&env, true, &["SELECT current_user || '/' || session_user"]);
        assert!(b.ends_with(&format!("{OTHER_ROLE}/{GATEWAY_ROLE}")), "{b}");
        let a = psql_queries(&env, false, &["SELECT current_user || '/' || session_user"]);
        assert!(a.ends_with(&format!("{ROLE}/{GATEWAY_ROLE}")), "{a}");
        assert_eq!(
            a.lines().next(),
            b.lines().next(),
            "one backend serves both roles"
        );
    }
}

#[test]
fn no_session_state_crosses_a_pooled_backend_in_role_login_mode() {
    role_safety(false, "session");
}

#[test]
fn no_session_state_crosses_a_pooled_backend_in_gateway_mode() {
    role_safety(true, "session");
}

#[test]
fn no_session_state_crosses_a_transaction_pooled_backend_in_role_login_mode() {
    role_safety(false, "transaction");
}

#[test]
fn no_session_state_crosses_a_transaction_pooled_backend_in_gateway_mode() {
    role_safety(true, "transaction");
}

fn status(env: &Env) -> Value {
    let out = env.pgiam.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pool_until(env: &Env, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..300 {
        let s = status(env);
        if done(&s["pool"]) {
            return s["pool"].clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pool never reached the state: {}", status(env)["pool"]);
}

/// Sessions that come and go share one backend; pgbench with prepared statements and a new
/// connection per transaction runs through the pool with no failure; idle backends close
/// after their timeout.
#[test]
fn sessions_reuse_backends_and_idle_ones_close() {
    let metrics_addr = format!("127.0.0.1:{}", pgiam_tests::free_port());
    let env = Env::with(Setup {
        mapping: "pool = \"session\"".into(),
        extra: "[pool]\nidle_timeout_secs = 2\n".into(),
        admin: format!("metrics = \"{metrics_addr}\""),
        ..Setup::default()
    });
    env.pgbench_tables();
    let before = env.connections_received();
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        pids.insert(psql_ok(&dsn(&env), "SELECT pg_backend_pid()"));
    }
    assert_eq!(pids.len(), 1, "ten sessions, one backend: {pids:?}");
    assert_eq!(
        env.connections_received() - before,
        1,
        "the database saw one login for ten sessions"
    );
    // Each session's backend is given back after its client has gone: the tenth reset may
    // still be under way.
    pool_until(&env, |p| p["idle"] == 1 && p["in_use"] == 0);
    let m = pgiam_tests::scrape(&metrics_addr);
    let metric = |name: &str| pgiam_tests::metric(&m, name);
    assert_eq!(
        metric("pgiam_pool_checkouts_total{outcome=\"opened\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric("pgiam_pool_checkouts_total{outcome=\"reused\"}"),
        9.0,
        "{m}"
    );
    assert_eq!(
        metric("pgiam_pool_resets_total{outcome=\"clean\"}"),
        10.0,
        "{m}"
    );
    assert_eq!(metric("pgiam_pool_backends{state=\"idle\"}"), 1.0, "{m}");
    assert_eq!(metric("pgiam_pool_waiting_sessions"), 0.0, "{m}");

    let out = Command::new(pgiam_tests::pg_bin_dir().join("pgbench"))
        .args([
            "-n", "-C", "-M", "prepared", "-c", "4", "-j", "2", "-t", "50", "-S",
        ])
        .arg(dsn(&env))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
    let pool = pool_until(&env, |p| p["in_use"] == 0 && p["idle"].as_u64() >= Some(1));
    // Each client's next session may arrive while its last backend is still being reset.
    assert!(pool["idle"].as_u64().unwrap() <= 8, "{pool}");
    let text = String::from_utf8_lossy(&env.pgiam.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("pool:") && text.contains("idle"), "{text}");

    // Nothing used for idle_timeout_secs: closed, in pgiam and in the database.
    pool_until(&env, |p| p["idle"] == 0);
    let left = env.direct_until(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"),
        "0",
    );
    assert_eq!(left, "0", "the idle backends' server processes remain");
}

/// The cap on backends: a session beyond it waits in the queue (shown by status), gets a
/// backend as soon as one is given back, and is refused with 53300 when none comes in time.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_beyond_the_cap_wait_and_are_refused_after_the_queue_timeout() {
    let env = Env::with(Setup {
        mapping: "pool = \"session\"".into(),
        extra: "[pool]\nmax_backends = 1\nqueue_timeout_secs = 2\n".into(),
        ..Setup::default()
    });
    let holder = tokio_client(&dsn(&env)).await;
    holder.simple_query("SELECT 1").await.unwrap();
    pool_until(&env, |p| p["in_use"] == 1);

    // The queue runs out: 53300, with a message that says why.
    let refused = tokio_postgres::connect(&dsn(&env), tokio_postgres::NoTls).await;
    let err = refused.err().expect("refused beyond the cap");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(db.message().contains("too many connections"), "{db:?}");

    // A waiting session is served when the holder leaves.
    let waiting = tokio::spawn({
        let dsn = dsn(&env);
        async move {
            let c = tokio_client(&dsn).await;
            c.simple_query("SELECT 1").await.map(|_| ())
        }
    });
    let pool = pool_until(&env, |p| p["waiting"] == 1);
    assert_eq!(pool["in_use"], 1);
    drop(holder);
    waiting
        .await
        .unwrap()
        .expect("the waiting session got the backend");
    pool_until(&env, |p| p["waiting"] == 0);
}

/// A client that leaves in the middle of a statement takes its backend with it: the next
/// session gets another backend (the pool's only one, so it waited for the first to close).
#[test]
fn a_backend_whose_client_left_mid_statement_is_not_reused() {
    let env = Env::with(Setup {
        mapping: "pool = \"session\"".into(),
        extra: "[pool]\nmax_backends = 1\n".into(),
        ..Setup::default()
    });
    let warm = psql_queries(&env, false, &[]);
    let mut a = client("psql", false)
        .args(["-X", "-A", "-t", &dsn(&env), "-c", "SELECT pg_sleep(2)"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut a_pid = String::new();
    for _ in 0..250 {
        a_pid = env.direct("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(2)'");
        if !a_pid.trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a_pid.trim(), warm.trim(), "A got the pooled backend");
    a.kill().unwrap();
    a.wait().unwrap();
    let b = psql_queries(&env, false, &[]);
    assert_ne!(
        b.trim(),
        a_pid.trim(),
        "the backend A left mid-statement was reused"
    );
}

/// A session whose login gives up while it waits in the queue (its startup timeout is shorter
/// than the queue's) leaves the queue: the waiting count goes back down.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_gives_up_waiting_leaves_the_queue() {
    let env = Env::with(Setup {
        mapping: "pool = \"session\"".into(),
        limits: "startup_timeout_secs = 3".into(),
        extra: "[pool]\nmax_backends = 1\nqueue_timeout_secs = 30\n".into(),
        ..Setup::default()
    });
    let holder = tokio_client(&dsn(&env)).await;
    holder.simple_query("SELECT 1").await.unwrap();
    let gave_up = tokio_postgres::connect(&dsn(&env), tokio_postgres::NoTls).await;
    let err = gave_up
        .err()
        .expect("no backend within the startup timeout");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    pool_until(&env, |p| p["waiting"] == 0 && p["in_use"] == 1);
}
