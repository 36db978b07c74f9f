//! The `pgiam` command line: bad configuration is refused with a message that names the problem.

use std::process::Command;

use pgiam_tests::{pgiam_bin, write_file};

fn pgiam(args: &[&str]) -> (bool, String) {
    let out = Command::new(pgiam_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.cedar", ALLOW_SELECT, 0o644);
    let bad_policy = write_file(
        dir.path(),
        "bad.cedar",
        "permit(principal, action == PgIam::Action::\"selekt\", resource);",
        0o644,
    );
    let base = format!(
        "state_dir = \"/tmp/x\"\n[listen]\ntcp = \"127.0.0.1:6432\"\n[upstream]\nhost = \"127.0.0.1\"\n[policy]\nfile = \"{}\"\n[roles.app]\n",
        policy.display()
    );
    let base = base.as_str();
    let cases = [
        (
            "nopolicy.toml",
            Some(base.replace(&format!("[policy]\nfile = \"{}\"\n", policy.display()), "")),
            "missing field `policy`",
        ),
        (
            "badpolicy.toml",
            Some(base.replace("policy.cedar", "bad.cedar")),
            "selekt",
        ),
        (
            "gateway.toml",
            Some(base.replace("[policy]", "mode = \"gateway\"\n[policy]")),
            "needs upstream.gateway_role",
        ),
        ("missing.toml", None, "cannot read"),
        (
            "syntax.toml",
            Some("state_dir = ".to_string()),
            "syntax.toml",
        ),
        (
            "remote.toml",
            Some(base.replace("127.0.0.1:6432", "0.0.0.0:6432")),
            "only loopback",
        ),
        (
            "norole.toml",
            Some(format!(
                "{base}[[mapping]]\nprincipal = \"uid:1\"\ndatabase = \"*\"\nrole = \"ghost\"\n"
            )),
            "no [roles.ghost]",
        ),
        (
            "typo.toml",
            Some(format!("{base}[listen2]\n")),
            "unknown field",
        ),
    ];
    for (name, contents, needle) in cases {
        let path = match contents {
            Some(c) => write_file(dir.path(), name, &c, 0o600),
            None => dir.path().join(name),
        };
        for cmd in [vec!["run", "--config"], vec!["check-config"]] {
            let mut args = cmd.clone();
            args.push(path.to_str().unwrap());
            let (ok, out) = pgiam(&args);
            assert!(!ok, "{args:?} must fail");
            assert!(
                out.contains(needle),
                "{args:?}: {out:?} should mention {needle:?}"
            );
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    let good = write_file(
        dir.path(),
        "good.toml",
        &format!(
            "{base}[[mapping]]\nprincipal = \"unit:x.service\"\ndatabase = \"*\"\nrole = \"app\"\n"
        ),
        0o600,
    );
    let (ok, out) = pgiam(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok (1 mappings, 1 roles, 2 policies)"),
        "{out}"
    );
    let (ok, out) = pgiam(&["policy", "check", bad_policy.to_str().unwrap()]);
    assert!(!ok && out.contains("selekt"), "{out}");
    let (ok, out) = pgiam(&["policy", "check", policy.to_str().unwrap()]);
    assert!(ok && out.contains("ok (2 policies)"), "{out}");
}

const ALLOW_SELECT: &str = r#"
@id("connect")
permit(principal, action == PgIam::Action::"connect", resource);
@id("read-public")
permit(principal, action == PgIam::Action::"select", resource in PgIam::Schema::"app.public")
  when { principal has unit && principal.unit == "x.service" };
"#;

#[test]
fn policy_test_says_what_is_decided_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.cedar", ALLOW_SELECT, 0o644);
    let p = policy.to_str().unwrap();
    let test = |who: &str, sql: &str| {
        pgiam(&[
            "policy", "test", "--policy", p, "--as", who, "--db", "app", "--sql", sql,
        ])
    };
    let (ok, out) = test("unit:x.service", "SELECT * FROM Accounts");
    assert!(ok, "{out}");
    assert!(out.contains(r#""decision": "allow""#), "{out}");
    assert!(out.contains(r#""read-public""#), "{out}");
    assert!(out.contains(r#""name": "accounts""#), "{out}");
    let (ok, out) = test("unit:y.service", "SELECT * FROM accounts");
    assert!(!ok, "{out}");
    assert!(out.contains("select on table public.accounts"), "{out}");
    let (ok, out) = test("unit:x.service", "SELECT 1; DELETE FROM accounts");
    assert!(
        !ok && out.contains("delete on table public.accounts"),
        "{out}"
    );
    // Changing search_path is a `set`, which this policy does not permit.
    let (ok, out) = test("unit:x.service", "SET search_path = evil");
    assert!(!ok && out.contains("set on database app"), "{out}");
    let (ok, out) = pgiam(&["policy", "schema"]);
    assert!(ok && out.contains("namespace PgIam"), "{out}");
}

#[test]
fn systemd_readiness_is_notified_once_listening() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let port = pgiam_tests::free_port();
    let config = write_file(
        dir.path(),
        "pgiam.toml",
        &format!(
            "state_dir = \"{}/state\"\n[listen]\ntcp = \"127.0.0.1:{port}\"\n[upstream]\nhost = \"127.0.0.1\"\n[policy]\nfile = \"{}\"\n",
            dir.path().display(),
            write_file(dir.path(), "p.cedar", "", 0o644).display()
        ),
        0o600,
    );
    let mut child = Command::new(pgiam_bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf);
    // Ready means serving: the listener accepts by the time READY=1 arrives.
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n2 = sock.recv(&mut buf[32..]);
    child.wait().unwrap();
    assert_eq!(&buf[..n.unwrap()], b"READY=1");
    assert!(listening);
    assert_eq!(&buf[32..32 + n2.unwrap()], b"STOPPING=1");
}

#[test]
fn sql_classify_shows_what_a_statement_touches() {
    let (ok, out) = pgiam(&[
        "sql",
        "classify",
        "DECLARE c CURSOR FOR SELECT * FROM Secret; SET ROLE postgres",
    ]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains(r#""command":"declare""#), "{out}");
    assert!(
        lines[0].contains(r#"{"name":"secret","access":"select"}"#),
        "{out}"
    );
    assert!(lines[1].contains(r#""role_change":true"#), "{out}");
    let (ok, out) = pgiam(&["sql", "classify", "SELEC 1"]);
    assert!(!ok);
    assert!(out.contains("syntax error"), "{out}");
}

/// Output piped into a reader that stops early (`pgiam … | head`) ends the command quietly
/// by SIGPIPE, as other tools end, not with a panic.
#[test]
fn a_reader_that_stops_early_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(pgiam_bin())
        .args(["policy", "schema"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "{:?} {err}",
        out.status
    );
}
