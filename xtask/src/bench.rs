//! `cargo xtask bench`: pgbench against direct PostgreSQL, PgBouncer (session mode) and pgiam
//! as deployed (eBPF interception, audit `always`), interleaved round by round so drift hits all
//! alike; medians and ratios. pgiam also runs without the sk_msg fast path and without audit, so
//! each feature's cost shows. Every pgiam variant has a cgroup of its own, so no restarts happen
//! between measurements.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use pgiam_tests::{free_port, pg_bin_dir, write_file, PgCluster, PgOptions, Pgiam, TestCgroup};

use crate::{run, workspace_root};

struct Workload {
    name: &'static str,
    args: &'static [&'static str],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "select prepared c1",
        args: &["-S", "-M", "prepared", "-c", "1"],
    },
    Workload {
        name: "select prepared c16",
        args: &["-S", "-M", "prepared", "-c", "16", "-j", "2"],
    },
    Workload {
        name: "select simple c16",
        args: &["-S", "-M", "simple", "-c", "16", "-j", "2"],
    },
    Workload {
        name: "select extended c16",
        args: &["-S", "-M", "extended", "-c", "16", "-j", "2"],
    },
    Workload {
        name: "tpcb prepared c16",
        args: &["-M", "prepared", "-c", "16", "-j", "2"],
    },
    Workload {
        name: "connect churn c8",
        args: &["-S", "-C", "-c", "8", "-j", "2"],
    },
];

/// Where a pgbench run is pointed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    PgBouncer,
    Pgiam,
    PgiamNoFastPath,
    PgiamNoAudit,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::PgBouncer => "pgbouncer",
            Target::Pgiam => "pgiam",
            Target::PgiamNoFastPath => "pgiam -fastpath",
            Target::PgiamNoAudit => "pgiam -audit",
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
    workloads: Vec<&'static Workload>,
    /// Variants (no fast path, no audit) for every workload, or only the first two.
    all_variants: bool,
    /// Also the per-statement classification and authorization benchmark.
    classify: bool,
}

