//! People through a real OpenID provider (`oidc-provider`, `tests/idp/`): `pgiam login`'s device
//! flow approved with a password and a TOTP second factor through the provider's own pages, then
//! unmodified psql in that login session, intercepted, carrying the person. Another user, or
//! the same user in another login session, does not carry them; an ID token works as a
//! password and forged ones are refused; expiry, logout and the issuer's refusal end live
//! sessions, and so does a refresh that takes away what a live session was let in for; a
//! policy asks for a recent second factor for DDL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgiam_tests::idp::{Idp, ALICE_TOTP};
use pgiam_tests::{
    free_port, pg_bin_dir, pgiam_bin, write_file, PgCluster, PgOptions, Pgiam, TestCgroup,
};

use super::{output, text};

const DB: &str = "app";

/// DDL only with a second factor used in the last 15 minutes; everything else for everyone
/// mapped.
const POLICY: &str = r#"
@id("everything")
permit(principal, action, resource);

@id("suspended-may-not-connect")
forbid(principal, action == PgIam::Action::"connect", resource)
when { principal has groups && principal.groups.contains("suspended") };

@id("ddl-needs-recent-mfa")
forbid(principal, action == PgIam::Action::"ddl", resource)
unless {
  principal has mfa && principal.mfa &&
  principal has auth_time && context.now - principal.auth_time < 900
};
"#;

struct Env {
    pgiam: Option<Pgiam>,
    listen: SocketAddr,
    config_path: PathBuf,
    socket: PathBuf,
    audit: PathBuf,
    idp: Idp,
    /// Alice's login session, and another one.
    alice: TestCgroup,
    other: TestCgroup,
    _proxy: TestCgroup,
    _root: TestCgroup,
    pg: PgCluster,
    _dir: tempfile::TempDir,
}

