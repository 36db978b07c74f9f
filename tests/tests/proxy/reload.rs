//! Live reload of pgiam.toml on SIGHUP (mappings, credentials, what is kept), and the logs
//! for machines (`log_format = "json"`).

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::fixture::*;

fn hup(env: &Env) {
    kill(Pid::from_raw(env.pgiam.pid()), Signal::SIGHUP).unwrap();
}

/// Waits until pgiam's log has `needle` `n` times; panics after 10 s.
fn log_until(env: &Env, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = env.pgiam.log();
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(Instant::now() < deadline, "no {needle:?} ×{n} in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rewrite(env: &Env, f: impl FnOnce(String) -> String) {
    let path = &env.pgiam.config_path;
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(text)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_mappings_live_keeps_what_it_cannot_and_refuses_a_bad_file() {
    let env = Env::start();
    env.direct("CREATE ROLE app_ro LOGIN PASSWORD 'ro-secret'");
    let ro_password =
        pgiam_tests::write_file(env.dir.path(), "app_ro.password", "ro-secret\n", 0o600);
    let before = tokio_client(&env.tcp_dsn("")).await;
    let row = before
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), ROLE);

    // 1. A reload that changes nothing for this session leaves it alone. The exe: mapping it
    //    adds can match nobody here (no eBPF interception records an executable): said, as
    //    at start.
    let nobody = "this mapping matches nobody";
    assert!(!env.pgiam.log().contains(nobody));
    rewrite(&env, |c| {
        c.replace("[limits]\n", "[limits]\nstartup_timeout_secs = 9\n")
            + &format!(
                "[[mapping]]\nprincipal = \"exe:/usr/bin/true\"\ndatabase = \"{DB}\"\nrole = \"{ROLE}\"\n"
            )
    });
    hup(&env);
    log_until(&env, "pgiam.toml reloaded", 1);
    log_until(&env, nobody, 1);
    before.simple_query("SELECT 1").await.unwrap();

    // 2. The mapping now names another role, and the listener another port (kept).
    let moved = format!("127.0.0.1:{}", pgiam_tests::free_port());
    rewrite(&env, |c| {
        c.replace(&format!("role = \"{ROLE}\""), "role = \"app_ro\"")
            .replace(
                &format!("[roles.{ROLE}]"),
                &format!(
                    "[roles.app_ro]\npassword_file = \"{}\"\n[roles.{ROLE}]",
                    ro_password.display()
                ),
            )
            .replace(
                &format!("tcp = \"{}\"", env.tcp),
                &format!("tcp = \"{moved}\""),
            )
    });
    hup(&env);
    let log = log_until(&env, "pgiam.toml reloaded", 2);
    assert!(
        log.contains("only change with a restart") && log.contains("listen"),
        "{log}"
    );
    // The session established under the old mapping is ended; it is told why.
    let e = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match before.simple_query("SELECT 1").await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the unmapped session was ended");
    if let Some(d) = e.as_db_error() {
        assert_eq!(d.code().code(), "57P01", "{d:?}");
        assert!(d.message().contains("no longer maps"), "{d:?}");
    }
    // New sessions get the new role, on the listener pgiam kept.
    let after = tokio_client(&env.tcp_dsn("")).await;
    let row = after
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app_ro");
    assert!(
        std::net::TcpStream::connect(&moved).is_err(),
        "not listening on the new address"
    );
    let status: Value = serde_json::from_str(
        &String::from_utf8(env.pgiam.cli(&["status", "--json"]).stdout).unwrap(),
    )
    .unwrap();
    assert_eq!(status["config"]["generation"], 2, "{status}");

    // 3. A file that does not validate is refused whole: the settings in force stay.
    rewrite(&env, |c| {
        c.replace("[limits]\n", "[limits]\nno_such_limit = 1\n")
    });
    hup(&env);
    let log = log_until(&env, "not reloaded", 1);
    assert!(log.contains("no_such_limit"), "{log}");
    after.simple_query("SELECT 1").await.unwrap();
    let again = tokio_client(&env.tcp_dsn("")).await;
    let row = again
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app_ro");

    let records = env.audit_records();
    assert!(records
        .iter()
        .any(|r| r["kind"] == "session_killed" && r["order"] == "unmapped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_the_session_id() {
    let mut env = Env::start();
    let config = format!(
        "log_format = \"json\"\n{}",
        std::fs::read_to_string(&env.pgiam.config_path).unwrap()
    );
    env.pgiam.stop();
    env.pgiam = pgiam_tests::Pgiam::start(&config, env.tcp).unwrap();
    let client = tokio_client(&env.tcp_dsn("")).await;
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    let session = env.audit_records_until(|r| r.iter().any(|r| r["kind"] == "session_end"));
    let id = session
        .iter()
        .rev()
        .find(|r| r["kind"] == "session" && r["decision"] == "allow")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = log_until(&env, "session ended", 1);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string());
    }
    let of_session: Vec<&Value> = lines
        .iter()
        .filter(|l| l["session"] == id.as_str())
        .collect();
    let messages: Vec<&str> = of_session
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("session established"))
            && messages.iter().any(|m| m.starts_with("session ended")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_issuer_comes_with_a_reload_and_people_can_log_in_at_once() {
    let env = Env::start();
    let socket = env.dir.path().join("login.sock");
    let whoami = || {
        let out = env
            .pgiam
            .cli_bare(&["whoami", "--socket", socket.to_str().unwrap()]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // No issuer: nobody can log in, and no socket invites them to.
    rewrite(&env, |c| {
        format!("{c}\n[people]\nsocket = \"{}\"\n", socket.display())
    });
    hup(&env);
    log_until(&env, "pgiam.toml reloaded", 1);
    assert!(!socket.exists());
    assert!(whoami().contains("cannot reach pgiam's login socket"));

    // The first issuer, by reload: the login socket opens without a restart and answers (the
    // caller is not logged in, or has no login session to bind to: either way, pgiam heard).
    rewrite(&env, |c| {
        format!("{c}\n[[oidc]]\nalias = \"corp\"\nissuer = \"http://127.0.0.1:9\"\nclient_id = \"pgiam\"\n")
    });
    hup(&env);
    log_until(&env, "login socket open", 1);
    let said = whoami();
    assert!(
        said.contains("not logged in") || said.contains("no login session"),
        "{said}\n{}",
        env.pgiam.log()
    );
}
