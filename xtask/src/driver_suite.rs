//! `cargo xtask driver-suite`: a driver's own test suite, run directly against a throwaway
//! PostgreSQL and then through pgiam with eBPF interception, and the outcomes compared test by
//! test.
//!
//! The suite is asyncpg's (psycopg's sdist ships no tests): the `tests/` directory of the pinned
//! asyncpg sdist, run with pytest against the asyncpg wheel `install-deps` put in
//! `target/drivers/venv`. asyncpg's harness uses an existing server when `PGHOST` is set, and
//! its connections then take host, port, user and password from `PGHOST`, `PGPORT`, `PGUSER` and
//! `PGPASSWORD`. Both runs get the same environment, dialling PostgreSQL's own address as the
//! superuser: the second from a cgroup whose connections the kernel sends to pgiam, which maps
//! that cgroup to the role `postgres` for every database under an allow-everything policy, and
//! logs in with the role's password from a file (the client's own password is ignored).
//!
//! pytest runs as the `postgres` OS user, as asyncpg's CI runs it as a user of its own: the
//! tests that start clusters of their own (initdb) refuse root. Each run has a cgroup, so
//! whatever it leaves behind (those clusters) is killed with it. Everything lands in
//! `target/drivers/asyncpg-suite/`: the report (`report.md`), the per-test outcomes
//! (`direct.tsv`, `pgiam.tsv`), pytest's output and JUnit XML, and pgiam's and PostgreSQL's
//! logs.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgiam_tests::{free_port, pg_bin_dir, write_file, PgCluster, PgOptions, Pgiam, TestCgroup};

use crate::{cargo, run, workspace_root};

const ASYNCPG_VERSION: &str = "0.32.0";
/// sha256 of `asyncpg-0.32.0.tar.gz` as PyPI serves it (`pip download asyncpg==0.32.0
/// --no-binary :all: --no-deps`).
const SDIST_SHA256: &str = "45e64e56714d888330b884aad1dfb363d0bf43fb343e3d1a8968525f3bade478";
/// What the suite needs beyond asyncpg (its `test` dependency group, less the linters, Kerberos
/// and uvloop, whose tests skip without them), with pytest's own dependencies, all pinned.
const TEST_REQUIREMENTS: &[&str] = &[
    "pytest==8.4.2",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "packaging==26.4",
    "Pygments==2.21.0",
    "pytest-timeout==2.4.0",
    "distro==1.9.0",
];
const TEST_TIMEOUT_SECS: u64 = 60;
/// The bound on one whole run of the suite (directly it takes about a minute).
const RUN_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// A test listed as slower through pgiam: this many times its direct time, and over this many
/// seconds (a cancel that did not take effect lets a `pg_sleep` run to its end).
const SLOWER_FACTOR: f64 = 5.0;
const SLOWER_SECS: f64 = 5.0;
/// The OS user pytest runs as.
const CLIENT_USER: &str = "postgres";

/// asyncpg's pytest options (from its pyproject.toml), output captured per test.
const PYTEST_INI: &str = "\
[pytest]
addopts = --assert=plain --strict-markers --tb=native --import-mode=importlib -p no:cacheprovider
testpaths = tests
filterwarnings = default
junit_family = xunit2
";

/// Reads pytest's JUnit XML: one line per test, `outcome TAB test TAB seconds TAB the reason's
/// first line`.
const JUNIT_TO_TSV: &str = r#"
import sys, xml.etree.ElementTree as ET
rank = {"failure": (3, "failed"), "error": (2, "error"), "skipped": (1, "skipped")}
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    cls = tc.get("classname", "")
    if cls.startswith("tests."):
        cls = cls[len("tests."):]
    best, outcome, msg = 0, "passed", ""
    for ch in tc:
        r, o = rank.get(ch.tag, (0, ""))
        if r > best:
            best, outcome = r, o
            text = ch.get("message") or ch.text or ""
            lines = [l.strip() for l in text.splitlines() if l.strip()]
            # A first line that only announces what follows takes the next ones along.
            n = 1
            while n < len(lines) and lines[n - 1].endswith(":") and n < 6:
                n += 1
            msg = " ".join(lines[:n])
    msg = msg.replace("\t", " ")[:240]
    print(f"{outcome}\t{cls}::{tc.get('name')}\t{tc.get('time', '0')}\t{msg}")
"#;

fn suite_dir() -> PathBuf {
    workspace_root().join("target/drivers/asyncpg-suite")
}