impl Env {
    /// `introspect_secs`: how often pgiam asks the provider whether a login is still active.
    fn start(id_token_ttl: u64, refresh: bool, introspect_secs: u64) -> Env {
        let pg = PgCluster::start(PgOptions {
            hba_lines: Some(vec![
                "local all all trust".into(),
                "host all all 127.0.0.1/32 scram-sha-256".into(),
            ]),
            ..PgOptions::default()
        })
        .expect("start PostgreSQL");
        pg.psql("CREATE ROLE app_rw LOGIN PASSWORD 'rw-secret'")
            .unwrap();
        pg.psql("CREATE ROLE app_ro LOGIN PASSWORD 'ro-secret'")
            .unwrap();
        pg.psql(&format!("CREATE DATABASE {DB} OWNER app_rw"))
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix("pgiam-people-")
            .tempdir()
            .unwrap();
        // The people's CLI (uid nobody) reaches the login socket inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let idp = Idp::start(dir.path(), id_token_ttl).expect("start the OpenID provider");
        let root = TestCgroup::new("pgiam-people");
        let (proxy, alice, other) = (
            root.child("pgiam"),
            root.child("alice-session"),
            root.child("other-session"),
        );
        let port = free_port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let socket = dir.path().join("login.sock");
        let audit = dir.path().join("audit.jsonl");
        let bpffs = format!(
            "/sys/fs/bpf/pgiam-test-{}",
            root.path.trim_start_matches('/')
        );
        let config = format!(
            r#"
state_dir = "{state}"
[listen]
tcp = "{listen}"
[upstream]
host = "127.0.0.1"
port = {pg_port}
[policy]
file = "{policy}"
[audit]
path = "{audit}"
[roles.app_rw]
password_file = "{rw}"
[roles.app_ro]
password_file = "{ro}"
[admin]
socket = "{admin}"
[people]
socket = "{socket}"
[[oidc]]
alias = "corp"
issuer = "{issuer}"
client_id = "pgiam"
accept_passwords = true
refresh = {refresh}
introspect_secs = {introspect_secs}
[[mapping]]
principal = "oidc-group:corp:dba"
database = "{DB}"
role = "app_rw"
[[mapping]]
principal = "oidc:corp:bob"
database = "{DB}"
role = "app_ro"
[interception]
cgroup = "{root}"
endpoints = ["127.0.0.1"]
ports = [{pg_port}]
bpffs_dir = "{bpffs}"
"#,
            state = dir.path().join("state").display(),
            pg_port = pg.port,
            policy = write_file(dir.path(), "policy.cedar", POLICY, 0o644).display(),
            audit = audit.display(),
            rw = write_file(dir.path(), "rw.pw", "rw-secret", 0o600).display(),
            ro = write_file(dir.path(), "ro.pw", "ro-secret", 0o600).display(),
            socket = socket.display(),
            admin = dir.path().join("admin.sock").display(),
            issuer = idp.issuer,
            root = root.path,
        );
        let config_path = write_file(dir.path(), "pgiam.toml", &config, 0o600);
        let pgiam = Pgiam::start_in(pgiam_bin(), &config, listen, Some(&proxy))
            .expect("start pgiam with interception and an issuer");
        Env {
            pgiam: Some(pgiam),
            listen,
            config_path,
            socket,
            audit,
            idp,
            alice,
            other,
            _proxy: proxy,
            _root: root,
            pg,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        self.pgiam.as_ref().map(Pgiam::log).unwrap_or_default()
    }

    /// Stops pgiam and starts it again with the same configuration (its pins are reused).
    fn restart(&mut self) {
        if let Some(mut p) = self.pgiam.take() {
            p.stop();
        }
        let config = std::fs::read_to_string(&self.config_path).unwrap();
        self.pgiam = Some(
            Pgiam::start_in(pgiam_bin(), &config, self.listen, Some(&self._proxy))
                .expect("start pgiam again"),
        );
    }

    /// After a restart, alice's login is taken back (within 10 s): `whoami` names her and
    /// psql in her login session is the role her group maps to, with no new `pgiam login`.
    fn assert_alice_is_back(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let whoami = loop {
            let said = text(&self.cli(&self.alice, "nobody", "whoami"));
            if said.contains("oidc:corp:alice") || Instant::now() > deadline {
                break said;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            whoami.contains("oidc:corp:alice"),
            "{whoami}\n{}",
            self.log()
        );
        let as_alice = self.psql(&self.alice, "nobody", "SELECT current_user", None);
        assert_eq!(
            String::from_utf8_lossy(&as_alice.stdout).trim(),
            "app_rw",
            "{}\n{}",
            text(&as_alice),
            self.log()
        );
    }

    /// The database's own address, as an unmodified application dials it.
    fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={DB} user=whoever connect_timeout=10",
            self.pg.port
        )
    }

    /// `pgiam login` as `user` in `cg`, approved by `person` (with the TOTP second factor
    /// when `totp`).
    fn login(&self, cg: &TestCgroup, user: &str, person: (&str, &str), totp: bool) -> Output {
        let mut child = cg
            .command_as(pgiam_bin(), user)
            .args(["login", "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run pgiam login");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut shown = String::new();
        let url = loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let out = child.wait_with_output().unwrap();
                panic!("pgiam login showed no link: {shown}{}", text(&out));
            }
            shown.push_str(&line);
            if let Some(url) = line.trim().strip_prefix("or open ") {
                break url.to_owned();
            }
        };
        self.idp
            .approve(&url, person.0, person.1, totp.then_some(ALICE_TOTP));
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let mut out = child.wait_with_output().unwrap();
        out.stdout = (shown + &rest).into_bytes();
        out
    }

    fn cli(&self, cg: &TestCgroup, user: &str, verb: &str) -> Output {
        output(
            cg.command_as(pgiam_bin(), user)
                .args([verb, "--socket"])
                .arg(&self.socket),
        )
    }

    fn psql(&self, cg: &TestCgroup, user: &str, sql: &str, password: Option<&str>) -> Output {
        let mut cmd = psql_command(cg, user, &self.dsn(), sql);
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        output(&mut cmd)
    }

    /// Whether a statement record's SQL contains `sql`.
    fn ran(&self, sql: &str) -> bool {
        self.records("statement")
            .iter()
            .any(|r| r["sql"].as_str().is_some_and(|s| s.contains(sql)))
    }

    /// How many refreshes of `person`'s login pgiam has logged.
    fn refreshes(&self, person: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("login refreshed") && l.contains(person))
            .count()
    }

    /// Records of `kind` in the audit log.
    fn records(&self, kind: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == kind)
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        super::stop_and_uninstall(&mut self.pgiam, &self.config_path);
    }
}