fn parse_options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        idle: 10_000,
        held: 250,
        duration: 10,
        rounds: 3,
        scale: 10,
        workloads: WORKLOADS.iter().collect(),
        all_variants: true,
        classify: true,
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
                o.all_variants = false;
                o.classify = false;
            }
            "--duration" => o.duration = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--scale" => o.scale = value()?.parse()?,
            "--idle" => o.idle = value()?.parse()?,
            "--held" => o.held = value()?.parse()?,
            "--workloads" => {
                let wanted = value()?;
                o.workloads = WORKLOADS
                    .iter()
                    .filter(|w| wanted.split(',').any(|n| w.name.contains(n.trim())))
                    .collect();
                if o.workloads.is_empty() {
                    bail!("no workload matches {wanted:?}");
                }
            }
            other => bail!(
                "unknown option {other}; options: --short, --duration SECS, --rounds N, --scale N, --idle N, --held N, --workloads NAME[,NAME]"
            ),
        }
    }
    if o.rounds < 3 {
        bail!("at least 3 rounds: a median of fewer says little");
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
    fn start(
        pg_port: u16,
        user: &str,
        password: &str,
        pool_size: usize,
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
             auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\npool_mode = session\n\
             max_client_conn = 100000\ndefault_pool_size = {pool_size}\nlogfile = {dir}/pgbouncer.log\n\
             ignore_startup_parameters = extra_float_digits\n",
            dir = dir.path().display()
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

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One pgiam with interception over its own cgroup subtree.
struct PgiamVariant {
    target: Target,
    pgiam: Option<Pgiam>,
    config_path: PathBuf,
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
/// session's transactions.
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
    let audit = if target == Target::PgiamNoAudit {
        String::new()
    } else {
        format!(
            "[audit]\npath = \"{}/{name}-audit.jsonl\"\ndurability = \"always\"\n",
            dir.display()
        )
    };
    let policy = write_file(dir, "bench-policy.cedar", BENCH_POLICY, 0o644);
    // `connect = "deferred"`: logins are answered without a server connection, as PgBouncer
    // answers them, so idle clients and connection churn compare like with like (the default,
    // `at-login`, opens a backend per client as direct PostgreSQL does).
    let config = format!(
        "state_dir = \"{dir}/state\"\n[listen]\ntcp = \"127.0.0.1:{port}\"\n\
         [upstream]\nhost = \"127.0.0.1\"\nport = {pg_port}\nconnect = \"deferred\"\n\
         [policy]\nfile = \"{policy}\"\n\
         [roles.bench]\npassword_file = \"{pw}\"\n\
         [[mapping]]\nprincipal = \"cgroup:{app}\"\ndatabase = \"app\"\nrole = \"bench\"\n\
         [interception]\ncgroup = \"{cg}\"\nendpoints = [\"127.0.0.1\"]\nports = [{pg_port}]\n\
         fast_path = {fast}\nbpffs_dir = \"/sys/fs/bpf/{bpffs}\"\n{audit}",
        dir = dir.display(),
        policy = policy.display(),
        pw = password_file.display(),
        app = app.path,
        cg = cg.path,
        fast = target != Target::PgiamNoFastPath,
        bpffs = cg.path.trim_start_matches('/').replace('/', "-"),
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
        app,
        _proxy: proxy,
        _cgroup: cg,
    })
}

#[derive(Default, Clone, Copy)]
struct Sample {
    tps: f64,
    latency_ms: f64,
}

fn pgbench(
    cmd: &mut Command,
    workload: &Workload,
    duration: u32,
    dsn: &str,
) -> anyhow::Result<Sample> {
    cmd.args(["-n", "-T", &duration.to_string()])
        .args(workload.args)
        .arg(dsn);
    let out = cmd.output().context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("number of failed transactions: 0 ") {
        bail!(
            "pgbench {} failed:\n{text}{}",
            workload.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |prefix: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {prefix:?} in pgbench output:\n{text}"))
    };
    Ok(Sample {
        tps: field("tps = ")?,
        latency_ms: field("latency average = ")?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    pg.psql_db("app", "GRANT ALL ON ALL TABLES IN SCHEMA public TO bench")?;

    let dir = tempfile::Builder::new().prefix("pgiam-bench-").tempdir()?;
    let pw = write_file(dir.path(), "bench.password", &password, 0o600);
    raise_fd_limit(opts.idle + 2 * opts.held + 1024)?;
    let bouncer = PgBouncer::start(pg.port, "bench", &password, 2 * opts.held + 32)?;
    let root = TestCgroup::new("pgiam-bench");
    let mut variants = vec![start_variant(
        Target::Pgiam,
        &root,
        pg.port,
        dir.path(),
        &pw,
    )?];
    variants.push(start_variant(
        Target::PgiamNoFastPath,
        &root,
        pg.port,
        dir.path(),
        &pw,
    )?);
    variants.push(start_variant(
        Target::PgiamNoAudit,
        &root,
        pg.port,
        dir.path(),
        &pw,
    )?);

    let direct_dsn = format!("host=127.0.0.1 port={} dbname=app user=bench", pg.port);
    let bouncer_dsn = format!("host=127.0.0.1 port={} dbname=app user=bench", bouncer.port);
    // The application's DSN, unchanged: the kernel sends it through pgiam.
    let intercepted_dsn = format!(
        "host=127.0.0.1 port={} dbname=app user=bench sslmode=disable",
        pg.port
    );
    let pgbench_bin = pg_bin_dir().join("pgbench");

    let mut results: BTreeMap<(usize, Target), Vec<Sample>> = BTreeMap::new();
    for round in 1..=opts.rounds {
        for (wi, w) in opts.workloads.iter().enumerate() {
            let mut targets = vec![Target::Direct, Target::PgBouncer, Target::Pgiam];
            if opts.all_variants || wi < 2 {
                targets.extend([Target::PgiamNoFastPath, Target::PgiamNoAudit]);
            }
            for t in targets {
                let sample = match t {
                    Target::Direct | Target::PgBouncer => {
                        let dsn = if t == Target::Direct {
                            &direct_dsn
                        } else {
                            &bouncer_dsn
                        };
                        let mut cmd = Command::new(&pgbench_bin);
                        cmd.env("PGPASSWORD", &password);
                        pgbench(&mut cmd, w, opts.duration, dsn)?
                    }
                    _ => {
                        let v = variants.iter().find(|v| v.target == t).expect("variant");
                        pgbench(
                            &mut v.app.command(&pgbench_bin),
                            w,
                            opts.duration,
                            &intercepted_dsn,
                        )?
                    }
                };
                eprintln!(
                    "bench: round {round} {:<22} {:<16} {:>10.0} tps {:>8.3} ms",
                    w.name,
                    t.label(),
                    sample.tps,
                    sample.latency_ms
                );
                results.entry((wi, t)).or_default().push(sample);
            }
        }
    }

    // Memory: pgiam and PgBouncer with idle sessions held open.
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
    println!(
        "\n| workload | direct tps | pgbouncer tps | pgiam tps | pgiam/direct | pgiam/pgbouncer | pgiam -fastpath tps | pgiam -audit tps | latency ms direct / pgbouncer / pgiam |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (wi, w) in opts.workloads.iter().enumerate() {
        let tps = |t| {
            results
                .get(&(wi, t))
                .map(|s| median(s.iter().map(|x| x.tps).collect()))
        };
        let lat = |t| {
            results
                .get(&(wi, t))
                .map(|s| median(s.iter().map(|x| x.latency_ms).collect()))
        };
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let (d, b, p) = (
            tps(Target::Direct),
            tps(Target::PgBouncer),
            tps(Target::Pgiam),
        );
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {:.3} / {:.3} / {:.3} |",
            w.name,
            fmt(d),
            fmt(b),
            fmt(p),
            p.unwrap_or(0.0) / d.unwrap_or(1.0),
            p.unwrap_or(0.0) / b.unwrap_or(1.0),
            fmt(tps(Target::PgiamNoFastPath)),
            fmt(tps(Target::PgiamNoAudit)),
            lat(Target::Direct).unwrap_or(0.0),
            lat(Target::PgBouncer).unwrap_or(0.0),
            lat(Target::Pgiam).unwrap_or(0.0),
        );
    }
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
        // Let allocators settle before reading.
        std::thread::sleep(std::time::Duration::from_millis(500));
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
        let before = rss_kib(pid);
        let holder = hold(make, dsn, opts.idle, "login")?;
        let during = rss_kib(pid);
        release(vec![holder])?;
        anyhow::Ok((before, during))
    };
    // Sessions after a round trip. Two batches, the first still held while the second opens:
    // the second batch's growth is the marginal cost of a session, not of refilling a heap
    // that earlier workloads left with free space.
    let held_sessions = |pid: u32, make: &dyn Fn() -> Command, dsn: &str| {
        let first = hold(make, dsn, opts.held, "query")?;
        let before = rss_kib(pid);
        let second = hold(make, dsn, opts.held, "query")?;
        let during = rss_kib(pid);
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
    drop(variants);
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
