//! Transparent interception with real eBPF: unmodified clients in a test cgroup, pointed at
//! PostgreSQL's own address, reach it only through pgiam. Each test has its own cgroup tree and
//! bpffs pin directory, and removes both even when it fails.

mod drivers;
mod people;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Output};

use pgiam_tests::{
    free_port, pg_bin_dir, pgiam_bin, write_file, PgCluster, PgOptions, Pgiam, TestCgroup,
};

const RW: &str = "app_rw";
const RO: &str = "app_ro";
const DB: &str = "app";

struct Env {
    pgiam: Option<Pgiam>,
    listen: SocketAddr,
    config_path: PathBuf,
    bpffs_dir: PathBuf,
    /// Where pgiam itself runs: inside the attached subtree, so the fast path sees its sockets.
    proxy: TestCgroup,
    /// Mapped to app_rw.
    app: TestCgroup,
    /// Mapped to nothing (unless the uid is).
    other: TestCgroup,
    root: TestCgroup,
    pg: PgCluster,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start(fast_path: bool) -> Env {
        let pg = PgCluster::start(PgOptions {
            extra_conf: vec!["listen_addresses = '127.0.0.1,::1'".into()],
            hba_lines: Some(vec![
                "local all all trust".into(),
                "host all all 127.0.0.1/32 scram-sha-256".into(),
                "host all all ::1/128 scram-sha-256".into(),
            ]),
            ..PgOptions::default()
        })
        .expect("start PostgreSQL");
        pg.psql(&format!("CREATE ROLE {RW} LOGIN PASSWORD 'rw-secret'"))
            .unwrap();
        pg.psql(&format!("CREATE ROLE {RO} LOGIN PASSWORD 'ro-secret'"))
            .unwrap();
        pg.psql(&format!("CREATE DATABASE {DB} OWNER {RW}"))
            .unwrap();
        let root = TestCgroup::new("pgiam-test");
        let (proxy, app, other) = (root.child("pgiam"), root.child("app"), root.child("other"));
        let dir = tempfile::Builder::new()
            .prefix("pgiam-icept-")
            .tempdir()
            .unwrap();
        let rw = write_file(dir.path(), "rw.pw", "rw-secret", 0o600);
        let ro = write_file(dir.path(), "ro.pw", "ro-secret", 0o600);
        let port = free_port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let bpffs_dir = PathBuf::from(format!(
            "/sys/fs/bpf/pgiam-test-{}",
            root.path.trim_start_matches("/pgiam-test-")
        ));
        let config = format!(
            r#"
state_dir = "{state}"
[listen]
tcp = "{listen}"
tcp6 = "[::1]:{port}"
[upstream]
host = "127.0.0.1"
port = {pg_port}
[policy]
file = "{policy}"
[roles.{RW}]
password_file = "{rw}"
[roles.{RO}]
password_file = "{ro}"
[[mapping]]
principal = "uid:65534"
database = "{DB}"
role = "{RO}"
[[mapping]]
principal = "cgroup:{app}"
database = "{DB}"
role = "{RW}"
[interception]
cgroup = "{root}"
endpoints = ["127.0.0.1", "::1"]
ports = [{pg_port}]
fast_path = {fast_path}
bpffs_dir = "{bpffs}"
"#,
            state = dir.path().join("state").display(),
            policy = write_file(
                dir.path(),
                "policy.cedar",
                "permit(principal, action, resource);",
                0o644
            )
            .display(),
            pg_port = pg.port,
            rw = rw.display(),
            ro = ro.display(),
            app = app.path,
            root = root.path,
            bpffs = bpffs_dir.display(),
        );
        let config_path = write_file(dir.path(), "pgiam.toml", &config, 0o600);
        let mut env = Env {
            pgiam: None,
            listen,
            config_path,
            bpffs_dir,
            proxy,
            app,
            other,
            root,
            pg,
            _dir: dir,
        };
        env.start_pgiam();
        env
    }

    fn config(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap()
    }

    /// pgbench's tables (scale 1), for the role the app cgroup maps to.
    fn pgbench_tables(&self) {
        self.pg.pgbench_init(DB, 1).unwrap();
        self.pg
            .psql_db(
                DB,
                &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {RW}"),
            )
            .unwrap();
    }

    fn start_pgiam(&mut self) {
        let pgiam = Pgiam::start_in(pgiam_bin(), &self.config(), self.listen, Some(&self.proxy))
            .expect("start pgiam with interception");
        self.pgiam = Some(pgiam);
    }

    fn stop_pgiam(&mut self) -> String {
        let mut p = self.pgiam.take().expect("pgiam running");
        p.stop();
        p.log()
    }

    fn log(&self) -> String {
        self.pgiam.as_ref().map(Pgiam::log).unwrap_or_default()
    }

