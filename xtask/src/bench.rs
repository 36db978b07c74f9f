//! `cargo xtask bench`: pgbench against direct PostgreSQL, PgBouncer (session mode) and pgiam
//! as deployed (eBPF interception, audit in its default mode, `changes`), interleaved round by
//! round so drift hits all alike; medians and ratios. pgiam also runs with audit `always` and
//! without audit (and, with `--fastpath`, without the sk_msg fast path), so each feature's cost
//! shows. A bulk workload (COPY out and a large SELECT over psql) measures rows per second. Every
//! pgiam variant has a cgroup of its own, so no restarts happen between measurements; every
//! audit log is checked with `pgiam audit verify` at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgiam_tests::{free_port, pg_bin_dir, write_file, PgCluster, PgOptions, Pgiam, TestCgroup};

use crate::{run, workspace_root};

enum Kind {
    /// pgbench with these arguments; `statements` per transaction (its script's SQL commands),
    /// to divide the audit log's growth by.
    Pgbench {
        args: &'static [&'static str],
        statements: u64,
    },
    /// One statement reading every row of the bulk table, over psql (`\timing`, output to
    /// /dev/null), repeated in one session.
    Bulk { sql: &'static str },
}

struct Workload {
    name: &'static str,
    kind: Kind,
}

impl Workload {
    fn is_bulk(&self) -> bool {
        matches!(self.kind, Kind::Bulk { .. })
    }
}

/// The bulk workload's table, created at set-up: `id`, and a 32-character `payload`.
const BULK_TABLE: &str = "bench_bulk";

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "select prepared c1",
        kind: Kind::Pgbench {
            args: &["-S", "-M", "prepared", "-c", "1"],
            statements: 1,
        },
    },
    Workload {
        name: "select prepared c16",
        kind: Kind::Pgbench {
            args: &["-S", "-M", "prepared", "-c", "16", "-j", "2"],
            statements: 1,
        },
    },
    Workload {
        name: "select simple c16",
        kind: Kind::Pgbench {
            args: &["-S", "-M", "simple", "-c", "16", "-j", "2"],
            statements: 1,
        },
    },
    Workload {
        name: "select extended c16",
        kind: Kind::Pgbench {
            args: &["-S", "-M", "extended", "-c", "16", "-j", "2"],
            statements: 1,
        },
    },
    // tpcb-like: BEGIN, three UPDATEs, a SELECT, an INSERT, END.
    Workload {
        name: "tpcb prepared c16",
        kind: Kind::Pgbench {
            args: &["-M", "prepared", "-c", "16", "-j", "2"],
            statements: 7,
        },
    },
    // A login per transaction: the audit bytes per statement include the session's records.
    Workload {
        name: "connect churn c8",
        kind: Kind::Pgbench {
            args: &["-S", "-C", "-c", "8", "-j", "2"],
            statements: 1,
        },
    },
    Workload {
        name: "bulk copy out",
        kind: Kind::Bulk {
            sql: "COPY bench_bulk TO STDOUT",
        },
    },
    Workload {
        name: "bulk select",
        kind: Kind::Bulk {
            sql: "SELECT id, payload FROM bench_bulk",
        },
    },
];

/// Where a workload is pointed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    PgBouncer,
    Pgiam,
    PgiamAlways,
    PgiamNoAudit,
    PgiamNoFastPath,
    /// As deployed, with `pool = "session"`: backends reused across clients.
    PgiamPooled,
    /// PgBouncer in transaction mode, capped at [`TX_BACKENDS`] server connections.
    PgBouncerTransaction,
    /// As deployed, with `pool = "transaction"` and `max_backends` [`TX_BACKENDS`].
    PgiamTransaction,
    /// The same without `[audit]`: what the pooling costs apart from the audit.
    PgiamTransactionNoAudit,
}

/// The server connections both transaction poolers may hold.
const TX_BACKENDS: usize = 50;

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::PgBouncer => "pgbouncer",
            Target::Pgiam => "pgiam",
            Target::PgiamAlways => "pgiam -always",
            Target::PgiamNoAudit => "pgiam -audit",
            Target::PgiamNoFastPath => "pgiam -fastpath",
            Target::PgiamPooled => "pgiam pooled",
            Target::PgBouncerTransaction => "pgbouncer tx",
            Target::PgiamTransaction => "pgiam tx",
            Target::PgiamTransactionNoAudit => "pgiam tx -audit",
        }
    }

    /// `[audit] durability`, or no audit.
    fn durability(self) -> Option<&'static str> {
        match self {
            Target::Pgiam
            | Target::PgiamNoFastPath
            | Target::PgiamPooled
            | Target::PgiamTransaction => Some("changes"),
            Target::PgiamAlways => Some("always"),
            Target::Direct
            | Target::PgBouncer
            | Target::PgBouncerTransaction
            | Target::PgiamNoAudit
            | Target::PgiamTransactionNoAudit => None,
        }
    }
}