fn psql_command(cg: &TestCgroup, user: &str, dsn: &str, sql: &str) -> Command {
    let mut cmd = cg.command_as(pg_bin_dir().join("psql"), user);
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10");
    cmd
}

/// A psql that holds its session open in `pg_sleep`, to be ended from outside.
fn long_session(env: &Env) -> Child {
    psql_command(&env.alice, "nobody", &env.dsn(), "SELECT pg_sleep(90)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql")
}

/// Waits (up to `limit`) for `child` to exit; its output. Kills it if it does not.
fn ended_within(mut child: Child, limit: Duration) -> Option<Output> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A psql in `cg` that has run `first` and waits, idle, for its next line on the stdin
/// returned (its session rests meanwhile).
fn idle_session(env: &Env, cg: &TestCgroup, first: &str) -> (Child, std::process::ChildStdin) {
    let mut child = cg
        .command_as(pg_bin_dir().join("psql"), "nobody")
        .args(["-X", "-A", "-t", &env.dsn()])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, format!("{first};\n").as_bytes()).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || env.ran(first)),
        "{first} did not run: {}",
        env.log()
    );
    (child, stdin)
}

/// Sends `sql` to an idle psql and closes its input; what psql said, once it ended.
fn last_line(child: Child, mut stdin: std::process::ChildStdin, sql: &str) -> Output {
    std::io::Write::write_all(&mut stdin, format!("{sql};\n").as_bytes()).unwrap();
    drop(stdin);
    ended_within(child, Duration::from_secs(10)).expect("psql ended")
}

/// alice, logged in with her second factor, with a session idle since its first statement,
/// once a refresh has put her in group "oncall" (her mapping, through dba, still holds).
fn alice_idle_then_oncall(env: &Env) -> (Child, std::process::ChildStdin) {
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let idle = idle_session(env, &env.alice, "SELECT 'alice ran ' || current_user");
    env.idp.post("/test/groups?sub=alice&groups=dba,eng,oncall");
    let carries_oncall =
        || text(&env.cli(&env.alice, "nobody", "whoami")).contains("oidc-group:corp:oncall");
    assert!(
        wait_for(Duration::from_secs(15), carries_oncall),
        "{}",
        env.log()
    );
    idle
}

/// An idle psql whose session pgiam ended sends `sql`: it says `said` and `sql` never ran.
fn ended_before(env: &Env, idle: (Child, std::process::ChildStdin), sql: &str, said: &str) {
    let out = text(&last_line(idle.0, idle.1, sql));
    assert!(out.contains(said), "{out}\n{}", env.log());
    assert!(!env.ran(sql), "{}", env.log());
}

/// Polls `done` every 100 ms for up to `limit`; whether it came true.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

const ALICE: (&str, &str) = ("alice", "alice-pw");
const BOB: (&str, &str) = ("bob", "bob-pw");