    /// The database's own address, as an unmodified application would dial it.
    fn db_dsn(&self, host: &str, extra: &str) -> String {
        format!(
            "host={host} port={} dbname={DB} user=whoever connect_timeout=10 {extra}",
            self.pg.port
        )
    }

    fn stats(&self) -> std::collections::HashMap<String, u64> {
        let out = Command::new(pgiam_bin())
            .args(["bpf-stats", "--config"])
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        stop_and_uninstall(&mut self.pgiam, &self.config_path);
        // The cgroups go next, as the fields drop (children before `root`).
    }
}

/// Stops pgiam, then removes its pins: they keep the programs attached after pgiam exits,
/// and the test's cgroups cannot go while programs are attached to them.
fn stop_and_uninstall(pgiam: &mut Option<Pgiam>, config_path: &std::path::Path) {
    if let Some(mut p) = pgiam.take() {
        p.stop();
    }
    let out = Command::new(pgiam_bin())
        .args(["uninstall-bpf", "--config"])
        .arg(config_path)
        .output();
    if !out.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "warning: uninstall-bpf failed for {}",
            config_path.display()
        );
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run client")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Unmodified psql, run inside `cg` (as `user` if given).
fn psql_in(cg: &TestCgroup, dsn: &str, sql: &str, user: Option<&str>) -> Output {
    let psql = pg_bin_dir().join("psql");
    let mut cmd = match user {
        Some(u) => cg.command_as(&psql, u),
        None => cg.command(&psql),
    };
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql]);
    output(&mut cmd)
}