struct Options {
    /// Idle clients (logged in, nothing sent since) held open for the memory measurement.
    idle: usize,
    /// Sessions held open after a round trip (each holds a server connection, behind pgiam as
    /// behind PgBouncer in session mode).
    held: usize,
    duration: u32,
    rounds: usize,
    scale: u32,
    /// Rows in the bulk table.
    bulk_rows: u64,
    /// Times the bulk statement runs per sample (one psql session).
    bulk_repeat: u32,
    workloads: Vec<&'static Workload>,
    /// Also pgiam without the sk_msg fast path.
    fastpath: bool,
    /// Also the per-statement classification and authorization benchmark.
    classify: bool,
    /// Clients at once in the transaction pooling runs (0: no such runs).
    many: usize,
}

const USAGE: &str =
    "options: --short, --duration SECS, --rounds N, --scale N, --idle N, --held N, \
     --bulk-rows N, --bulk-repeat N, --many N, --fastpath, --workloads NAME[,NAME]";

fn parse_options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        idle: 10_000,
        held: 250,
        duration: 10,
        rounds: 3,
        scale: 10,
        bulk_rows: 1_000_000,
        bulk_repeat: 3,
        workloads: WORKLOADS.iter().collect(),
        fastpath: false,
        classify: true,
        many: 10_000,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().context(format!("{a} needs a value"));
        match a.as_str() {
            "--short" => {
                o.idle = 1000;
                o.held = 100;
                o.duration = 1;
                o.scale = 1;
                o.bulk_repeat = 1;
                o.classify = false;
                o.many = 1000;
            }
            "--duration" => o.duration = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--scale" => o.scale = value()?.parse()?,
            "--idle" => o.idle = value()?.parse()?,
            "--held" => o.held = value()?.parse()?,
            "--bulk-rows" => o.bulk_rows = value()?.parse()?,
            "--bulk-repeat" => o.bulk_repeat = value()?.parse()?,
            "--many" => o.many = value()?.parse()?,
            "--fastpath" => o.fastpath = true,
            "--workloads" => {
                let wanted = value()?;
                // The transaction pooling runs are named "transaction".
                if !wanted.split(',').any(|n| "transaction".contains(n.trim())) {
                    o.many = 0;
                }
                o.workloads = WORKLOADS
                    .iter()
                    .filter(|w| wanted.split(',').any(|n| w.name.contains(n.trim())))
                    .collect();
                if o.workloads.is_empty() && o.many == 0 {
                    bail!("no workload matches {wanted:?}");
                }
            }
            other => bail!("unknown option {other}; {USAGE}"),
        }
    }
    if o.rounds < 3 {
        bail!("at least 3 rounds: a median of fewer says little");
    }
    if o.bulk_rows == 0 || o.bulk_repeat == 0 {
        bail!("--bulk-rows and --bulk-repeat must be at least 1");
    }
    Ok(o)
}

