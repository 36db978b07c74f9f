//! A real PostgreSQL with a login role, and a pgiam in front of it mapping this test process's
//! user to that role.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pgiam_tests::{free_port, pg_bin_dir, write_file, PgCluster, PgOptions, Pgiam};

pub const ROLE: &str = "app_rw";
pub const DB: &str = "app";

pub struct Env {
    pub pg: PgCluster,
    pub pgiam: Pgiam,
    pub tcp: SocketAddr,
    /// libpq-style socket directory and port of pgiam's unix listener.
    pub unix_dir: PathBuf,
    pub unix_port: u16,
    pub dir: tempfile::TempDir,
}

/// Knobs a test may turn; everything else is the standard setup.
pub struct Setup {
    pub pg: PgOptions,
    /// Extra TOML appended to pgiam's config (sections after the standard ones).
    pub extra: String,
    /// `[upstream]` body; defaults to the cluster's TCP address without TLS.
    pub upstream: Option<String>,
    /// `[client_tls]` body.
    pub client_tls: String,
    /// `[limits]` body.
    pub limits: String,
    /// Principal mapped to ROLE on DB.
    pub principal: String,
    /// `[audit]` path; `None`: `audit.jsonl` in the test's directory.
    pub audit_path: Option<String>,
    /// The Cedar policy; by default everything is permitted.
    pub policy: String,
    /// More of `[policy]` than its file.
    pub policy_settings: String,
    /// More of `[admin]` than its socket (`admin.sock` in the test's directory).
    pub admin: String,
    /// More keys of the standard mapping (e.g. `pool = "session"`).
    pub mapping: String,
    /// Environment variables for pgiam.
    pub env: Vec<(&'static str, String)>,
}

pub const ALLOW_ALL: &str = "@id(\"test-allow-all\")\npermit(principal, action, resource);\n";

impl Default for Setup {
    fn default() -> Self {
        Setup {
            pg: PgOptions::default(),
            extra: String::new(),
            upstream: None,
            client_tls: "mode = \"generate\"".into(),
            limits: String::new(),
            principal: format!("uid:{}", nix::unistd::geteuid()),
            audit_path: None,
            policy: ALLOW_ALL.into(),
            policy_settings: String::new(),
            admin: String::new(),
            mapping: String::new(),
            env: Vec::new(),
        }
    }
}

impl Env {
    pub fn start() -> Env {
        Env::with(Setup::default())
    }

    pub fn with(setup: Setup) -> Env {
        let pg = PgCluster::start(setup.pg).expect("start PostgreSQL");
        pg.psql(&format!("CREATE ROLE {ROLE} LOGIN PASSWORD 'rw-secret'"))
            .unwrap();
        pg.psql(&format!("CREATE DATABASE {DB} OWNER {ROLE}"))
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix("pgiam-test-")
            .tempdir()
            .unwrap();
        let pw = write_file(dir.path(), "app_rw.password", "rw-secret\n", 0o600);
        let mut tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let unix_port = free_port();
        let unix_dir = dir.path().join("sock");
        std::fs::create_dir_all(&unix_dir).unwrap();
        // Other OS users (nobody) must reach the socket to be refused by identity.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(
            &unix_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        // `PGPORT` in a custom upstream section stands for the cluster's port.
        let upstream = setup
            .upstream
            .unwrap_or_else(|| "host = \"127.0.0.1\"\nport = PGPORT".into())
            .replace("PGPORT", &pg.port.to_string());
        let config = format!(
            r#"
state_dir = "{state}"
[listen]
tcp = "{tcp}"
unix = "{unix}"
[limits]
{limits}
[client_tls]
{client_tls}
[upstream]
{upstream}
[roles.{ROLE}]
password_file = "{pw}"
[[mapping]]
principal = "{principal}"
database = "{DB}"
role = "{ROLE}"
{mapping}
[policy]
file = "{policy}"
{policy_settings}
[admin]
socket = "{admin_socket}"
{admin}
[audit]
path = "{audit}"
{extra}
"#,
            policy = write_file(dir.path(), "policy.cedar", &setup.policy, 0o644).display(),
            state = dir.path().join("state").display(),
            unix = unix_dir.join(format!(".s.PGSQL.{unix_port}")).display(),
            limits = setup.limits,
            policy_settings = setup.policy_settings,
            admin_socket = dir.path().join("admin.sock").display(),
            admin = setup.admin,
            mapping = setup.mapping,
            client_tls = setup.client_tls,
            pw = pw.display(),
            principal = setup.principal,
            audit = setup.audit_path.unwrap_or_else(|| dir
                .path()
                .join("audit.jsonl")
                .display()
                .to_string()),
            extra = setup.extra,
        );
        // A port that was free a moment ago may be another process's by now (an ephemeral
        // port of some client): then pgiam is started again on another.
        let mut config = config;
        let mut attempts = 0;
        let env: Vec<(&str, &std::ffi::OsStr)> = setup
            .env
            .iter()
            .map(|(k, v)| (*k, std::ffi::OsStr::new(v.as_str())))
            .collect();
        let pgiam = loop {
            match Pgiam::start_with_env(pgiam_tests::pgiam_bin(), &config, tcp, None, &env) {
                Ok(p) => break p,
                Err(e) if attempts < 3 && format!("{e:#}").contains("Address already in use") => {
                    attempts += 1;
                    let next: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    config =
                        config.replace(&format!("tcp = \"{tcp}\""), &format!("tcp = \"{next}\""));
                    tcp = next;
                }
                Err(e) => panic!("start pgiam: {e:?}"),
            }
        };
        Env {
            pg,
            pgiam,
            tcp,
            unix_dir,
            unix_port,
            dir,
        }
    }