fn psql_ok_in(cg: &TestCgroup, dsn: &str, sql: &str) -> String {
    let out = psql_in(cg, dsn, sql, None);
    assert!(out.status.success(), "psql in {}: {}", cg.path, text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A client that prints what getpeername and getsockname say for a connection to `addr`.
fn peer_seen_from(cg: &TestCgroup, host: &str, port: u16) -> (String, String) {
    let family = if host.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let script = format!(
        "import socket\ns = socket.socket(socket.{family}, socket.SOCK_STREAM)\n\
         s.connect(('{host}', {port}))\nprint(s.getpeername()[1], s.getsockname()[1])\n"
    );
    let out = output(cg.command("python3").args(["-c", &script]));
    assert!(out.status.success(), "python3: {}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (peer, local) = line.split_once(' ').unwrap();
    (peer.to_owned(), local.to_owned())
}

#[test]
fn unmodified_clients_in_the_cgroup_go_through_pgiam() {
    let env = Env::start(true);
    // psql with the database's own address and no password: only pgiam can log it in.
    let dsn = env.db_dsn("127.0.0.1", "");
    assert_eq!(
        psql_ok_in(
            &env.app,
            &dsn,
            "select current_user || ' ' || inet_server_port()"
        ),
        format!("{RW} {}", env.pg.port)
    );
    let log = env.log();
    let line = log
        .lines()
        .find(|l| l.contains("session established"))
        .unwrap_or_else(|| panic!("no session in pgiam's log:\n{log}"));
    assert!(line.contains("via=ebpf"), "{line}");
    assert!(line.contains("uid=0"), "{line}");
    assert!(line.contains(&format!("cgroup={}", env.app.path)), "{line}");
    assert!(line.contains("comm=psql"), "{line}");
    assert!(
        line.contains(&format!("upstream=127.0.0.1:{}", env.pg.port)),
        "the upstream is the original destination: {line}"
    );
    // PostgreSQL sees pgiam's connection, as the mapped role.
    assert!(env
        .pg
        .log()
        .contains(&format!("connection authorized: user={RW} database={DB}")));

    // The application's getpeername shows the database, though the socket is pgiam's.
    let (peer, _) = peer_seen_from(&env.app, "127.0.0.1", env.pg.port);
    assert_eq!(peer, env.pg.port.to_string());
    assert!(env.stats()["getpeername"] >= 1);

    // pgbench, unmodified, zero failures.
    env.pgbench_tables();
    let out = output(
        env.app
            .command(pg_bin_dir().join("pgbench"))
            .args(["-n", "-S", "-c", "2", "-j", "2", "-t", "100", &dsn]),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("number of failed transactions: 0 "), "{t}");
    assert!(t.contains("actually processed: 200/200"), "{t}");
}

#[test]
fn outside_the_cgroup_and_other_ports_are_untouched() {
    let env = Env::start(true);
    let before = env.stats()["connect"];
    // The same psql, outside the cgroup: straight to PostgreSQL, which wants a password.
    let out = output(
        Command::new(pg_bin_dir().join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                &format!(
                    "host=127.0.0.1 port={} dbname=postgres user=postgres",
                    env.pg.port
                ),
                "-c",
                "select current_user",
            ])
            .env("PGPASSWORD", &env.pg.superuser_password),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "postgres");

    // Inside the cgroup, a port that is not intercepted reaches its listener directly.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (peer, local) = peer_seen_from(&env.app, "127.0.0.1", port);
    let (_, from) = listener.accept().unwrap();
    assert_eq!(peer, port.to_string());
    assert_eq!(
        from.port().to_string(),
        local,
        "the listener saw the client itself"
    );

    assert_eq!(env.stats()["connect"], before, "nothing was intercepted");
    assert!(!env.log().contains("session established"));
}

#[test]
fn identities_map_to_different_roles_and_unmapped_ones_are_refused() {
    let env = Env::start(true);
    let dsn = env.db_dsn("127.0.0.1", "");
    // Different cgroup, same uid: app → app_rw.
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    // Different uid in the same cgroup: nobody → app_ro (first matching rule).
    let out = psql_in(&env.app, &dsn, "select current_user", Some("nobody"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), RO);
    // Neither the cgroup nor the uid is mapped: refused, and the database never hears of it.
    let authorized = env.pg.log().matches("connection authorized").count();
    let out = psql_in(&env.other, &dsn, "select 1", None);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no database role is mapped"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("cgroup={}", env.other.path)),
        "{}",
        text(&out)
    );
    assert_eq!(
        env.pg.log().matches("connection authorized").count(),
        authorized
    );
}

#[test]
fn restart_reuses_pins_and_refuses_while_down() {
    let mut env = Env::start(true);
    let dsn = env.db_dsn("127.0.0.1", "");
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    env.stop_pgiam();

    // Down: intercepted connections are refused (fail closed), not sent to the database.
    let out = psql_in(&env.app, &dsn, "select current_user", None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Connection refused"), "{}", text(&out));

    // Pins an older pgiam layout left (an upgrade): removed at start, so its programs do not
    // intercept beside these.
    let old = env.bpffs_dir.join("v1");
    std::fs::create_dir_all(&old).unwrap();
    let made = output(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(old.join("pgiam_config"))
            .args([
                "type",
                "array",
                "key",
                "4",
                "value",
                "4",
                "entries",
                "1",
                "name",
                "pgiam_config",
            ]),
    );
    assert!(made.status.success(), "{}", text(&made));

    env.start_pgiam();
    assert!(!old.exists(), "the older layout's pins remain");
    assert!(
        env.log()
            .contains("removed the interception pins of another pgiam version"),
        "{}",
        env.log()
    );
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    assert_eq!(
        env.log().matches("already attached").count(),
        5,
        "{}",
        env.log()
    );
    // Exactly one of each program on the cgroup: nothing was attached twice.
    let out = output(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&env.root.dir),
    );
    let shown = text(&out);
    for prog in [
        "pgiam_connect4",
        "pgiam_connect6",
        "pgiam_getpeername4",
        "pgiam_getpeername6",
        "pgiam_sockops",
    ] {
        assert_eq!(shown.matches(prog).count(), 1, "{prog} in:\n{shown}");
    }
}

#[test]
fn fail_open_lets_connections_through_while_pgiam_is_stopped() {
    let mut env = Env::start(true);
    env.stop_pgiam();
    let config = env
        .config()
        .replace("fast_path = true", "fast_path = true\nfail_open = true");
    std::fs::write(&env.config_path, config).unwrap();
    env.start_pgiam();
    let with_password = format!(
        "host=127.0.0.1 port={} dbname={DB} user={RW} password=rw-secret connect_timeout=10",
        env.pg.port
    );
    assert_eq!(
        psql_ok_in(
            &env.app,
            &env.db_dsn("127.0.0.1", ""),
            "select current_user"
        ),
        RW
    );
    let log = env.stop_pgiam();
    assert!(log.contains("fail_open: interception disabled"), "{log}");
    // Stopped: the application reaches PostgreSQL itself, with its own credentials.
    let sessions = log.matches("session established").count();
    assert_eq!(
        psql_ok_in(&env.app, &with_password, "select current_user"),
        RW
    );
    // Started again: intercepted again.
    env.start_pgiam();
    assert_eq!(
        psql_ok_in(
            &env.app,
            &env.db_dsn("127.0.0.1", ""),
            "select current_user"
        ),
        RW
    );
    assert_eq!(env.log().matches("session established").count(), 1);
    assert_eq!(sessions, 1);
}

#[test]
fn other_network_namespaces_and_device_bound_sockets_are_left_alone() {
    let env = Env::start(true);
    let before = env.stats()["connect"];
    // In a network namespace of its own, a process in the cgroup that dials the database's
    // address and port reaches whatever listens there in *its* namespace.
    let script = format!(
        "import socket\nl = socket.socket(); l.bind(('127.0.0.1', {port})); l.listen()\n\
         c = socket.create_connection(('127.0.0.1', {port})); a, _ = l.accept()\n\
         print(c.getpeername()[1] == {port} and a.getpeername() == c.getsockname())\n",
        port = env.pg.port
    );
    let out = output(env.app.command("unshare").args([
        "-n",
        "sh",
        "-c",
        "ip link set lo up && exec python3 -c \"$0\"",
        &script,
    ]));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True");

    // A socket bound to a device goes straight to the database (it asks for a password).
    let script = format!(
        "import socket\ns = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'lo')\n\
         s.connect(('127.0.0.1', {}))\nprint('connected')\n",
        env.pg.port
    );
    let out = output(env.app.command("python3").args(["-c", &script]));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        env.stats()["connect"],
        before,
        "neither connection was intercepted"
    );
    assert!(!env.log().contains("session established"));
}