#[test]
fn a_login_carries_the_person_for_its_own_login_session_only() {
    let env = Env::start(300, true, 60);
    // Before any login nothing maps alice's session: pgiam asks for a password (a token),
    // which psql does not have.
    let before = env.psql(&env.alice, "nobody", "SELECT current_user", None);
    assert!(!before.status.success(), "{}", text(&before));

    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(
        login.status.success(),
        "login: {}\n{}",
        text(&login),
        env.log()
    );
    let shown = text(&login);
    assert!(
        shown.contains("alice@example.com") && shown.contains("multi-factor"),
        "{shown}"
    );

    let whoami = env.cli(&env.alice, "nobody", "whoami");
    assert!(
        text(&whoami).contains("oidc:corp:alice"),
        "{}",
        text(&whoami)
    );
    let as_alice = env.psql(&env.alice, "nobody", "SELECT current_user", None);
    assert_eq!(
        String::from_utf8_lossy(&as_alice.stdout).trim(),
        "app_rw",
        "{}\n{}",
        text(&as_alice),
        env.log()
    );

    // Another user in the same cgroup, and the same user in another login session: not alice.
    for (cg, user) in [(&env.alice, "root"), (&env.other, "nobody")] {
        let out = env.psql(cg, user, "SELECT current_user", None);
        assert!(
            !out.status.success(),
            "{user} in {}: {}",
            cg.path,
            text(&out)
        );
        let whoami = text(&env.cli(cg, user, "whoami"));
        assert!(
            whoami.contains("not logged in") && !whoami.contains("oidc:corp:alice"),
            "whoami of {user} in {}: {whoami}",
            cg.path
        );
    }

    // The audit names the person, with the factors used, beside the workload.
    let sessions = env.records("session");
    let session = sessions
        .iter()
        .find(|r| r["identity"]["person"]["subject"] == "alice")
        .unwrap_or_else(|| panic!("no session record with alice: {sessions:?}"));
    let person = &session["identity"]["person"];
    assert_eq!(person["email"], "alice@example.com");
    assert_eq!(person["amr"], serde_json::json!(["pwd", "otp"]));
    assert_eq!(person["mfa"], true);
    assert_eq!(session["identity"]["uid"], 65534);
    assert_eq!(session["principal"], "oidc-group:corp:dba");
    assert!(env
        .records("statement")
        .iter()
        .any(|r| r["person"] == "oidc:corp:alice" && r["sql"] == "SELECT current_user"));
    assert_eq!(env.records("login").len(), 1);

    // Logout ends her live session at once.
    let live = long_session(&env);
    std::thread::sleep(Duration::from_millis(1500));
    let logout = env.cli(&env.alice, "nobody", "logout");
    assert!(logout.status.success(), "{}", text(&logout));
    let ended = ended_within(live, Duration::from_secs(10)).expect("the session ended");
    let said = text(&ended);
    assert!(
        said.contains("the login of oidc:corp:alice ended") && said.contains("logged out"),
        "{said}"
    );
    let revoked = env.records("session_revoked");
    assert!(
        revoked.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("logged out"))),
        "{revoked:?}"
    );
    let after = env.psql(&env.alice, "nobody", "SELECT current_user", None);
    assert!(!after.status.success(), "{}", text(&after));
}