fn venv(program: &str) -> PathBuf {
    workspace_root()
        .join("target/drivers/venv/bin")
        .join(program)
}

fn sha256(file: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", file.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The sdist's `tests/` in the suite directory and the test requirements in the venv, unless
/// the marker says exactly these are there; then checks that asyncpg is the installed wheel.
fn prepare_suite() -> anyhow::Result<()> {
    let dir = suite_dir();
    let marker = dir.join("prepared");
    let want = format!(
        "asyncpg {ASYNCPG_VERSION} sdist sha256 {SDIST_SHA256}\n{}\n",
        TEST_REQUIREMENTS.join(" ")
    );
    if !(std::fs::read_to_string(&marker).is_ok_and(|m| m == want)
        && dir.join("tests/__init__.py").exists())
    {
        let _ = std::fs::remove_file(&marker);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let sdist = dir.join(format!("asyncpg-{ASYNCPG_VERSION}.tar.gz"));
        if !sdist.exists() || sha256(&sdist)? != SDIST_SHA256 {
            let _ = std::fs::remove_file(&sdist);
            eprintln!("driver-suite: downloading the asyncpg {ASYNCPG_VERSION} sdist");
            run(Command::new(venv("pip"))
                .args(["download", "--quiet", "--disable-pip-version-check"])
                .args(["--no-input", "--no-deps", "--no-binary", ":all:", "--dest"])
                .arg(&dir)
                .arg(format!("asyncpg=={ASYNCPG_VERSION}")))
            .context("pip download the asyncpg sdist")?;
        }
        let got = sha256(&sdist)?;
        if got != SDIST_SHA256 {
            let _ = std::fs::remove_file(&sdist);
            bail!(
                "{}: sha256 {got}, expected {SDIST_SHA256}; removed",
                sdist.display()
            );
        }
        let _ = std::fs::remove_dir_all(dir.join("tests"));
        run(Command::new("tar")
            .args(["-xzf"])
            .arg(&sdist)
            .arg("-C")
            .arg(&dir)
            .args([
                "--strip-components=1",
                "--no-same-owner",
                &format!("asyncpg-{ASYNCPG_VERSION}/tests"),
            ]))
        .context("unpacking the sdist's tests/")?;
        // pytest runs as another user: it reads the tests and writes nothing here.
        run(Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(dir.join("tests")))?;
        eprintln!(
            "driver-suite: installing {} into the drivers' venv",
            TEST_REQUIREMENTS.join(" ")
        );
        run(Command::new(venv("pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(TEST_REQUIREMENTS))
        .context("pip install the test requirements")?;
        write_file(&dir, "pytest.ini", PYTEST_INI, 0o644);
        std::fs::write(&marker, want).with_context(|| format!("writing {}", marker.display()))?;
    }
    // The tests import `asyncpg` from the venv's wheel, never from the sdist.
    let out = Command::new(venv("python"))
        .args([
            "-c",
            "import asyncpg; print(asyncpg.__version__); print(asyncpg.__file__)",
        ])
        .current_dir(&dir)
        .output()
        .context("importing asyncpg")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (version, file) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    if version != ASYNCPG_VERSION || !file.contains("/site-packages/asyncpg/") {
        bail!(
            "asyncpg in the venv is {version:?} from {file:?}, expected the {ASYNCPG_VERSION} \
             wheel: run `cargo xtask install-deps`{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Outcome {
    Passed,
    Failed,
    Error,
    Skipped,
}

impl Outcome {
    fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "passed" => Outcome::Passed,
            "failed" => Outcome::Failed,
            "error" => Outcome::Error,
            "skipped" => Outcome::Skipped,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
        }
    }
}

struct TestResult {
    outcome: Outcome,
    seconds: f64,
    /// The first line of the reason (failure, error or skip).
    reason: String,
}

/// One run's outcomes, by test.
struct RunResult {
    tests: BTreeMap<String, TestResult>,
    elapsed: Duration,
}

impl RunResult {
    fn count(&self, o: Outcome) -> usize {
        self.tests.values().filter(|t| t.outcome == o).count()
    }
}

/// Kills every process left in `cg` (the clusters asyncpg's tests start, a pytest past its
/// bound): `cgroup.kill`, or each pid in `cgroup.procs` on kernels before 5.14.
fn kill_cgroup(cg: &TestCgroup) {
    if std::fs::write(cg.dir.join("cgroup.kill"), "1").is_err() {
        for pid in std::fs::read_to_string(cg.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for _ in 0..250 {
        if std::fs::read_to_string(cg.dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Options {
    /// `PGSSLMODE` for both runs; unset, asyncpg's default (`prefer`) applies.
    sslmode: Option<String>,
    /// Instead of the whole suite (pytest's own syntax: paths, `-k EXPR`, …).
    pytest_args: Vec<String>,
}

fn parse_options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        sslmode: None,
        pytest_args: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sslmode" => o.sslmode = Some(it.next().context("--sslmode needs a value")?.clone()),
            "--" => o.pytest_args.extend(it.by_ref().cloned()),
            other => bail!(
                "unknown option {other}; options: --sslmode MODE, -- PYTEST ARGS (e.g. -- -k executemany)"
            ),
        }
    }
    Ok(o)
}

/// Runs the suite in `cg` with asyncpg's harness pointed at `127.0.0.1:pg_port`; `name` names
/// its files in the suite directory.
fn run_pytest(
    name: &str,
    cg: &TestCgroup,
    pg: &PgCluster,
    work: &Path,
    opts: &Options,
) -> anyhow::Result<RunResult> {
    let dir = suite_dir();
    // A home, a TMPDIR (the tests' own clusters live there) and the JUnit file, all the
    // client user's.
    let run_dir = work.join(name);
    let (home, tmp) = (run_dir.join("home"), run_dir.join("tmp"));
    let junit = run_dir.join("junit.xml");
    let u = nix::unistd::User::from_name(CLIENT_USER)?.context("no postgres OS user")?;
    for d in [&run_dir, &home, &tmp] {
        std::fs::create_dir_all(d)?;
        nix::unistd::chown(d, Some(u.uid), Some(u.gid))?;
    }
    let out_path = dir.join(format!("{name}.out"));
    let out = std::fs::File::create(&out_path)?;
    let mut cmd = cg.command_as(venv("python"), CLIENT_USER);
    for var in [
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGSSLNEGOTIATION",
        "PGDATABASE",
        "PGOPTIONS",
        "PGTARGETSESSIONATTRS",
        "PGCONNECT_TIMEOUT",
        "USE_UVLOOP",
        "PYTHONPATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(["-m", "pytest", "-c"])
        .arg(dir.join("pytest.ini"))
        .arg("--rootdir")
        .arg(&dir)
        .arg(format!("--timeout={TEST_TIMEOUT_SECS}"))
        .arg(format!("--junitxml={}", junit.display()))
        .args(["-q", "-rfE"])
        .args(&opts.pytest_args)
        .current_dir(&dir)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", &pg.superuser_password)
        // For the tests that start clusters of their own.
        .env("PGINSTALLATION", pg_bin_dir())
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(opts.sslmode.as_ref().map(|m| ("PGSSLMODE", m)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    eprintln!(
        "driver-suite: {name}: pytest (output in {})",
        out_path.display()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting pytest")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if started.elapsed() > RUN_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = started.elapsed();
    kill_cgroup(cg);
    let _ = child.wait();
    let Some(status) = status else {
        bail!(
            "{name}: the suite ran longer than {} minutes and was killed; see {}",
            RUN_TIMEOUT.as_secs() / 60,
            out_path.display()
        );
    };
    // 0: all passed, 1: some failed; anything else is pytest itself failing.
    if !matches!(status.code(), Some(0 | 1)) || !junit.exists() {
        bail!(
            "{name}: pytest failed ({status}); see {}",
            out_path.display()
        );
    }
    std::fs::copy(&junit, dir.join(format!("{name}.junit.xml")))?;
    let tsv = Command::new(venv("python"))
        .args(["-c", JUNIT_TO_TSV])
        .arg(&junit)
        .output()
        .context("reading the JUnit XML")?;
    if !tsv.status.success() {
        bail!(
            "reading {}: {}",
            junit.display(),
            String::from_utf8_lossy(&tsv.stderr)
        );
    }
    let text = String::from_utf8_lossy(&tsv.stdout).into_owned();
    std::fs::write(dir.join(format!("{name}.tsv")), &text)?;
    let mut tests = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.splitn(4, '\t');
        let (Some(outcome), Some(name), Some(seconds)) = (
            f.next().and_then(Outcome::parse),
            f.next(),
            f.next().and_then(|s| s.parse().ok()),
        ) else {
            bail!("unexpected line from the JUnit reader: {line:?}");
        };
        let reason = f.next().unwrap_or("").to_owned();
        tests.insert(
            name.to_owned(),
            TestResult {
                outcome,
                seconds,
                reason,
            },
        );
    }
    if tests.is_empty() {
        bail!("{name}: pytest ran no tests; see {}", out_path.display());
    }
    Ok(RunResult { tests, elapsed })
}

/// Everything the command starts, stopped and removed in order on drop, also on failure.
struct Setup {
    pgiam: Option<Pgiam>,
    config_path: Option<PathBuf>,
    /// Declared children first: fields drop in this order.
    app: TestCgroup,
    proxy: TestCgroup,
    intercepted: TestCgroup,
    direct: TestCgroup,
    _root: TestCgroup,
    pg: PgCluster,
    work: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut p) = self.pgiam.take() {
            p.stop();
            let _ = std::fs::copy(&p.log_path, suite_dir().join("pgiam.log"));
        }
        let _ = std::fs::copy(&self.pg.log_path, suite_dir().join("postgresql.log"));
        // Pins keep the programs attached after pgiam exits: remove them before the cgroups.
        if let Some(config) = &self.config_path {
            let ok = Command::new(workspace_root().join("target/debug/pgiam"))
                .args(["uninstall-bpf", "--config"])
                .arg(config)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                eprintln!("warning: uninstall-bpf failed for {}", config.display());
            }
        }
        for cg in [&self.app, &self.proxy, &self.direct] {
            kill_cgroup(cg);
        }
    }
}

fn start_pgiam(setup: &mut Setup) -> anyhow::Result<()> {
    let work = setup.work.path();
    let pw = write_file(
        work,
        "postgres.password",
        &setup.pg.superuser_password,
        0o600,
    );
    let policy = write_file(
        work,
        "policy.cedar",
        "permit(principal, action, resource);\n",
        0o644,
    );
    let port = free_port();
    let bpffs = format!(
        "/sys/fs/bpf/{}",
        setup
            .intercepted
            .path
            .trim_start_matches('/')
            .replace('/', "-")
    );
    let config = format!(
        "state_dir = \"{work}/state\"\n\
         [listen]\ntcp = \"127.0.0.1:{port}\"\n\
         [upstream]\nhost = \"127.0.0.1\"\nport = {pg_port}\n\
         [policy]\nfile = \"{policy}\"\n\
         [roles.postgres]\npassword_file = \"{pw}\"\n\
         [[mapping]]\nprincipal = \"cgroup:{app}\"\ndatabase = \"*\"\nrole = \"postgres\"\n\
         [interception]\ncgroup = \"{cg}\"\nendpoints = [\"127.0.0.1\"]\nports = [{pg_port}]\n\
         bpffs_dir = \"{bpffs}\"\n\
         [audit]\npath = \"{work}/audit.jsonl\"\n",
        work = work.display(),
        pg_port = setup.pg.port,
        policy = policy.display(),
        pw = pw.display(),
        app = setup.app.path,
        cg = setup.intercepted.path,
    );
    // Written before pgiam starts, so the pins are removed even if it fails half-way.
    setup.config_path = Some(write_file(work, "pgiam.toml", &config, 0o600));
    setup.pgiam = Some(Pgiam::start_in(
        workspace_root().join("target/debug/pgiam"),
        &config,
        format!("127.0.0.1:{port}").parse()?,
        Some(&setup.proxy),
    )?);
    Ok(())
}

pub fn run_driver_suite(args: &[String]) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the driver suite runs through pgiam with eBPF interception: run it as root");
    }
    let opts = parse_options(args)?;
    prepare_suite()?;
    run(cargo().args(["build", "--bin", "pgiam"]))?;
    let started = Instant::now();

    let pg = PgCluster::start(PgOptions {
        // As asyncpg's harness sets it in the clusters it starts: JIT upsets timing tests.
        extra_conf: vec!["jit = off".into()],
        ..PgOptions::default()
    })?;
    let server_version = pg.psql("SHOW server_version")?;
    let root = TestCgroup::new("pgiam-suite");
    let intercepted = root.child("intercepted");
    let mut setup = Setup {
        pgiam: None,
        config_path: None,
        app: intercepted.child("app"),
        proxy: intercepted.child("pgiam"),
        intercepted,
        direct: root.child("direct"),
        _root: root,
        pg,
        work: tempfile::Builder::new().prefix("pgiam-suite-").tempdir()?,
    };
    std::fs::set_permissions(
        setup.work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;

    eprintln!("driver-suite: asyncpg {ASYNCPG_VERSION}'s tests, directly");
    let direct = run_pytest("direct", &setup.direct, &setup.pg, setup.work.path(), &opts)?;
    eprintln!("driver-suite: through pgiam (eBPF interception)");
    start_pgiam(&mut setup)?;
    let through = run_pytest("pgiam", &setup.app, &setup.pg, setup.work.path(), &opts)?;
    let pgiam_log = setup.pgiam.as_ref().map(Pgiam::log).unwrap_or_default();
    let sessions = pgiam_log.matches("session established").count();
    drop(setup);
    if sessions == 0 {
        bail!("no session went through pgiam: interception did not take the suite's connections");
    }

    let report = report(&direct, &through, &server_version, sessions, &opts);
    print!("\n{report}");
    let path = suite_dir().join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "driver-suite: done in {:.0} s; {} (pgiam.log, postgresql.log, *.tsv, *.out beside it)",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

fn report(
    direct: &RunResult,
    through: &RunResult,
    server_version: &str,
    sessions: usize,
    opts: &Options,
) -> String {
    use std::fmt::Write;
    let mut r = String::new();
    let _ = writeln!(
        r,
        "asyncpg {ASYNCPG_VERSION}'s own test suite (the sdist's tests/, against the wheel), \
         PostgreSQL {server_version}, {}, {TEST_TIMEOUT_SECS} s per test, sslmode {}{}; \
         through pgiam: eBPF interception, {sessions} sessions.\n",
        TEST_REQUIREMENTS[0].replace("==", " "),
        opts.sslmode
            .as_deref()
            .unwrap_or("prefer (asyncpg's default)"),
        if opts.pytest_args.is_empty() {
            String::new()
        } else {
            format!(", pytest {}", opts.pytest_args.join(" "))
        },
    );
    let _ = writeln!(r, "| run | passed | failed | errors | skipped | time |");
    let _ = writeln!(r, "|---|---|---|---|---|---|");
    for (label, res) in [("direct", direct), ("through pgiam", through)] {
        let _ = writeln!(
            r,
            "| {label} | {} | {} | {} | {} | {:.0} s |",
            res.count(Outcome::Passed),
            res.count(Outcome::Failed),
            res.count(Outcome::Error),
            res.count(Outcome::Skipped),
            res.elapsed.as_secs_f64()
        );
    }
    let names: std::collections::BTreeSet<&String> =
        direct.tests.keys().chain(through.tests.keys()).collect();
    let mut worse = Vec::new();
    let mut better = Vec::new();
    let mut slower = Vec::new();
    let mut one_run_only = Vec::new();
    for name in names {
        let (Some(d), Some(p)) = (direct.tests.get(name), through.tests.get(name)) else {
            one_run_only.push(name);
            continue;
        };
        if d.outcome == Outcome::Passed && p.outcome != Outcome::Passed {
            worse.push((name, p));
        } else if p.outcome == Outcome::Passed && d.outcome != Outcome::Passed {
            better.push((name, d));
        } else if d.outcome == p.outcome
            && p.seconds > SLOWER_SECS
            && p.seconds > SLOWER_FACTOR * d.seconds
        {
            slower.push((name, d.seconds, p.seconds));
        }
    }
    let header = |n: usize| if n == 0 { "\n" } else { ":\n" };
    let _ = writeln!(
        r,
        "\nPass directly, not through pgiam ({}){}",
        worse.len(),
        header(worse.len())
    );
    for (name, t) in &worse {
        let _ = writeln!(r, "- `{name}`: {} — {}", t.outcome.label(), t.reason);
    }
    let _ = writeln!(
        r,
        "\nPass through pgiam, not directly ({}){}",
        better.len(),
        header(better.len())
    );
    for (name, t) in &better {
        let _ = writeln!(
            r,
            "- `{name}`: {} directly — {}",
            t.outcome.label(),
            t.reason
        );
    }
    let _ = writeln!(
        r,
        "\nSame outcome, over {SLOWER_FACTOR}x slower through pgiam and over {SLOWER_SECS} s ({}){}",
        slower.len(),
        header(slower.len())
    );
    for (name, d, p) in &slower {
        let _ = writeln!(r, "- `{name}`: {d:.2} s directly, {p:.2} s through pgiam");
    }
    if !one_run_only.is_empty() {
        let _ = writeln!(r, "\nRan in one run only ({}):\n", one_run_only.len());
        for name in one_run_only {
            let _ = writeln!(r, "- `{name}`");
        }
    }
    r
}