#[test]
fn interception_runs_with_only_the_capabilities_it_needs() {
    let mut env = Env::start(true);
    env.stop_pgiam();
    // From scratch: the limited pgiam must load and attach everything itself.
    let out = Command::new(pgiam_bin())
        .args(["uninstall-bpf", "--config"])
        .arg(&env.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Root, but with a bounding set of exactly what pgiam needs: bpf (programs and maps),
    // net_admin (cgroup socket hooks, SO_MARK), perfmon (bpf_get_current_comm in cgroup
    // programs), sys_ptrace and dac_read_search (other users' /proc entries for identity).
    let wrapper = write_file(
        env._dir.path(),
        "pgiam-limited",
        &format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,+bpf,+net_admin,+perfmon,+sys_ptrace,+dac_read_search \
             --inh-caps=-all {} \"$@\"\n",
            pgiam_bin().display()
        ),
        0o755,
    );
    let pgiam = Pgiam::start_in(wrapper, &env.config(), env.listen, Some(&env.proxy))
        .expect("pgiam with limited capabilities");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pgiam.pid())).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_ADMIN: u64 = 21;
    assert_eq!(
        cap_eff & (1 << CAP_SYS_ADMIN),
        0,
        "CapEff {cap_eff:x} still has CAP_SYS_ADMIN"
    );
    env.pgiam = Some(pgiam);
    assert_eq!(
        psql_ok_in(
            &env.app,
            &env.db_dsn("127.0.0.1", ""),
            "select current_user"
        ),
        RW
    );
    let log = env.log();
    assert!(log.contains("via=ebpf"), "{log}");
    assert_eq!(log.matches("interception attached").count(), 5, "{log}");
}

#[test]
fn a_connections_record_cannot_be_inherited_through_its_source_port() {
    let env = Env::start(true);
    // Intercepted, but carrying only a CancelRequest: pgiam never needed its identity, and
    // closes first (so the client's side leaves no TIME_WAIT behind).
    let victim = format!(
        "import socket, struct\ns = socket.create_connection(('127.0.0.1', {}))\n\
         s.sendall(struct.pack('!iiii', 16, 80877102, 1, 2))\ns.recv(1)\n\
         print(s.getsockname()[1])\n",
        env.pg.port
    );
    let out = output(env.app.command("/usr/bin/python3").args(["-c", &victim]));
    assert!(out.status.success(), "{}", text(&out));
    let port: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(env.stats()["established"], 1, "the victim was intercepted");

    // An unmapped process (uid 4242) outside the cgroup takes that source port and dials pgiam
    // itself.
    let attacker = format!(
        "import socket, struct\ns = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', {port}))\ns.connect(('127.0.0.1', {listen}))\n\
         body = struct.pack('!i', 196608) + b'user\\0x\\0database\\0{DB}\\0\\0'\n\
         s.sendall(struct.pack('!i', len(body) + 4) + body)\nprint(s.recv(1).decode())\n",
        listen = env.listen.port()
    );
    let out = output(Command::new("setpriv").args([
        "--reuid=4242",
        "--regid=4242",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        &attacker,
    ]));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "E",
        "the direct connection must be refused as uid 4242, not authenticated as the victim"
    );
    assert!(env.log().contains("uid=4242"), "{}", env.log());
}

const CHECKSUM: &str =
    "select md5(string_agg(i::text || repeat('x', i % 97), ',')) from generate_series(1, 20000) i";

#[test]
fn fast_path_redirects_and_results_match_the_slow_path() {
    let mut env = Env::start(true);
    let dsn = env.db_dsn("127.0.0.1", "sslmode=disable");
    let before = env.stats()["redirect"];
    let fast = psql_ok_in(&env.app, &dsn, CHECKSUM);
    let redirected = env.stats()["redirect"] - before;
    assert!(redirected > 0, "no message took the sk_msg fast path");

    // Fast path off: same answer, and no redirects.
    env.stop_pgiam();
    let config = env
        .config()
        .replace("fast_path = true", "fast_path = false");
    std::fs::write(&env.config_path, config).unwrap();
    env.start_pgiam();
    let before = env.stats()["redirect"];
    let slow = psql_ok_in(&env.app, &dsn, CHECKSUM);
    assert_eq!(env.stats()["redirect"], before);
    assert_eq!(fast, slow);
    let direct = env.pg.psql(CHECKSUM).unwrap();
    assert_eq!(fast, direct, "both paths return what PostgreSQL computed");
}