#[test]
fn ddl_needs_a_recent_second_factor() {
    let env = Env::start(300, true, 60);
    // The statement does what it says directly against PostgreSQL.
    env.pg
        .psql_db(DB, "CREATE TABLE direct_ddl (a int); DROP TABLE direct_ddl")
        .unwrap();

    let login = env.login(&env.alice, "nobody", ALICE, false);
    assert!(login.status.success(), "{}", text(&login));
    assert!(text(&login).contains("one factor"), "{}", text(&login));
    let read = env.psql(&env.alice, "nobody", "SELECT 1", None);
    assert!(read.status.success(), "{}", text(&read));
    let ddl = env.psql(&env.alice, "nobody", "CREATE TABLE t_step_up (a int)", None);
    assert!(!ddl.status.success(), "DDL without MFA: {}", text(&ddl));
    assert!(text(&ddl).contains("permission denied"), "{}", text(&ddl));

    // A session open across the step-up: refused before it, allowed after it, without
    // reconnecting (the session follows its person's login).
    let mut held = env
        .alice
        .command_as(pg_bin_dir().join("psql"), "nobody")
        .args(["-X", "-A", "-t", &env.dsn(), "-f", "-"])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let mut stdin = held.stdin.take().unwrap();
    use std::io::Write as _;
    writeln!(stdin, "CREATE TABLE t_before (a int);").unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // The same person steps up with a second factor: DDL is allowed.
    let again = env.login(&env.alice, "nobody", ALICE, true);
    assert!(again.status.success(), "{}", text(&again));
    let ddl = env.psql(&env.alice, "nobody", "CREATE TABLE t_step_up (a int)", None);
    assert!(
        ddl.status.success(),
        "DDL with MFA: {}\n{}",
        text(&ddl),
        env.log()
    );
    writeln!(stdin, "CREATE TABLE t_after (a int);").unwrap();
    drop(stdin);
    let held = held.wait_with_output().unwrap();
    let tables = env
        .pg
        .psql_db(
            DB,
            "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class \
             WHERE relname IN ('t_before', 't_after')",
        )
        .unwrap();
    assert_eq!(tables, "t_after", "{}\n{}", text(&held), env.log());
    let denied = env.records("statement");
    assert!(denied.iter().any(|r| r["decision"] == "deny"
        && r["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "ddl-needs-recent-mfa"))));
}

#[test]
fn an_id_token_works_as_a_password_and_forged_ones_are_refused() {
    let env = Env::start(300, true, 60);
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let token = env.cli(&env.alice, "nobody", "token");
    assert!(token.status.success(), "{}", text(&token));
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();

    // From a session with no login (another login session), the token as the password.
    let out = env.psql(&env.other, "nobody", "SELECT current_user", Some(&token));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "app_rw",
        "{}\n{}",
        text(&out),
        env.log()
    );
    assert!(env
        .records("session")
        .iter()
        .any(|r| r["identity"]["person"]["via"] == "password"));

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = |iss: &str, aud: &str, exp: i64| {
        serde_json::json!({
            "iss": iss, "aud": aud, "sub": "alice", "exp": exp, "iat": now,
            "email": "alice@example.com", "email_verified": true, "groups": ["dba"],
            "amr": ["pwd", "otp"], "auth_time": now,
        })
    };
    let issuer = env.idp.issuer.clone();
    let cases = [
        (
            "a key the issuer never published",
            env.idp.forge(false, claims(&issuer, "pgiam", now + 300)),
            "does not publish",
        ),
        (
            "another issuer",
            env.idp
                .forge(true, claims("https://evil.example.com", "pgiam", now + 300)),
            "not a configured issuer",
        ),
        (
            "another audience",
            env.idp.forge(true, claims(&issuer, "other-app", now + 300)),
            "another audience",
        ),
        (
            "an expired token",
            env.idp.forge(true, claims(&issuer, "pgiam", now - 3600)),
            "expired",
        ),
        ("not a token", "hunter2".to_owned(), "not a JWT"),
    ];
    // The forgery is sound: the same claims with the provider's key and a valid life pass.
    let genuine = env.idp.forge(true, claims(&issuer, "pgiam", now + 300));
    let out = env.psql(&env.other, "nobody", "SELECT current_user", Some(&genuine));
    assert!(out.status.success(), "a well-formed token: {}", text(&out));
    for (what, token, reason) in cases {
        let out = env.psql(&env.other, "nobody", "SELECT current_user", Some(&token));
        let said = text(&out);
        assert!(!out.status.success(), "{what}: {said}");
        assert!(
            said.contains("password authentication failed") && said.contains(reason),
            "{what}: {said}"
        );
    }
}

#[test]
fn expiry_ends_a_live_session() {
    let env = Env::start(8, false, 60);
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let live = long_session(&env);
    let ended = ended_within(live, Duration::from_secs(30)).expect("the session ended");
    let said = text(&ended);
    assert!(said.contains("token expired"), "{said}\n{}", env.log());
    assert!(env
        .records("login_ended")
        .iter()
        .any(|r| r["reason"].as_str().is_some_and(|s| s.contains("expired"))));
    assert!(!text(&env.cli(&env.alice, "nobody", "whoami")).contains("oidc:corp:alice"));
}

#[test]
fn refresh_outlives_key_rotation_and_the_issuers_refusal_ends_the_login() {
    let env = Env::start(8, true, 60);
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let live = long_session(&env);
    // Past two token lifetimes the session is alive: the login was refreshed.
    std::thread::sleep(Duration::from_secs(12));
    let mut live = live;
    assert!(live.try_wait().unwrap().is_none(), "{}", env.log());
    assert!(env.log().contains("login refreshed"), "{}", env.log());

    // The provider rotates its signing key: the next refresh's token has a kid pgiam has not
    // seen, fetched from the provider's key set, and the session goes on.
    let rotated = env.idp.post("/test/rotate?generate=1");
    let kid: serde_json::Value = serde_json::from_str(&rotated).unwrap();
    let refreshed_before = env.log().matches("login refreshed").count();
    std::thread::sleep(Duration::from_secs(9));
    assert!(live.try_wait().unwrap().is_none(), "{}", env.log());
    assert!(
        env.log().matches("login refreshed").count() > refreshed_before,
        "no refresh after rotation to {kid}: {}",
        env.log()
    );

    // The issuer revokes alice's grants: the next refresh is refused and her session ends
    // (introspection, every 60 s here, does not come first).
    env.idp.post("/test/revoke?sub=alice");
    let ended = ended_within(live, Duration::from_secs(20)).expect("the session ended");
    let said = text(&ended);
    assert!(said.contains("refused to renew"), "{said}\n{}", env.log());
}

#[test]
fn a_refresh_that_takes_access_away_ends_the_live_sessions_it_carried() {
    let env = Env::start(8, true, 60);
    // alice is mapped to app_rw through her group dba; bob to app_ro by name, and a policy
    // lets nobody in group "suspended" connect.
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let login = env.login(&env.other, "nobody", BOB, false);
    assert!(login.status.success(), "{}", text(&login));
    // alice's session is busy; bob's has run a statement and rests, waiting for psql's next
    // line.
    let mut alice = long_session(&env);
    let (mut bob, bob_says) = idle_session(&env, &env.other, "SELECT 'bob ran ' || current_user");
    // Both live through a refresh that changes nothing (the token lives 8 s, renewed at 6).
    assert!(
        wait_for(Duration::from_secs(15), || env.refreshes("oidc:corp:bob")
            > 0
            && env.refreshes("oidc:corp:alice") > 0),
        "{}",
        env.log()
    );
    assert!(alice.try_wait().unwrap().is_none(), "{}", env.log());
    assert!(bob.try_wait().unwrap().is_none(), "{}", env.log());

    // The directory takes alice out of dba (nothing maps her now) and puts bob in
    // "suspended": their next refresh ends their sessions, the idle one too, before either
    // runs anything more.
    env.idp.post("/test/groups?sub=alice&groups=eng");
    env.idp.post("/test/groups?sub=bob&groups=eng,suspended");
    let ended = ended_within(alice, Duration::from_secs(20)).expect("alice's session ended");
    let said = text(&ended);
    assert!(
        said.contains("no longer maps to the session's role"),
        "{said}\n{}",
        env.log()
    );
    let revoked = || {
        env.records("session_revoked").iter().any(|r| {
            r["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == "suspended-may-not-connect"))
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), revoked),
        "bob's idle session was not ended: {}",
        env.log()
    );
    ended_before(
        &env,
        (bob, bob_says),
        "SELECT 'bob ran again'",
        "was revoked",
    );
    assert!(env.records("session_revoked").iter().any(|r| r["reason"]
        .as_str()
        .is_some_and(|s| s.contains("no longer maps"))));
}

#[test]
fn a_revocation_reaches_the_names_a_renewed_login_carries() {
    let env = Env::start(8, true, 60);
    // The directory puts alice in "oncall"; once her login is refreshed with it, revoking
    // that group ends her session, which logged in before she was in it.
    let alice = alice_idle_then_oncall(&env);
    let login = env.login(&env.other, "nobody", BOB, false);
    assert!(login.status.success(), "{}", text(&login));
    let mut bob = idle_session(&env, &env.other, "SELECT 'bob ran ' || current_user");
    // `pgiam sessions` shows her as her login is now.
    let listed = env.pgiam.as_ref().unwrap().cli(&["sessions", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["identity"]["person"]["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g == "oncall"))),
        "{listed}"
    );
    let out = env.pgiam.as_ref().unwrap().cli(&[
        "revoke",
        "--principal",
        "oidc-group:corp:oncall",
        "--reason",
        "incident 9",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    ended_before(
        &env,
        alice,
        "SELECT 'alice ran again'",
        "the access of oidc-group:corp:oncall was revoked",
    );
    assert!(bob.0.try_wait().unwrap().is_none(), "{}", env.log());

    // bob joins the revoked group afterwards: his next refresh ends his session.
    env.idp.post("/test/groups?sub=bob&groups=eng,oncall");
    let killed = || {
        env.records("session_killed").iter().any(|r| {
            r["order"] == "revoke"
                && r["principal"] == "oidc-group:corp:oncall"
                && r["reason"] == "incident 9"
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), || env
            .records("session_killed")
            .iter()
            .filter(|r| r["order"] == "revoke")
            .count()
            == 2),
        "bob's session was not ended: {}",
        env.log()
    );
    assert!(killed(), "{}", env.log());
    ended_before(&env, bob, "SELECT 'bob ran again'", "was revoked");
}

#[test]
fn a_reload_maps_a_renewed_login_as_it_is_now() {
    let env = Env::start(8, true, 60);
    // Her refresh puts her in "oncall" (her mapping, through dba, still holds)...
    let alice = alice_idle_then_oncall(&env);
    // ...and a reload maps oncall, first, to another role: her session, as she is now, is
    // no longer mapped to the role it has.
    let pgiam = env.pgiam.as_ref().unwrap();
    let config = std::fs::read_to_string(&pgiam.config_path).unwrap().replacen(
        "[[mapping]]",
        "[[mapping]]\nprincipal = \"oidc-group:corp:oncall\"\ndatabase = \"app\"\nrole = \"app_ro\"\n[[mapping]]",
        1,
    );
    std::fs::write(&pgiam.config_path, config).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pgiam.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let unmapped = || {
        env.records("session_killed")
            .iter()
            .any(|r| r["order"] == "unmapped")
    };
    assert!(wait_for(Duration::from_secs(10), unmapped), "{}", env.log());
    ended_before(&env, alice, "SELECT 'alice ran again'", "no longer maps");
}

#[test]
fn introspection_ends_a_login_the_issuer_revoked_before_its_next_refresh() {
    // Tokens live 10 minutes: a refresh would learn of the revocation 7.5 minutes on.
    let env = Env::start(600, true, 1);
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let mut live = long_session(&env);
    // The provider says the login is active: asked several times, the session goes on.
    std::thread::sleep(Duration::from_secs(4));
    assert!(live.try_wait().unwrap().is_none(), "{}", env.log());

    env.idp.post("/test/revoke?sub=alice");
    let ended = ended_within(live, Duration::from_secs(15)).expect("the session ended");
    let said = text(&ended);
    assert!(said.contains("revoked the login"), "{said}\n{}", env.log());
    assert!(
        env.records("login_ended")
            .iter()
            .any(|r| r["reason"].as_str().is_some_and(|s| s.contains("revoked"))),
        "{}",
        env.log()
    );
    assert!(!text(&env.cli(&env.alice, "nobody", "whoami")).contains("oidc:corp:alice"));
}

#[test]
fn a_login_outlives_a_restart_of_pgiam_and_so_does_a_logout() {
    let mut env = Env::start(300, true, 60);
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    let kept = env._dir.path().join("state").join("logins.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&kept).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o600,
        "the kept logins hold tokens: root's alone"
    );

    // pgiam restarts (an upgrade, say): alice is still logged in, with no new `pgiam login`.
    env.restart();
    env.assert_alice_is_back();
    assert!(!env.records("login_restored").is_empty(), "{}", env.log());

    // A logout is kept as well: the next restart does not bring the login back.
    let out = env.cli(&env.alice, "nobody", "logout");
    assert!(out.status.success(), "{}", text(&out));
    env.restart();
    std::thread::sleep(Duration::from_secs(2));
    let whoami = text(&env.cli(&env.alice, "nobody", "whoami"));
    assert!(
        !whoami.contains("oidc:corp:alice"),
        "{whoami}\n{}",
        env.log()
    );
}

#[test]
fn a_login_whose_token_expired_while_pgiam_was_down_is_renewed_at_start() {
    let mut env = Env::start(6, true, 60);
    let login = env.login(&env.alice, "nobody", ALICE, true);
    assert!(login.status.success(), "{}", text(&login));
    if let Some(mut p) = env.pgiam.take() {
        p.stop();
    }
    // Down for longer than the ID token lives: it is renewed with the kept refresh token.
    std::thread::sleep(Duration::from_secs(8));
    env.restart();
    env.assert_alice_is_back();
}