    /// A libpq connection string through pgiam's TCP listener.
    pub fn tcp_dsn(&self, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={DB} user=anyone {extra}",
            self.tcp.port()
        )
    }

    /// A libpq connection string through pgiam's unix socket.
    pub fn unix_dsn(&self, extra: &str) -> String {
        format!(
            "host={} port={} dbname={DB} user=anyone {extra}",
            self.unix_dir.display(),
            self.unix_port
        )
    }

    /// A table `items (id int)` in the test database holding `rows` (`"(1), (2)"`), which the
    /// mapped role may use.
    pub fn items(&self, rows: &str) {
        self.pg
            .psql_db(
                DB,
                &format!(
                    "CREATE TABLE items (id int); INSERT INTO items VALUES {rows}; \
                     GRANT ALL ON items TO {ROLE}"
                ),
            )
            .unwrap();
    }

    /// The superuser's view, straight to PostgreSQL.
    pub fn direct(&self, sql: &str) -> String {
        self.pg.psql(sql).expect("direct psql")
    }

    /// The superuser's answer to `sql` once it is `want`, or the last answer after 10 s (for
    /// what settles a moment after a client is done: a backend leaving, a wait beginning).
    pub fn direct_until(&self, sql: &str, want: &str) -> String {
        let mut answer = String::new();
        for _ in 0..200 {
            answer = self.direct(sql);
            if answer == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        answer
    }

    /// pgbench's tables (scale 1) in the test database, for the mapped role.
    pub fn pgbench_tables(&self) {
        self.pg.pgbench_init(DB, 1).unwrap();
        self.pg
            .psql_db(
                DB,
                &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}"),
            )
            .unwrap();
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// The audit records so far, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// The audit records once `done` holds for them (records written after a response, such
    /// as completions and session ends, trail the client by a moment); panics after 10 s.
    pub fn audit_records_until(
        &self,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        for _ in 0..500 {
            let records = self.audit_records();
            if done(&records) {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("audit records never complete: {:#?}", self.audit_records());
    }

    /// Connections PostgreSQL has received so far for sessions, from its own log: all but
    /// pgiam's reads of the catalog (a short connection of their own, `pgiam-catalog`, which
    /// has logged in by the time the statement that needed it is answered).
    pub fn connections_received(&self) -> usize {
        let log = self.pg.log();
        log.matches("connection received").count()
            - log.matches("application_name=pgiam-catalog").count()
    }

    /// pgiam's reads of the catalog the database has seen.
    pub fn catalog_reads(&self) -> usize {
        self.pg
            .log()
            .matches("application_name=pgiam-catalog")
            .count()
    }
}

/// Held by the tests that measure pgiam's memory and by the one that loads the machine most
/// (10,000 clients), so that none of them runs beside another: a measurement taken while the
/// machine is saturated says more about the machine than about pgiam.
pub fn measuring_alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a real client program and returns its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    let path = pg_bin_dir().join(program);
    Command::new(&path)
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn psql(dsn: &str, sql: &str) -> Output {
    run(
        "psql",
        &["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
    )
}

/// psql that must succeed; returns trimmed stdout.
pub fn psql_ok(dsn: &str, sql: &str) -> String {
    let out = psql(dsn, sql);
    assert!(
        out.status.success(),
        "psql {dsn:?} -c {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub async fn tokio_client(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A tokio-postgres client whose notifications (LISTEN) arrive on the channel returned with it.
pub async fn listening_client(
    dsn: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
) {
    let (client, mut conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres {dsn}: {e}"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

/// A hand-driven protocol client, for what real clients never send.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Raw { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn startup_bytes(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    pub fn startup(&mut self) {
        self.send(&Raw::startup_bytes(
            3 << 16,
            &[("user", "x"), ("database", DB)],
        ));
    }

    /// Reads one message; `None` when the connection is closed.
    pub fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.stream.read_exact(&mut header).ok()?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).ok()?;
        Some((header[0], body))
    }

    pub fn read_byte(&mut self) -> Option<u8> {
        let mut b = [0u8; 1];
        self.stream.read_exact(&mut b).ok()?;
        Some(b[0])
    }

    /// Reads until ReadyForQuery; returns every message seen.
    pub fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut seen = Vec::new();
        loop {
            let m = self.read().expect("connection closed before ReadyForQuery");
            let done = m.0 == b'Z';
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    /// Expects an ErrorResponse and then the end of the connection; returns (SQLSTATE, message).
    pub fn expect_fatal(&mut self) -> (String, String) {
        let (tag, body) = self
            .read()
            .expect("an ErrorResponse, not a closed connection");
        assert_eq!(
            tag,
            b'E',
            "expected ErrorResponse, got {:?}",
            char::from(tag)
        );
        let field = |code: u8| {
            let mut rest = &body[..];
            while let Some((&c, tail)) = rest.split_first() {
                let end = tail.iter().position(|&b| b == 0).unwrap();
                if c == code {
                    return String::from_utf8_lossy(&tail[..end]).into_owned();
                }
                rest = &tail[end + 1..];
            }
            String::new()
        };
        assert_eq!(field(b'S'), "FATAL");
        let r = (field(b'C'), field(b'M'));
        self.expect_closed();
        r
    }

    pub fn expect_closed(&mut self) {
        let mut b = [0u8; 64];
        match self.stream.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the connection to be closed, got {other:?}"),
        }
    }
}

pub fn query_bytes(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pgiam audit verify FILE`: (success, everything it printed).
pub fn verify(path: &Path) -> (bool, String) {
    let out = Command::new(pgiam_tests::pgiam_bin())
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The bypass suite's verdicts. An attack that fires through pgiam is a bypass; one that does
/// not fire directly against PostgreSQL proves nothing (its oracle or setup is wrong), and
/// fails the suite as well.
#[derive(Default)]
pub struct Verdicts {
    bypasses: Vec<String>,
    silent: Vec<String>,
}

impl Verdicts {
    /// Records one run of an attack: `direct` or through pgiam, and whether its oracle fired.
    pub fn judge(&mut self, direct: bool, fired: bool, what: impl FnOnce() -> String) {
        match (direct, fired) {
            (false, true) => self.bypasses.push(what()),
            (true, false) => self.silent.push(what()),
            _ => {}
        }
    }

    /// No bypass, and every attack fired directly.
    pub fn assert_clean(&self) {
        assert!(
            self.bypasses.is_empty(),
            "{} bypasses through pgiam:\n{}",
            self.bypasses.len(),
            self.bypasses.join("\n")
        );
        assert!(
            self.silent.is_empty(),
            "{} attacks did not fire directly (the case proves nothing):\n{}",
            self.silent.len(),
            self.silent.join("\n")
        );
    }
}

/// A CancelRequest for the key (process id, secret).
pub fn cancel_request(pid: i32, key: i32) -> Vec<u8> {
    let mut out = 16i32.to_be_bytes().to_vec();
    out.extend_from_slice(&80_877_102i32.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&key.to_be_bytes());
    out
}

/// Waits until PostgreSQL shows the role's backend running pg_sleep.
pub fn wait_for_sleep(env: &Env) {
    for _ in 0..200 {
        let n = env.direct(&format!(
            "select count(*) from pg_stat_activity where usename = '{ROLE}' \
             and state = 'active' and query like '%pg_sleep%'"
        ));
        if n == "1" {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the sleeping query never showed up in pg_stat_activity");
}