#[test]
fn ipv6_loopback_is_intercepted() {
    let env = Env::start(true);
    let dsn = env.db_dsn("::1", "");
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    let log = env.log();
    assert!(
        log.contains(&format!("upstream=[::1]:{}", env.pg.port)),
        "pgiam connected to the IPv6 destination the client asked for:\n{log}"
    );
    let (peer, _) = peer_seen_from(&env.app, "::1", env.pg.port);
    assert_eq!(peer, env.pg.port.to_string());
}

/// The start of the small raw-protocol clients below (argv: host, port, …): a socket to
/// PostgreSQL's own address, `until_ready()` (the DataRow texts up to ReadyForQuery) and
/// `query(sql)`.
const PY_CLIENT_PRELUDE: &str = r#"
import errno, socket, struct, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM)
s.connect((host, port))
buf = b''
def until_ready():
    global buf
    rows = []
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack('!i', buf[1:5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                sys.exit('EOF before ReadyForQuery')
            buf += chunk
        kind, n = buf[0:1], struct.unpack('!i', buf[1:5])[0]
        msg, buf = buf[:1 + n], buf[1 + n:]
        if kind == b'E':
            sys.exit('server error: %r' % msg)
        if kind == b'D':
            rows.append(msg[11:].decode())
        if kind == b'Z':
            return rows
def query(sql):
    q = sql.encode() + b'\0'
    s.sendall(b'Q' + struct.pack('!i', len(q) + 4) + q)
    return until_ready()
"#;

/// A client of the fast path that keeps writing after its session ended, printing what each
/// `send()` returned: `ok` or the errno's name. Modes: `eof` (Terminate, wait for pgiam's EOF,
/// then write: pgiam is half-closed, then closing, then gone), `late` (the same, once pgiam has
/// long closed), `eager` (write right after the Terminate, while pgiam is closing),
/// `deferred` (Terminate before any query), `shut_wr`
/// (the client half-closes itself, then writes). After the prelude (argv: host, port, mode).
const AFTER_CLOSE_CLIENT: &str = r#"
mode = sys.argv[3]
body = struct.pack('!i', 196608) + b'user\0whoever\0database\0app\0\0'
s.sendall(struct.pack('!i', len(body) + 4) + body)
until_ready()
if mode != 'deferred':
    q = b'select 1\0'
    s.sendall(b'Q' + struct.pack('!i', len(q) + 4) + q)
    until_ready()
if mode == 'shut_wr':
    s.shutdown(socket.SHUT_WR)
else:
    s.sendall(b'X' + struct.pack('!i', 4))
if mode in ('eof', 'late', 'deferred'):
    while s.recv(65536):
        pass
if mode == 'late':
    time.sleep(0.5)
out = []
for i in range(40):
    try:
        s.send(b'x' * 64)
        out.append('ok')
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, str(e.errno)))
    time.sleep(0.005)
print(' '.join(out))
"#;

