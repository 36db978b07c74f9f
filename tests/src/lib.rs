//! The real-PostgreSQL harness shared by pgiam's integration tests and `cargo xtask demo`:
//! throwaway clusters, a test CA, and a pgiam process. Everything it starts it stops by pid, and
//! everything it creates it removes, also when a test panics.

pub mod idp;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The pgiam binary under test: `$PGIAM_BIN`, else the workspace's debug build.
pub fn pgiam_bin() -> PathBuf {
    let path = std::env::var_os("PGIAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/pgiam"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bin pgiam` or `cargo xtask test`",
        path.display()
    );
    path
}

/// The newest installed PostgreSQL's binaries (`$PG_BIN_DIR` overrides).
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return dir.into();
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let v = versions
        .last()
        .expect("no PostgreSQL under /usr/lib/postgresql: run `cargo xtask install-deps`");
    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

pub fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(contents.as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn os_user(name: &str) -> anyhow::Result<nix::unistd::User> {
    nix::unistd::User::from_name(name)?.with_context(|| format!("no OS user {name:?}"))
}

/// Makes `cmd` run as the OS user `user` (we must be root).
pub fn run_as(cmd: &mut Command, user: &str) {
    let u = os_user(user).expect("user exists");
    // std also drops root's supplementary groups when it changes the uid.
    cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[derive(Default, Clone)]
pub struct PgOptions {
    /// Server certificate and key (PEM files); turns `ssl` on.
    pub ssl: Option<(PathBuf, PathBuf)>,
    /// Extra postgresql.conf lines.
    pub extra_conf: Vec<String>,
    /// Replaces pg_hba.conf.
    pub hba_lines: Option<Vec<String>>,
}

/// A throwaway PostgreSQL cluster: superuser `postgres`, trust on its unix socket, SCRAM over
/// TCP on 127.0.0.1.
pub struct PgCluster {
    pub port: u16,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub superuser_password: String,
    root: PathBuf,
    stopped: bool,
}

impl PgCluster {
    fn command(&self, program: &str) -> Command {
        pg_command(program)
    }

    pub fn start(opts: PgOptions) -> anyhow::Result<PgCluster> {
        let root = tempfile::Builder::new()
            .prefix("pgiam-pg-")
            .tempdir()?
            .keep();
        let mut cluster = PgCluster {
            port: free_port(),
            socket_dir: root.clone(),
            data_dir: root.join("data"),
            log_path: root.join("postgresql.log"),
            superuser_password: format!("su-{:016x}", rand_u64()),
            root,
            // Nothing to stop until pg_ctl start has run; the directory is still removed.
            stopped: true,
        };
        cluster.init(&opts)?;
        Ok(cluster)
    }

    fn init(&mut self, opts: &PgOptions) -> anyhow::Result<()> {
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755))?;
        if is_root() {
            let pg = os_user("postgres")?;
            nix::unistd::chown(&self.root, Some(pg.uid), Some(pg.gid))?;
        }
        let pwfile = self.root.join("pwfile");
        write_file(&self.root, "pwfile", &self.superuser_password, 0o600);
        if is_root() {
            let pg = os_user("postgres")?;
            nix::unistd::chown(&pwfile, Some(pg.uid), Some(pg.gid))?;
        }
        run_checked(self.command("initdb").args([
            "-D",
            path(&self.data_dir),
            "-U",
            "postgres",
            "--pwfile",
            path(&pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]))
        .context("initdb")?;
        std::fs::remove_file(&pwfile)?;

        let mut conf = vec![
            format!("port = {}", self.port),
            format!("unix_socket_directories = '{}'", self.socket_dir.display()),
            "listen_addresses = '127.0.0.1'".into(),
            "log_connections = on".into(),
            "log_disconnections = on".into(),
            "fsync = off".into(),
            "max_connections = 200".into(),
        ];
        if let Some((cert, key)) = &opts.ssl {
            // PostgreSQL insists the key is owned by it and private: copy both in.
            let c = self.data_dir.join("server.crt");
            let k = self.data_dir.join("server.key");
            std::fs::copy(cert, &c)?;
            std::fs::copy(key, &k)?;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
            if is_root() {
                let pg = os_user("postgres")?;
                for f in [&c, &k] {
                    nix::unistd::chown(f, Some(pg.uid), Some(pg.gid))?;
                }
            }
            conf.push("ssl = on".into());
            conf.push("ssl_cert_file = 'server.crt'".into());
            conf.push("ssl_key_file = 'server.key'".into());
        }
        conf.extend(opts.extra_conf.iter().cloned());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir.join("postgresql.conf"))?;
        writeln!(f, "\n# pgiam test harness\n{}", conf.join("\n"))?;
        if let Some(lines) = &opts.hba_lines {
            std::fs::write(self.data_dir.join("pg_hba.conf"), lines.join("\n") + "\n")?;
        }

        run_checked(self.command("pg_ctl").args([
            "-D",
            path(&self.data_dir),
            "-l",
            path(&self.log_path),
            "-w",
            "-t",
            "60",
            "start",
        ]))
        .with_context(|| format!("pg_ctl start; log:\n{}", self.log()))?;
        self.stopped = false;
        Ok(())
    }

    /// The superuser over the cluster's own unix socket (trust).
    fn superuser_args(&self) -> [String; 6] {
        [
            "-h".into(),
            path(&self.socket_dir).into(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut cmd = self.command("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(self.superuser_args())
            .args(["-d", db, "-c", sql]);
        cmd
    }

    /// Runs SQL as the superuser over the cluster's own unix socket; trimmed stdout.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = run_checked(&mut self.psql_command(db, sql))
            .with_context(|| format!("psql -c {sql:?}"))?;
        Ok(out.trim().to_owned())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Logins for sessions the server has logged (`connection authorized` lines that contain
    /// `what`, e.g. `user=app database=app`), leaving out pgiam's reads of the catalog: a
    /// short connection of their own, `application_name=pgiam-catalog`.
    pub fn session_logins(&self, what: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("connection authorized")
                    && l.contains(what)
                    && !l.contains("application_name=pgiam-catalog")
            })
            .count()
    }

    pub fn pgbench_init(&self, db: &str, scale: u32) -> anyhow::Result<()> {
        run_checked(
            self.command("pgbench")
                .args(["-i", "-q", "-s", &scale.to_string()])
                .args(self.superuser_args())
                .arg(db),
        )
        .map(|_| ())
    }

    /// Restarts the server the way an operator does (`pg_ctl restart -m fast`): every session
    /// is terminated (57P01) and the server is back on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        run_checked(self.command("pg_ctl").args([
            "-D",
            path(&self.data_dir),
            "-l",
            path(&self.log_path),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "restart",
        ]))
        .map(|_| ())
        .with_context(|| {
            format!(
                "pg_ctl restart; log:
{}",
                self.log()
            )
        })
    }

    pub fn stop(&mut self) {
        if !self.stopped {
            let _ = self
                .command("pg_ctl")
                .args(["-D", path(&self.data_dir), "-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.stopped = true;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A PostgreSQL program, run as the `postgres` OS user when we are root (initdb and the
/// server refuse to run as root).
pub fn pg_command(program: &str) -> Command {
    let mut cmd = Command::new(pg_bin_dir().join(program));
    if is_root() {
        run_as(&mut cmd, "postgres");
    }
    cmd.current_dir("/");
    cmd
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs `cmd` to completion; its stdout, or an error with both outputs when it fails.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("/dev/urandom");
    u64::from_ne_bytes(b)
}

/// A throwaway certificate authority for upstream TLS tests.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pgiam test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key, for a test that hands pgiam this CA to issue from.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses): `(cert_pem, key_pem)`.
    pub fn issue_server_cert(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> PathBuf {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup v2 hierarchy mounted")
}

/// A cgroup v2 directory of the test's own, removed on drop (with any children). Processes the
/// test started in it must have exited or been stopped by the test before.
pub struct TestCgroup {
    /// Absolute directory under the cgroup2 mount.
    pub dir: PathBuf,
    /// The path as the kernel names it (`/pgiam-test-…`), for configs and principals.
    pub path: String,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> TestCgroup {
        let mount = cgroup2_mount();
        let name = format!("{prefix}-{}-{:08x}", std::process::id(), rand_u64() as u32);
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup {
            path: format!("/{name}"),
            dir,
        }
    }

    pub fn child(&self, name: &str) -> TestCgroup {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        TestCgroup {
            path: format!("{}/{name}", self.path),
            dir,
        }
    }

    /// `program args…` started inside this cgroup: a shell puts itself in, then execs it, so
    /// the program is in the cgroup from its first instruction.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$PGIAM_CGROUP_PROCS\" && exec \"$0\" \"$@\"")
            .arg(program)
            .env("PGIAM_CGROUP_PROCS", self.dir.join("cgroup.procs"));
        cmd
    }

    /// Like [`TestCgroup::command`], and then as OS user `user`: the process joins the cgroup
    /// as root and drops privileges with setpriv, which opens no PAM session that could move it
    /// into a scope of its own.
    pub fn command_as(&self, program: impl AsRef<std::ffi::OsStr>, user: &str) -> Command {
        let u = os_user(user).expect("user exists");
        let mut cmd = self.command("setpriv");
        cmd.arg(format!("--reuid={}", u.uid))
            .arg(format!("--regid={}", u.gid))
            .arg("--clear-groups")
            .arg(program);
        cmd
    }

    fn remove(dir: &Path) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    Self::remove(&e.path());
                }
            }
        }
        // A process that just exited can linger for a moment as a zombie member.
        for _ in 0..100 {
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", dir.display());
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        Self::remove(&self.dir);
    }
}

/// A running pgiam, stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
pub struct Pgiam {
    pub child: Child,
    /// The binary this instance runs: its CLI verbs run the same one.
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
}

impl Pgiam {
    /// Starts `pgiam run` with `config` and waits until `tcp` accepts connections.
    pub fn start(config: &str, tcp: SocketAddr) -> anyhow::Result<Pgiam> {
        Self::start_with(pgiam_bin(), config, tcp)
    }

    pub fn start_with(bin: PathBuf, config: &str, tcp: SocketAddr) -> anyhow::Result<Pgiam> {
        Self::start_in(bin, config, tcp, None)
    }

    /// Starts pgiam inside `cgroup` (when given), as interception tests need for the fast path.
    pub fn start_in(
        bin: PathBuf,
        config: &str,
        tcp: SocketAddr,
        cgroup: Option<&TestCgroup>,
    ) -> anyhow::Result<Pgiam> {
        Self::start_with_env(bin, config, tcp, cgroup, &[])
    }

    /// [`Pgiam::start_in`] with more environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(
        bin: PathBuf,
        config: &str,
        tcp: SocketAddr,
        cgroup: Option<&TestCgroup>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Pgiam> {
        let dir = tempfile::Builder::new()
            .prefix("pgiam-run-")
            .tempdir()?
            .keep();
        let config_path = write_file(&dir, "pgiam.toml", config, 0o600);
        let log_path = dir.join("pgiam.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match cgroup {
            Some(cg) => cg.command(&bin),
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["run", "--config", path(&config_path)])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut pgiam = Pgiam {
            child,
            bin,
            dir,
            log_path,
            config_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready means listening *and* everything installed (interception attaches after the
        // listeners are up): pgiam logs "pgiam ready" only then.
        loop {
            if pgiam.log().contains("pgiam ready")
                && TcpStream::connect_timeout(&tcp, Duration::from_millis(200)).is_ok()
            {
                return Ok(pgiam);
            }
            if let Some(status) = pgiam.child.try_wait()? {
                bail!("pgiam exited ({status}) before listening:\n{}", pgiam.log());
            }
            if Instant::now() > deadline {
                bail!("pgiam did not listen on {tcp} within 20s:\n{}", pgiam.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `pgiam ARGS… --config <this config>` to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .args(["--config", path(&self.config_path)])
            .output()
            .expect("run pgiam")
    }

    /// Runs `pgiam ARGS…` (this instance's binary, no config) to completion.
    pub fn cli_bare(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .output()
            .expect("run pgiam")
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pgiam {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- pgiam log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A memory figure of `/proc/<pid>/status` (`VmRSS`: resident now, `VmHWM`: the peak), in
/// KiB; 0 when the process is gone.
pub fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One scrape of `/metrics`, by hand (HTTP/1.1, the connection closed after it).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample `name` (with its labels as written), or 0 when absent.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}
