//! `cargo xtask`: the project's own commands.
//!
//! - `install-deps`: the Debian packages pgiam's build, demo and tests need (only the missing ones),
//!   and the database drivers the tests run, pinned, in `target/drivers/`
//! - `demo`: a throwaway PostgreSQL, pgiam in front of it, and real psql sessions through it
//! - `test`: formatting, lints, and every test against real PostgreSQL clusters
//! - `driver-suite`: asyncpg's own test suite, directly and through pgiam, compared test by test
//! - `package`: a Debian package of pgiam (`target/debian/pgiam_VERSION_ARCH.deb`)
//! - `fuzz --minutes N`: the property tests of the decoders and the classifier, for N minutes

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

mod bench;
mod demo;
mod driver_suite;
mod fuzz;
mod package;

/// Debian packages: PostgreSQL and its clients for the tests and demo, PgBouncer for the
/// benchmark, clang/llvm/libbpf for the eBPF programs and libclang (bindgen), python3 for the
/// tests' small socket clients; for the driver tests (tests/drivers/): python3-venv, Node.js,
/// a JDK (single-file source programs) and pgJDBC (/usr/share/java/postgresql.jar).
const PACKAGES: &[&str] = &[
    "postgresql",
    "postgresql-contrib",
    "pgbouncer",
    "clang-19",
    "llvm-19",
    "libbpf-dev",
    "bpftool",
    "iproute2",
    "procps",
    "python3",
    "python3-venv",
    "nodejs",
    "openjdk-17-jdk-headless",
    "libpostgresql-jdbc-java",
];

/// The drivers the tests run as applications would, pinned: into a Python venv at
/// `target/drivers/venv` and an npm prefix at `target/drivers/node`.
const PIP_DRIVERS: &[&str] = &["psycopg[binary]==3.3.9", "asyncpg==0.32.0"];
/// pg: the node-postgres driver; oidc-provider and otpauth: the OpenID provider (with TOTP) the
/// people tests and the demo log in with (`tests/idp/`).
const NPM_DRIVERS: &[&str] = &["pg@8.23.1", "oidc-provider@8.8.1", "otpauth@9.5.2"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("install-deps") => install_deps(),
        Some("demo") => install_deps().and_then(|_| demo::run_demo()),
        Some("test") => install_deps().and_then(|_| test(&args[1..])),
        Some("build-ebpf") => build_ebpf(),
        Some("bench") => install_deps().and_then(|_| bench::run_bench(&args[1..])),
        Some("driver-suite") => {
            install_deps().and_then(|_| driver_suite::run_driver_suite(&args[1..]))
        }
        // Used by the benchmark: runs inside a cgroup, holds N sessions idle.
        Some("hold-connections") => bench::hold_connections(&args[1..]),
        Some("package") => package::run_package(&args[1..]),
        Some("fuzz") => fuzz::run_fuzz(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <install-deps | build-ebpf | demo | test [-- cargo test args] | bench [--short] | driver-suite [--sslmode MODE] [-- pytest args] | package [--binary PATH] [--out DIR] | fuzz [--minutes N]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_owned()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_deps() -> anyhow::Result<()> {
    install_packages()?;
    install_drivers()
}

fn install_packages() -> anyhow::Result<()> {
    if Command::new("apt-get").arg("--version").output().is_err() {
        eprintln!(
            "xtask: no apt-get here; make sure these are installed: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    // Debian's nodejs comes without npm; NodeSource's (and others') bring their own, which
    // Debian's npm package would conflict with: only when there is no npm at all.
    if Command::new("npm").arg("--version").output().is_err() {
        missing.push("npm");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing Debian packages: {}; install them as root (sudo apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

/// The pinned drivers in `target/drivers/`, unless its marker says exactly these are there.
fn install_drivers() -> anyhow::Result<()> {
    let dir = workspace_root().join("target/drivers");
    let marker = dir.join("installed");
    let pins = format!("{}\n{}\n", PIP_DRIVERS.join(" "), NPM_DRIVERS.join(" "));
    let python = dir.join("venv/bin/python");
    let pg_js = dir.join("node/node_modules/pg/package.json");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == pins)
        && python.exists()
        && pg_js.exists()
    {
        return Ok(());
    }
    let _ = std::fs::remove_file(&marker);
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    eprintln!(
        "xtask: installing {} {} into {}",
        PIP_DRIVERS.join(" "),
        NPM_DRIVERS.join(" "),
        dir.display()
    );
    // The system's Python (Debian's, with python3-venv), not whichever a user's PATH prefers.
    let system_python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    if !python.exists() {
        // A venv whose interpreter is gone (Python upgraded) is made anew.
        let _ = std::fs::remove_dir_all(dir.join("venv"));
        run(Command::new(system_python)
            .args(["-m", "venv"])
            .arg(dir.join("venv")))
        .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
    }
    run(Command::new(dir.join("venv/bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(PIP_DRIVERS))
    .context("pip install the Python drivers")?;
    run(Command::new("npm")
        .args(["install", "--prefix"])
        .arg(dir.join("node"))
        .args(["--save-exact", "--no-audit", "--no-fund", "--silent"])
        .args(NPM_DRIVERS))
    .context("npm install the Node.js driver")?;
    std::fs::write(&marker, pins).with_context(|| format!("writing {}", marker.display()))?;
    Ok(())
}

/// Compiles the eBPF object into target/bpf with the same function the build script uses.
fn build_ebpf() -> anyhow::Result<()> {
    let out = workspace_root().join("target/bpf");
    let obj = pgiam_common::build::build_ebpf(&out).map_err(anyhow::Error::msg)?;
    println!("{}", obj.display());
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("cargo fmt: run `cargo fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("cargo clippy")?;
    run(cargo().args(["build", "--bin", "pgiam"]))?;
    let bin = workspace_root().join("target/debug/pgiam");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).env("PGIAM_BIN", &bin);
    if !extra.is_empty() {
        cmd.args(extra);
    }
    run(&mut cmd)
}