/// PgBouncer in session mode, run as the postgres user (it refuses root).
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// `pool_size`: session mode gives each client a server connection of its own.
    /// Transaction mode (`transaction`) takes its clients without a password (`trust`), as
    /// pgiam takes them on their kernel identity: ten thousand SCRAM logins would measure
    /// PgBouncer's one core hashing, not its pooling.
    fn start(
        pg_port: u16,
        user: &str,
        password: &str,
        pool_size: usize,
        transaction: bool,
    ) -> anyhow::Result<PgBouncer> {
        let dir = tempfile::Builder::new()
            .prefix("pgiam-bench-pgb-")
            .tempdir()?;
        let port = free_port();
        write_file(
            dir.path(),
            "userlist.txt",
            &format!("\"{user}\" \"{password}\"\n"),
            0o600,
        );
        let ini = format!(
            "[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = {auth}\nauth_file = {dir}/userlist.txt\npool_mode = {mode}\n\
             max_client_conn = 100000\ndefault_pool_size = {pool_size}\nlogfile = {dir}/pgbouncer.log\n\
             ignore_startup_parameters = extra_float_digits\n",
            dir = dir.path().display(),
            auth = if transaction { "trust" } else { "scram-sha-256" },
            mode = if transaction { "transaction" } else { "session" },
        );
        let ini_path = write_file(dir.path(), "pgbouncer.ini", &ini, 0o600);
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
            for p in [dir.path(), &ini_path, &dir.path().join("userlist.txt")] {
                nix::unistd::chown(p, Some(pg.uid), Some(pg.gid))?;
            }
        }
        let mut cmd = Command::new("/usr/sbin/pgbouncer");
        cmd.arg(&ini_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if nix::unistd::geteuid().is_root() {
            pgiam_tests::run_as(&mut cmd, "postgres");
        }
        let child = cmd.spawn().context("starting pgbouncer")?;
        let mut b = PgBouncer {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(b);
            }
            if let Some(s) = b.child.try_wait()? {
                bail!("pgbouncer exited: {s}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!("pgbouncer did not listen on {port}")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One pgiam with interception over its own cgroup subtree.
struct PgiamVariant {
    target: Target,
    pgiam: Option<Pgiam>,
    config_path: PathBuf,
    /// The audit log, when the variant has one.
    audit_path: Option<PathBuf>,
    /// Where its Prometheus metrics are served, when they are.
    metrics: Option<String>,
    app: TestCgroup,
    _proxy: TestCgroup,
    // Last: removed after its children.
    _cgroup: TestCgroup,
}

impl Drop for PgiamVariant {
    fn drop(&mut self) {
        drop(self.pgiam.take());
        let _ = Command::new(workspace_root().join("target/release/pgiam"))
            .args(["uninstall-bpf", "--config"])
            .arg(&self.config_path)
            .output();
    }
}

/// What pgbench needs and nothing more: its four tables, count() (its scale check), and the
/// session's transactions; and the bulk workload's reads of its table (SELECT, COPY TO STDOUT).
const BENCH_POLICY: &str = r#"
@id("connect")
permit(principal, action == PgIam::Action::"connect", resource == PgIam::Database::"app");
@id("pgbench-tables")
permit(principal, action in [PgIam::Action::"select", PgIam::Action::"insert", PgIam::Action::"update"],
       resource in PgIam::Schema::"app.public")
  when { resource.name like "pgbench_*" };
@id("count")
permit(principal, action == PgIam::Action::"execute", resource)
  when { resource.name == "count" };
@id("bulk-table")
permit(principal, action in [PgIam::Action::"select", PgIam::Action::"copy_out"],
       resource == PgIam::Table::"app.public.bench_bulk");
"#;

fn start_variant(
    target: Target,
    root: &TestCgroup,
    pg_port: u16,
    dir: &Path,
    password_file: &Path,
) -> anyhow::Result<PgiamVariant> {
    let name = target.label().replace([' ', '-'], "");
    let cg = root.child(&name);
    let (proxy, app) = (cg.child("pgiam"), cg.child("app"));
    let port = free_port();
    let audit_path = target
        .durability()
        .map(|_| dir.join(format!("{name}-audit.jsonl")));
    let audit = match (target.durability(), &audit_path) {
        (Some(durability), Some(path)) => format!(
            "[audit]\npath = \"{}\"\ndurability = \"{durability}\"\n",
            path.display()
        ),
        _ => String::new(),
    };
    let policy = write_file(dir, "bench-policy.cedar", BENCH_POLICY, 0o644);
    // The transaction pooler's metrics: how many backends it opened.
    let metrics = matches!(
        target,
        Target::PgiamTransaction | Target::PgiamTransactionNoAudit
    )
    .then(|| format!("127.0.0.1:{}", free_port()));
    // `connect = "deferred"`: logins are answered without a server connection, as PgBouncer
    // answers them, so idle clients and connection churn compare like with like (the default,
    // `at-login`, opens a backend per client as direct PostgreSQL does).
    let config = format!(
        "state_dir = \"{dir}/state\"\n[listen]\ntcp = \"127.0.0.1:{port}\"\n\
         [upstream]\nhost = \"127.0.0.1\"\nport = {pg_port}\nconnect = \"deferred\"\n\
         [policy]\nfile = \"{policy}\"\n\
         [roles.bench]\npassword_file = \"{pw}\"\n\
         [[mapping]]\nprincipal = \"cgroup:{app}\"\ndatabase = \"app\"\nrole = \"bench\"\npool = \"{pool}\"\n\
         [interception]\ncgroup = \"{cg}\"\nendpoints = [\"127.0.0.1\"]\nports = [{pg_port}]\n\
         fast_path = {fast}\nbpffs_dir = \"/sys/fs/bpf/{bpffs}\"\n{audit}{transaction}",
        dir = dir.display(),
        policy = policy.display(),
        pw = password_file.display(),
        app = app.path,
        cg = cg.path,
        fast = target != Target::PgiamNoFastPath,
        pool = match target {
            Target::PgiamPooled => "session",
            Target::PgiamTransaction | Target::PgiamTransactionNoAudit => "transaction",
            _ => "none",
        },
        bpffs = cg.path.trim_start_matches('/').replace('/', "-"),
        transaction = match &metrics {
            Some(addr) => format!(
                "[pool]\nsize = {TX_BACKENDS}\nmax_backends = {TX_BACKENDS}\nqueue_timeout_secs = 60\n\
                 [admin]\nsocket = \"{dir}/{name}-admin.sock\"\nmetrics = \"{addr}\"\n",
                dir = dir.display()
            ),
            None => String::new(),
        },
    );
    let config_path = write_file(dir, &format!("{name}.toml"), &config, 0o600);
    let pgiam = Pgiam::start_in(
        workspace_root().join("target/release/pgiam"),
        &config,
        format!("127.0.0.1:{port}").parse()?,
        Some(&proxy),
    )?;
    Ok(PgiamVariant {
        target,
        pgiam: Some(pgiam),
        config_path,
        audit_path,
        metrics,
        app,
        _proxy: proxy,
        _cgroup: cg,
    })
}

#[derive(Default, Clone, Copy)]
struct Sample {
    /// Transactions per second (pgbench), rows per second (bulk).
    rate: f64,
    /// Per transaction (pgbench), per statement (bulk).
    latency_ms: f64,
    /// SQL statements the run executed.
    statements: u64,
    /// The audit log's growth over the run.
    audit_bytes: Option<u64>,
}

fn pgbench(
    cmd: &mut Command,
    name: &str,
    args: &[&str],
    statements_per_transaction: u64,
    duration: u32,
    dsn: &str,
) -> anyhow::Result<Sample> {
    cmd.args(["-n", "-T", &duration.to_string()])
        .args(args)
        .arg(dsn);
    let out = cmd.output().context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("number of failed transactions: 0 ") {
        bail!(
            "pgbench {name} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |prefix: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split(['/', ' ']).next()?.parse().ok())
            .with_context(|| format!("no {prefix:?} in pgbench output:\n{text}"))
    };
    let transactions = field("number of transactions actually processed: ")?;
    if transactions == 0.0 {
        // Nothing finished within the run (pgbench reports no rate): a stall, shown as 0 tps
        // and an infinite latency in the tables rather than ending the benchmark.
        eprintln!("bench: WARNING: pgbench {name}: no transaction completed in {duration} s");
        return Ok(Sample {
            rate: 0.0,
            latency_ms: f64::INFINITY,
            statements: 0,
            audit_bytes: None,
        });
    }
    Ok(Sample {
        rate: field("tps = ")?,
        latency_ms: field("latency average = ")?,
        statements: transactions as u64 * statements_per_transaction,
        audit_bytes: None,
    })
}

/// `sql` run `repeat` times in one psql session, its rows to /dev/null. psql's `\timing` times
/// each statement from its sending to its last row: not the login, and not the formatting of a
/// SELECT's rows (psql formats them after); a COPY's rows are written to /dev/null as they come.
fn psql_bulk(
    cmd: &mut Command,
    sql: &str,
    repeat: u32,
    rows: u64,
    dsn: &str,
) -> anyhow::Result<Sample> {
    cmd.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-o",
        "/dev/null",
    ])
    .args(["-c", "\\timing on"]);
    for _ in 0..repeat {
        cmd.args(["-c", sql]);
    }
    cmd.args(["-d", dsn]).stdin(Stdio::null());
    let out = cmd.output().context("running psql")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "Time: 812.345 ms" or "Time: 1234.567 ms (00:01.235)".
    let times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Time: "))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    if !out.status.success() || times.len() != repeat as usize {
        bail!(
            "psql {sql:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ms: f64 = times.iter().sum();
    Ok(Sample {
        rate: (rows * u64::from(repeat)) as f64 / (ms / 1000.0),
        latency_ms: ms / f64::from(repeat),
        statements: repeat.into(),
        audit_bytes: None,
    })
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The audit log's length once pgiam has written what the run left: records nobody waits for
/// (completions, session ends) may reach the file up to a flush interval (100 ms by default)
/// after their statement. Waits until the length has not changed for 300 ms (at most 5 s).
fn settled_len(path: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut len = file_len(path);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(25));
        let now = file_len(path);
        if now != len {
            (len, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(300) {
            break;
        }
    }
    len
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

type Results = BTreeMap<(usize, Target), Vec<Sample>>;

/// One table: pgbench workloads (`unit` "tps", latency per transaction) or bulk ones ("rows/s",
/// time per statement). Medians across rounds; audit bytes per statement are the total growth
/// over the total statements.
fn print_table(
    results: &Results,
    workloads: &[(usize, &Workload)],
    unit: &str,
    latency: &str,
    fastpath: bool,
) {
    let median_of = |wi: usize, t: Target, f: fn(&Sample) -> f64| {
        results
            .get(&(wi, t))
            .map(|s| median(s.iter().map(f).collect()))
    };
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let audit_per_statement = |wi: usize, t: Target| {
        let samples = results.get(&(wi, t))?;
        let bytes: u64 = samples.iter().map(|s| s.audit_bytes).sum::<Option<u64>>()?;
        let statements: u64 = samples.iter().map(|s| s.statements).sum();
        Some(bytes as f64 / statements.max(1) as f64)
    };
    let fastpath_header = if fastpath {
        format!(" pgiam -fastpath {unit} |")
    } else {
        String::new()
    };
    println!(
        "\n| workload | direct {unit} | pgbouncer {unit} | pgiam {unit} | pgiam/direct | pgiam/pgbouncer | pgiam -always {unit} | -always/pgbouncer | pgiam -audit {unit} |{fastpath_header} pgiam pooled {unit} | pooled/direct | pooled/pgbouncer | {latency} direct / pgbouncer / pgiam | audit B/stmt pgiam / -always |"
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|{}---|---|---|---|---|",
        if fastpath { "---|" } else { "" }
    );
    for &(wi, w) in workloads {
        let rate = |t| median_of(wi, t, |s| s.rate);
        let lat = |t| median_of(wi, t, |s| s.latency_ms).unwrap_or(0.0);
        let (d, b, p, a) = (
            rate(Target::Direct),
            rate(Target::PgBouncer),
            rate(Target::Pgiam),
            rate(Target::PgiamAlways),
        );
        let pooled = rate(Target::PgiamPooled);
        let fastpath_cell = if fastpath {
            format!(" {} |", fmt(rate(Target::PgiamNoFastPath)))
        } else {
            String::new()
        };
        let bytes = |t| audit_per_statement(wi, t);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |{fastpath_cell} {} | {} | {} | {:.3} / {:.3} / {:.3} | {} / {} |",
            w.name,
            fmt(d),
            fmt(b),
            fmt(p),
            ratio(p, d),
            ratio(p, b),
            fmt(a),
            ratio(a, b),
            fmt(rate(Target::PgiamNoAudit)),
            fmt(pooled),
            ratio(pooled, d),
            ratio(pooled, b),
            lat(Target::Direct),
            lat(Target::PgBouncer),
            lat(Target::Pgiam),
            fmt(bytes(Target::Pgiam)),
            fmt(bytes(Target::PgiamAlways)),
        );
    }
}

/// `pgiam audit verify` on every variant's log, pgiam stopped: "intact (N records)", or an
/// error that fails the benchmark.
fn verify_audit_logs(logs: &[(Target, PathBuf)]) -> anyhow::Result<()> {
    println!();
    for (target, path) in logs {
        let out = Command::new(workspace_root().join("target/release/pgiam"))
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .context("running pgiam audit verify")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "PATH: N records, hash chain intact"
        let records = text
            .rsplit_once(": ")
            .and_then(|(_, r)| r.split_whitespace().next()?.parse::<u64>().ok());
        match records {
            Some(n) if out.status.success() && text.contains("intact") => println!(
                "audit verify {}: intact ({n} records, {} bytes)",
                target.label(),
                file_len(path)
            ),
            _ => bail!(
                "AUDIT LOG BROKEN: pgiam audit verify {} ({}) failed ({}):\n{text}{}",
                path.display(),
                target.label(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    Ok(())
}

pub fn run_bench(args: &[String]) -> anyhow::Result<()> {
    let opts = parse_options(args)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark measures pgiam with eBPF interception: run it as root");
    }
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root())
            .args(["build", "--release", "--bin", "pgiam"]),
    )?;

    eprintln!("bench: PostgreSQL (pgbench scale {})", opts.scale);
    let pg = PgCluster::start(PgOptions {
        extra_conf: vec![
            // Two batches of held sessions, each with a backend behind PgBouncer and behind
            // pgiam, and PgBouncer keeps its server connections after its clients leave.
            format!("max_connections = {}", 4 * opts.held + 300),
            "shared_buffers = '256MB'".into(),
            "synchronous_commit = off".into(),
        ],
        ..PgOptions::default()
    })?;
    let password = format!("bench-{:x}", std::process::id());
    pg.psql(&format!("CREATE ROLE bench LOGIN PASSWORD '{password}'"))?;
    pg.psql("CREATE DATABASE app OWNER bench")?;
    pg.pgbench_init("app", opts.scale)?;
    if opts.workloads.iter().any(|w| w.is_bulk()) {
        eprintln!("bench: bulk table ({} rows)", opts.bulk_rows);
        pg.psql_db(
            "app",
            &format!(
                "CREATE TABLE {BULK_TABLE} AS SELECT g AS id, md5(g::text) AS payload \
                 FROM generate_series(1, {}) g",
                opts.bulk_rows
            ),
        )?;
        // Hint bits set and the visibility map built now, not by the first run that reads it.
        pg.psql_db("app", &format!("VACUUM (FREEZE, ANALYZE) {BULK_TABLE}"))?;
    }
    pg.psql_db("app", "GRANT ALL ON ALL TABLES IN SCHEMA public TO bench")?;

    let dir = tempfile::Builder::new().prefix("pgiam-bench-").tempdir()?;
    let pw = write_file(dir.path(), "bench.password", &password, 0o600);
    raise_fd_limit(opts.idle.max(opts.many) + 2 * opts.held + 1024)?;
    let bouncer = PgBouncer::start(pg.port, "bench", &password, 2 * opts.held + 32, false)?;
    let root = TestCgroup::new("pgiam-bench");
    let mut targets = vec![
        Target::Direct,
        Target::PgBouncer,
        Target::Pgiam,
        Target::PgiamAlways,
        Target::PgiamNoAudit,
        Target::PgiamPooled,
    ];
    if opts.fastpath {
        targets.push(Target::PgiamNoFastPath);
    }
    // The first is pgiam as deployed: the memory measurement uses it.
    let mut variants = Vec::new();
    if !opts.workloads.is_empty() {
        for &t in &targets[2..] {
            variants.push(start_variant(t, &root, pg.port, dir.path(), &pw)?);
        }
    }

    let direct_dsn = format!("host=127.0.0.1 port={} dbname=app user=bench", pg.port);
    let bouncer_dsn = format!("host=127.0.0.1 port={} dbname=app user=bench", bouncer.port);
    // The application's DSN, unchanged: the kernel sends it through pgiam.
    let intercepted_dsn = format!(
        "host=127.0.0.1 port={} dbname=app user=bench sslmode=disable",
        pg.port
    );
    let pgbench_bin = pg_bin_dir().join("pgbench");
    let psql_bin = pg_bin_dir().join("psql");

    let mut results = Results::new();
    let mut stalls = Vec::new();
    for round in 1..=opts.rounds {
        for (wi, w) in opts.workloads.iter().enumerate() {
            for &t in &targets {
                let variant = variants.iter().find(|v| v.target == t);
                let command = |program: &Path| match variant {
                    // Inside the variant's application cgroup: intercepted, no password.
                    Some(v) => v.app.command(program),
                    None => {
                        let mut cmd = Command::new(program);
                        cmd.env("PGPASSWORD", &password);
                        cmd
                    }
                };
                let dsn = match t {
                    Target::Direct => &direct_dsn,
                    Target::PgBouncer => &bouncer_dsn,
                    _ => &intercepted_dsn,
                };
                let audit = variant.and_then(|v| v.audit_path.as_deref());
                let audit_before = audit.map(file_len);
                let mut sample = match &w.kind {
                    Kind::Pgbench { args, statements } => pgbench(
                        &mut command(&pgbench_bin),
                        w.name,
                        args,
                        *statements,
                        opts.duration,
                        dsn,
                    )?,
                    Kind::Bulk { sql } => psql_bulk(
                        &mut command(&psql_bin),
                        sql,
                        opts.bulk_repeat,
                        opts.bulk_rows,
                        dsn,
                    )?,
                };
                if let (Some(path), Some(before)) = (audit, audit_before) {
                    sample.audit_bytes = Some(settled_len(path).saturating_sub(before));
                }
                eprintln!(
                    "bench: round {round} {:<22} {:<16} {:>10.0} {} {:>8.3} ms{}",
                    w.name,
                    t.label(),
                    sample.rate,
                    if w.is_bulk() { "rows/s" } else { "tps" },
                    sample.latency_ms,
                    match (sample.audit_bytes, sample.statements) {
                        (None, _) => String::new(),
                        (Some(b), 0) => format!(" {b} audit bytes, no statement"),
                        (Some(b), n) => format!(" {:>6.0} audit B/stmt", b as f64 / n as f64),
                    },
                );
                if sample.rate == 0.0 {
                    stalls.push(format!("round {round} {} {}", w.name, t.label()));
                }
                results.entry((wi, t)).or_default().push(sample);
            }
        }
    }

    println!(
        "\npgbench {}s x {} rounds, interleaved; medians. Machine: {} cores, kernel {}.",
        opts.duration,
        opts.rounds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let (bulk, pgbench_workloads): (Vec<_>, Vec<_>) = opts
        .workloads
        .iter()
        .map(|w| &**w)
        .enumerate()
        .partition(|(_, w)| w.is_bulk());
    if !pgbench_workloads.is_empty() {
        print_table(
            &results,
            &pgbench_workloads,
            "tps",
            "latency ms",
            opts.fastpath,
        );
    }
    if !bulk.is_empty() {
        println!(
            "\nBulk: {} rows of {BULK_TABLE} (int, 32-character text) per statement, psql, rows \
             to /dev/null, {} statement(s) per run:",
            opts.bulk_rows, opts.bulk_repeat
        );
        print_table(&results, &bulk, "rows/s", "ms per statement", opts.fastpath);
    }
    if !stalls.is_empty() {
        println!(
            "\nWARNING: no transaction completed in these runs (0 tps, latency inf): {}",
            stalls.join("; ")
        );
    }
    let mut transaction_logs = Vec::new();
    if opts.many > 0 {
        transaction_logs = transaction_pooling(&opts, pg.port, &password, &root, dir.path(), &pw)?;
    }
    // (Not when only the transaction pooling runs were asked for.)
    if !variants.is_empty() {
        // Memory per session: resident set before and while sessions are held open.
        let pgiam_pid = variants[0]
            .pgiam
            .as_ref()
            .map(|p| p.pid() as u32)
            .unwrap_or(0);
        let hold = |make: &dyn Fn() -> Command,
                    dsn: &str,
                    n: usize,
                    then: &str|
         -> anyhow::Result<std::process::Child> {
            let mut holder = make()
                .arg("hold-connections")
                .arg(n.to_string())
                .arg(then)
                .arg(dsn)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(holder.stdout.as_mut().expect("piped")),
                &mut line,
            )?;
            if line.trim() != "ready" {
                bail!("holding {n} sessions failed: {line}");
            }
            // Let allocators settle before reading; sessions that ran a query, long enough for
            // pgiam's to rest (an idle session gives its relay back after one to two seconds).
            let settle = if then == "query" { 3_000 } else { 500 };
            std::thread::sleep(std::time::Duration::from_millis(settle));
            Ok(holder)
        };
        let release = |holders: Vec<std::process::Child>| -> anyhow::Result<()> {
            for mut h in holders.into_iter().rev() {
                drop(h.stdin.take());
                h.wait()?;
            }
            Ok(())
        };
        // Idle clients: logged in, nothing sent since (a pool's spare connections). Behind both,
        // they hold no server connection.
        let idle_clients = |pid: u32, make: &dyn Fn() -> Command, dsn: &str| {
            let before = pgiam_tests::status_kib(pid as i32, "VmRSS");
            let holder = hold(make, dsn, opts.idle, "login")?;
            let during = pgiam_tests::status_kib(pid as i32, "VmRSS");
            release(vec![holder])?;
            anyhow::Ok((before, during))
        };
        // Sessions after a round trip. Two batches, the first still held while the second opens:
        // the second batch's growth is the marginal cost of a session, not of refilling a heap
        // that earlier workloads left with free space.
        let held_sessions = |pid: u32, make: &dyn Fn() -> Command, dsn: &str| {
            let first = hold(make, dsn, opts.held, "query")?;
            let before = pgiam_tests::status_kib(pid as i32, "VmRSS");
            let second = hold(make, dsn, opts.held, "query")?;
            let during = pgiam_tests::status_kib(pid as i32, "VmRSS");
            release(vec![first, second])?;
            anyhow::Ok((before, during))
        };
        let xtask = std::env::current_exe()?;
        let bouncer_login = format!("{bouncer_dsn} password={password}");
        let direct_cmd = || Command::new(&xtask);
        let app_cmd = || variants[0].app.command(&xtask);
        let per = |(a, b): (u64, u64), n: usize| (b.saturating_sub(a) as f64) * 1024.0 / n as f64;
        // Held sessions first: the idle batch, released, leaves free heap that would hide their
        // growth.
        for (what, n, measure) in [
            (
                "sessions after a round trip (a second batch, the first still open)",
                opts.held,
                &held_sessions
                    as &dyn Fn(u32, &dyn Fn() -> Command, &str) -> anyhow::Result<(u64, u64)>,
            ),
            (
                "idle clients (logged in, nothing sent)",
                opts.idle,
                &idle_clients,
            ),
        ] {
            let b = measure(bouncer.child.id(), &direct_cmd, &bouncer_login)?;
            let p = measure(pgiam_pid, &app_cmd, &intercepted_dsn)?;
            println!(
                "\n{n} {what}: pgiam {} -> {} KiB resident ({:.0} bytes per session); \
                 pgbouncer {} -> {} KiB ({:.0} bytes per session)",
                p.0,
                p.1,
                per(p, n),
                b.0,
                b.1,
                per(b, n)
            );
        }
    }
    let audit_logs: Vec<(Target, PathBuf)> = variants
        .iter()
        .filter_map(|v| Some((v.target, v.audit_path.clone()?)))
        .chain(transaction_logs)
        .collect();
    // Stopped first: everything pgiam wrote is in the files.
    drop(variants);
    verify_audit_logs(&audit_logs)?;
    drop(root);
    drop(bouncer);
    if opts.classify {
        println!(
            "\nclassification and authorization per statement (median of 5 runs of 200 ms):\n"
        );
        run(crate::cargo().args(["bench", "-p", "pgiam-userspace", "--bench", "classify"]))?;
    }
    Ok(())
}

/// Transaction pooling: `opts.many` clients at once through [`TX_BACKENDS`] server
/// connections, pgiam (`pool = "transaction"`) against PgBouncer in transaction mode,
/// select-only in each query mode (PgBouncer 1.18 has no protocol-level prepared statements in
/// transaction mode: pgiam alone runs `-M prepared`); and connection churn through both.
/// Interleaved rounds, medians. Returns pgiam's audit log, pgiam stopped.
fn transaction_pooling(
    opts: &Options,
    pg_port: u16,
    password: &str,
    root: &TestCgroup,
    dir: &Path,
    pw: &Path,
) -> anyhow::Result<Vec<(Target, PathBuf)>> {
    let bouncer = PgBouncer::start(pg_port, "bench", password, TX_BACKENDS, true)?;
    let variants = [
        start_variant(Target::PgiamTransaction, root, pg_port, dir, pw)?,
        start_variant(Target::PgiamTransactionNoAudit, root, pg_port, dir, pw)?,
    ];
    let variant = &variants[0];
    let many = opts.many.to_string();
    let select = |mode: &'static str| -> Vec<String> {
        ["-S", "-M", mode, "-c", &many, "-j", "2"]
            .map(str::to_owned)
            .to_vec()
    };
    let runs: Vec<(String, Vec<String>, bool)> = vec![
        (format!("select simple c{many}"), select("simple"), true),
        (format!("select extended c{many}"), select("extended"), true),
        (
            format!("select prepared c{many}"),
            select("prepared"),
            false,
        ),
        (
            "connect churn c8".into(),
            ["-S", "-C", "-c", "8", "-j", "2"]
                .map(str::to_owned)
                .to_vec(),
            true,
        ),
    ];
    // Thousands of logins take seconds before the first transaction: the run is long enough
    // that they are a small part of it (pgbench's rate leaves them out).
    let many_duration = opts.duration.max(10) + 10;
    let bouncer_dsn = format!("host=127.0.0.1 port={} dbname=app user=bench", bouncer.port);
    let intercepted_dsn =
        format!("host=127.0.0.1 port={pg_port} dbname=app user=bench sslmode=disable");
    let pgbench_bin = pg_bin_dir().join("pgbench");
    let mut results = Results::new();
    for round in 1..=opts.rounds {
        for (i, (name, args, bouncer_too)) in runs.iter().enumerate() {
            for t in [
                Target::PgBouncerTransaction,
                Target::PgiamTransaction,
                Target::PgiamTransactionNoAudit,
            ] {
                if t == Target::PgBouncerTransaction && !bouncer_too {
                    continue;
                }
                let (mut cmd, dsn) = match variants.iter().find(|v| v.target == t) {
                    Some(v) => (v.app.command(&pgbench_bin), &intercepted_dsn),
                    None => (Command::new(&pgbench_bin), &bouncer_dsn),
                };
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let duration = if args.contains(&"-C") {
                    opts.duration
                } else {
                    many_duration
                };
                let sample = pgbench(&mut cmd, name, &args, 1, duration, dsn)?;
                eprintln!(
                    "bench: round {round} {name:<26} {:<16} {:>10.0} tps {:>8.3} ms",
                    t.label(),
                    sample.rate,
                    sample.latency_ms
                );
                results.entry((i, t)).or_default().push(sample);
            }
        }
    }
    let opened = variant.metrics.as_deref().map(|addr| {
        pgiam_tests::metric(
            &pgiam_tests::scrape(addr),
            "pgiam_pool_checkouts_total{outcome=\"opened\"}",
        )
    });
    let version = Command::new("/usr/sbin/pgbouncer")
        .arg("--version")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_default();
    println!(
        "\nTransaction pooling: {} clients at once, at most {TX_BACKENDS} server connections \
         ({version} in transaction mode, trust; pgiam `pool = \"transaction\"`, as deployed); \
         medians of {} rounds:\n",
        opts.many, opts.rounds
    );
    println!("| workload | pgbouncer tx tps | pgiam tx tps | pgiam/pgbouncer | pgiam tx -audit tps | -audit/pgbouncer | latency ms pgbouncer / pgiam |");
    println!("|---|---|---|---|---|---|---|");
    let med = |i: usize, t: Target, f: fn(&Sample) -> f64| {
        results
            .get(&(i, t))
            .map(|s| median(s.iter().map(f).collect()))
    };
    for (i, (name, _, _)) in runs.iter().enumerate() {
        let (b, p, n) = (
            med(i, Target::PgBouncerTransaction, |s| s.rate),
            med(i, Target::PgiamTransaction, |s| s.rate),
            med(i, Target::PgiamTransactionNoAudit, |s| s.rate),
        );
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let ratio = |a: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let lat = |t| med(i, t, |s| s.latency_ms).map_or("-".into(), |v| format!("{v:.3}"));
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} / {} |",
            fmt(b),
            fmt(p),
            ratio(p),
            fmt(n),
            ratio(n),
            lat(Target::PgBouncerTransaction),
            lat(Target::PgiamTransaction),
        );
    }
    if let Some(n) = opened {
        println!(
            "\npgiam tx opened {n:.0} server connections over all its runs (cap {TX_BACKENDS})."
        );
    }
    let log = variant.audit_path.clone();
    drop(variants);
    drop(bouncer);
    Ok(log
        .map(|p| vec![(Target::PgiamTransaction, p)])
        .unwrap_or_default())
}

/// `hold-connections N login|query DSN`: opens N sessions (with `query`, each does a round
/// trip, as an application's pool would when it validates a connection), prints "ready", and
/// holds them until stdin closes.
pub fn hold_connections(args: &[String]) -> anyhow::Result<()> {
    let [n, then, dsn] = args else {
        bail!("usage: hold-connections N login|query DSN");
    };
    let n: usize = n.parse()?;
    let query = match then.as_str() {
        "login" => false,
        "query" => true,
        other => bail!("hold-connections: {other:?} is neither login nor query"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // A few logins at a time: 10,000 one by one would take minutes.
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut opening = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = permits.clone().acquire_owned().await?;
            let dsn = dsn.clone();
            opening.spawn(async move {
                let _permit = permit;
                let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                    .await
                    .with_context(|| format!("session {} of {n}", i + 1))?;
                tokio::spawn(conn);
                if query {
                    client.simple_query("select 1").await?;
                }
                anyhow::Ok(client)
            });
        }
        let mut clients = Vec::with_capacity(n);
        while let Some(c) = opening.join_next().await {
            clients.push(c??);
        }
        println!("ready");
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
        })
        .await?;
        drop(clients);
        Ok(())
    })
}

/// Every client, PgBouncer and pgiam need a descriptor per connection; they inherit this limit.
fn raise_fd_limit(needed: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = (needed as u64).max(soft);
    if want > soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want))
            .with_context(|| format!("raising the open file limit to {want} (ulimit -n)"))?;
    }
    Ok(())
}