#[test]
fn fast_path_never_fails_a_send_tcp_would_accept() {
    let env = Env::start(true);
    let before = env.stats()["redirect"];
    let cases = [
        ("127.0.0.1", "eof"),
        ("127.0.0.1", "late"),
        ("127.0.0.1", "eager"),
        ("127.0.0.1", "deferred"),
        ("127.0.0.1", "shut_wr"),
        ("::1", "eof"),
        ("::1", "late"),
        ("::1", "shut_wr"),
    ];
    let mut failures = Vec::new();
    // Races are timing-dependent: every case runs a few times.
    for round in 0..3 {
        for (host, mode) in cases {
            let script = format!("{PY_CLIENT_PRELUDE}{AFTER_CLOSE_CLIENT}");
            let out = output(env.app.command("python3").args([
                "-c",
                &script,
                host,
                &env.pg.port.to_string(),
                mode,
            ]));
            assert!(out.status.success(), "{host} {mode}: {}", text(&out));
            let sends: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            assert_eq!(sends.len(), 40, "{host} {mode}: {}", text(&out));
            let first_error = sends.iter().position(|r| r != "ok");
            let ok = if mode == "shut_wr" {
                // TCP refuses every write after the writer's own shutdown(SHUT_WR).
                sends.iter().all(|r| r == "EPIPE")
            } else {
                // The peer has closed, or is closing: TCP takes the first write, and once the
                // peer's reset is back, refuses the rest with ECONNRESET or EPIPE. Never EACCES.
                first_error.is_none_or(|i| {
                    i > 0 && sends[i..].iter().all(|r| r == "EPIPE" || r == "ECONNRESET")
                })
            };
            if !ok {
                failures.push(format!("round {round} {host} {mode}: {}", sends.join(" ")));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "sends that plain TCP would have answered differently:\n{}",
        failures.join("\n")
    );
    assert!(
        env.stats()["redirect"] > before,
        "the sessions took the sk_msg fast path"
    );
}

/// A session that pauses after its first query (printing its own port) until a line on stdin,
/// then sends a second query and prints its answer, or the errno of the failed send.
const PAUSING_CLIENT: &str = r#"
body = struct.pack('!i', 196608) + b'user\0whoever\0database\0app\0\0'
s.sendall(struct.pack('!i', len(body) + 4) + body)
until_ready()
query('select 1')
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
try:
    print('answer', ' '.join(query('select 41 + 1')))
except OSError as e:
    print('error', errno.errorcode.get(e.errno, str(e.errno)))
s.sendall(b'X' + struct.pack('!i', 4))
"#;

/// `struct pgiam_sock_key` as bpftool's `key hex` words: one end of a connection, seen from
/// that end.
fn sock_key_hex(local: SocketAddr, remote: SocketAddr) -> Vec<String> {
    let mapped = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    let mut key = Vec::new();
    key.extend(mapped(local));
    key.extend(mapped(remote));
    key.extend(u32::from(local.port()).to_ne_bytes());
    key.extend(u32::from(remote.port()).to_ne_bytes());
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn fast_path_falls_back_to_tcp_when_the_peer_leaves_the_sockhash() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let env = Env::start(true);
    let socks = env.bpffs_dir.join("v2").join("pgiam_socks");
    let before = env.stats()["fallback"];
    // Either end may leave first: the application's socket (then pgiam's writes must fall
    // back), or pgiam's (then the application's must).
    for host in ["127.0.0.1", "::1"] {
        for leaving in ["pgiam", "app"] {
            let mut child = env
                .app
                .command("python3")
                .args([
                    "-c",
                    &format!("{PY_CLIENT_PRELUDE}{PAUSING_CLIENT}"),
                    host,
                    &env.pg.port.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            let app: SocketAddr = SocketAddr::new(
                host.parse().unwrap(),
                line.trim().parse().expect("the client's port"),
            );
            let proxy = SocketAddr::new(app.ip(), env.listen.port());
            let key = if leaving == "pgiam" {
                sock_key_hex(proxy, app)
            } else {
                sock_key_hex(app, proxy)
            };
            let out = output(
                Command::new("bpftool")
                    .args(["map", "delete", "pinned"])
                    .arg(&socks)
                    .args(["key", "hex"])
                    .args(&key),
            );
            assert!(out.status.success(), "bpftool: {}", text(&out));
            child.stdin.take().unwrap().write_all(b"go\n").unwrap();
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
            let status = child.wait().unwrap();
            assert_eq!(
                rest.trim(),
                "answer 42",
                "{host}, {leaving}'s end out of the SOCKHASH ({status}):\n{}",
                env.log()
            );
        }
    }
    assert!(env.stats()["fallback"] >= before + 4, "each case fell back");
}

/// Large answers over TLS to clients that read slower than pgiam writes, through the fast
/// path, with short transactions running beside them: every byte arrives, and no answer
/// stalls. (A TLS writer that meets a full socket keeps the tail of what it accepted until it
/// is flushed; pgiam once never flushed it, and psql could wait forever for the end of a COPY
/// TO the server had finished. The stall depends on how the last write meets the socket: this
/// test is the scenario, and fails on any stall or lost row.)
#[test]
fn tls_answers_to_slow_readers_all_arrive_through_the_fast_path() {
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::Duration;

    let env = Env::start(true);
    let dsn = env.db_dsn("127.0.0.1", "sslmode=require");
    let rows = 12_000;
    let copy = format!(
        "COPY (SELECT md5(i::text) || repeat('x', 200) FROM generate_series(1, {rows}) i) TO STDOUT"
    );
    for round in 0..4 {
        let (done_tx, done_rx) = mpsc::channel();
        let mut pids = Vec::new();
        for reader in 0..2 {
            let mut child = env
                .app
                .command(pg_bin_dir().join("psql"))
                .args(["-X", "-A", "-t", &dsn, "-c", &copy])
                .env("PGCONNECT_TIMEOUT", "10")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            pids.push(child.id());
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let mut out = child.stdout.take().unwrap();
                let mut lines = 0;
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    match out.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => lines += chunk[..n].iter().filter(|&&b| b == b'\n').count(),
                    }
                    // Slower than pgiam: psql blocks on its stdout and stops reading its socket.
                    std::thread::sleep(Duration::from_millis(2));
                }
                let status = child.wait().unwrap();
                let _ = done.send((reader, lines, status.success()));
            });
        }
        // Short transactions beside them, as a pool's other connections would run.
        for _ in 0..5 {
            assert_eq!(
                psql_ok_in(&env.app, &dsn, "BEGIN; SELECT 7; COMMIT"),
                "BEGIN\n7\nCOMMIT"
            );
        }
        for _ in 0..2 {
            match done_rx.recv_timeout(Duration::from_secs(90)) {
                Ok((reader, lines, ok)) => {
                    assert!(ok, "round {round} reader {reader}: psql failed");
                    assert_eq!(
                        lines, rows,
                        "round {round} reader {reader}: every row arrived"
                    );
                }
                Err(_) => {
                    // Ours to end: the clients this test started.
                    for pid in &pids {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(*pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    panic!("round {round}: an answer stalled (no end within 90 s)");
                }
            }
        }
    }
}

#[test]
fn a_reload_changes_the_intercepted_ports_live_and_metrics_show_the_kernel_counters() {
    let mut env = Env::start(true);
    // Metrics and the admin socket for this one.
    env.stop_pgiam();
    let metrics = format!("127.0.0.1:{}", free_port());
    let socket = env.config_path.with_file_name("admin.sock");
    let config = format!(
        "{}\n[admin]\nsocket = \"{}\"\nmetrics = \"{metrics}\"\n",
        env.config(),
        socket.display()
    );
    std::fs::write(&env.config_path, config).unwrap();
    env.start_pgiam();
    let dsn = env.db_dsn("127.0.0.1", "");
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    let scraped = pgiam_tests::scrape(&metrics);
    let connects = pgiam_tests::metric(&scraped, "pgiam_ebpf_events_total{event=\"connect\"}");
    assert!(connects >= 1.0, "{scraped}");
    assert_eq!(
        connects as u64,
        env.stats()["connect"],
        "the kernel's own counter"
    );

    // A session that stays open across the reloads.
    let open = env
        .app
        .command(pg_bin_dir().join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            &dsn,
            "-c",
            "select pg_sleep(3), current_user",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));

    let pgiam = env.pgiam.as_ref().unwrap();
    let pg_port = env.pg.port;
    let elsewhere = free_port();
    let reload_ports = |from: u16, to: u16| {
        let text = std::fs::read_to_string(&pgiam.config_path).unwrap();
        let text = text.replace(&format!("ports = [{from}]"), &format!("ports = [{to}]"));
        std::fs::write(&pgiam.config_path, text).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pgiam.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        // Applied once the new endpoint set is logged.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pgiam
            .log()
            .lines()
            .any(|l| l.contains("intercepted endpoints") && l.contains(&format!("port: {to}")))
        {
            assert!(std::time::Instant::now() < deadline, "{}", pgiam.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    reload_ports(pg_port, elsewhere);
    // The database's port is no longer intercepted: psql reaches PostgreSQL, which wants a
    // password pgiam would have supplied.
    let out = psql_in(&env.app, &dsn, "select 1", None);
    assert!(!out.status.success());
    assert!(text(&out).contains("password"), "{}", text(&out));

    reload_ports(elsewhere, pg_port);
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    // The session open throughout was never dropped.
    let done = open.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(String::from_utf8_lossy(&done.stdout).contains(RW));
    let scraped = pgiam_tests::scrape(&metrics);
    assert_eq!(
        pgiam_tests::metric(
            &scraped,
            "pgiam_reloads_total{what=\"config\",outcome=\"ok\"}"
        ),
        2.0,
        "{scraped}"
    );
}

/// An `exe:` principal is the executable that called connect(), as the kernel recorded it: a
/// process that connects and then execs a trusted binary, keeping the socket, does not borrow
/// that binary's name, though /proc names it by the time pgiam accepts (shown: the borrowed
/// process reads its own /proc entry as the trusted binary's). The binary connecting itself is
/// mapped. Both for an intercepted connection and for one that dials pgiam's listener itself
/// from the intercepted subtree. On pgiam's unix socket, where no kernel records the
/// executable, nobody has an exe: principal: neither the borrower nor the binary itself.
#[test]
fn an_exe_principal_cannot_be_borrowed_by_an_exec_after_connect() {
    let mut env = Env::start(false);
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    let unix = env._dir.path().join(".s.PGSQL.5432");
    let config = env
        .config()
        .replace(
            "[interception]",
            &format!(
                "[[mapping]]\nprincipal = \"exe:{}\"\ndatabase = \"{DB}\"\nrole = \"{RW}\"\n[interception]",
                python.display()
            ),
        )
        .replace(
            "[listen]\n",
            &format!("[listen]\nunix = \"{}\"\n", unix.display()),
        );
    std::fs::write(&env.config_path, config).unwrap();
    env.stop_pgiam();
    env.start_pgiam();
    // Speaks a startup packet on fd argv[2], or on its own connection to port argv[1]; prints
    // its /proc exe and the first byte of pgiam's answer ('R': logged in, 'E': refused).
    let script = write_file(
        env._dir.path(),
        "startup.py",
        &format!(
            "import os, socket, struct, sys\n\
             s = socket.socket(fileno=int(sys.argv[2])) if len(sys.argv) > 2 else \
             socket.create_connection(('127.0.0.1', int(sys.argv[1]))) \
             if sys.argv[1].isdigit() else socket.socket(socket.AF_UNIX)\n\
             if not sys.argv[1].isdigit() and len(sys.argv) == 2: s.connect(sys.argv[1])\n\
             body = struct.pack('!i', 196608) + b'user\\0x\\0database\\0{DB}\\0\\0'\n\
             s.sendall(struct.pack('!i', len(body) + 4) + body)\n\
             print(os.readlink('/proc/self/exe'), s.recv(1).decode())\n"
        ),
        0o644,
    );
    // Through interception (the database's address), and dialling pgiam itself.
    for port in [env.pg.port, env.listen.port()] {
        let own = output(
            env.other
                .command(&python)
                .arg(&script)
                .arg(port.to_string()),
        );
        assert_eq!(
            text(&own).trim(),
            format!("{} R", python.display()),
            "port {port}: the trusted binary connecting itself is mapped"
        );
        let borrowed = output(env.other.command("bash").args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/127.0.0.1/{port}; exec {} {} {port} 3",
                python.display(),
                script.display()
            ),
        ]));
        assert_eq!(
            text(&borrowed).trim(),
            format!("{} E", python.display()),
            "port {port}: bash connected, then became the trusted binary: /proc names it, pgiam must not"
        );
    }
    // The unix socket: SO_PEERCRED names the process, /proc its executable after the fact.
    let own = output(env.other.command(&python).arg(&script).arg(&unix));
    assert_eq!(
        text(&own).trim(),
        format!("{} E", python.display()),
        "unix socket: the executable is not recorded, so it is no credential"
    );
    // Connected by perl, then python: /proc names python by the time pgiam looks.
    let borrowed = output(env.other.command("perl").args([
        "-MIO::Socket::UNIX",
        "-e",
        "$^F = 255; my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) \
         or die $!; exec($ARGV[1], $ARGV[2], '-', fileno($s))",
        &unix.display().to_string(),
        &python.display().to_string(),
        &script.display().to_string(),
    ]));
    assert_eq!(
        text(&borrowed).trim(),
        format!("{} E", python.display()),
        "unix socket: perl connected, then became the trusted binary"
    );
    let log = env.log();
    assert!(
        log.contains("runs another executable than the one that connected"),
        "{log}"
    );
    assert!(log.contains("(not recorded)"), "{log}");
}

/// pgiam SIGKILLed in the middle of a pgbench run, then started again: while it is down the
/// pinned interception refuses connections (fail closed: nothing reaches the database around
/// it), every transaction the database committed has its statement's allow record in the audit
/// log (a record reaches the kernel before its statement is forwarded), the log verifies, and
/// sessions work again at once.
#[test]
fn sigkill_under_load_then_restart_leaves_nothing_unaudited() {
    use nix::sys::signal::{kill, Signal};
    let mut env = Env::start(true);
    let audit = env._dir.path().join("audit.jsonl");
    let config = env.config() + &format!("[audit]\npath = \"{}\"\n", audit.display());
    std::fs::write(&env.config_path, config).unwrap();
    env.stop_pgiam();
    env.start_pgiam();
    env.pgbench_tables();
    let dsn = env.db_dsn("127.0.0.1", "");
    let mut bench = env
        .app
        .command(pg_bin_dir().join("pgbench"))
        .args(["-n", "-c", "4", "-j", "2", "-T", "5", &dsn])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut killed = env.pgiam.take().expect("pgiam running");
    kill(nix::unistd::Pid::from_raw(killed.pid()), Signal::SIGKILL).unwrap();
    killed.stop();
    let out = psql_in(&env.app, &dsn, "select 1", None);
    assert!(
        !out.status.success() && text(&out).contains("Connection refused"),
        "while pgiam is down: {}",
        text(&out)
    );
    let _ = bench.wait();
    drop(killed);

    env.start_pgiam();
    assert_eq!(psql_ok_in(&env.app, &dsn, "select current_user"), RW);
    let committed: usize = env
        .pg
        .psql_db(DB, "SELECT count(*) FROM pgbench_history")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let log = std::fs::read_to_string(&audit).unwrap();
    let audited = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| {
            r["kind"] == "statement"
                && r["decision"] == "allow"
                && r["sql"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("INSERT INTO pgbench_history"))
        })
        .count();
    eprintln!("{committed} transactions committed, {audited} history inserts audited");
    assert!(committed > 0, "the load ran");
    assert!(
        audited >= committed,
        "{committed} history rows in the database, {audited} audited inserts"
    );
    let verify = output(
        Command::new(pgiam_bin())
            .args(["audit", "verify"])
            .arg(&audit),
    );
    assert!(verify.status.success(), "{}", text(&verify));
}
