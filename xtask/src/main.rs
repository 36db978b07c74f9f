//! `cargo xtask`: the project's own commands.
//!
//! - `install-deps`: the Debian packages pgiam's build, demo and tests need (only the missing ones)
//! - `demo`: a throwaway PostgreSQL, pgiam in front of it, and real psql sessions through it
//! - `test`: formatting, lints, and every test against real PostgreSQL clusters

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

mod bench;
mod demo;

/// Debian packages: PostgreSQL and its clients for the tests and demo, PgBouncer for the
/// benchmark, clang/llvm/libbpf for the eBPF programs and libclang (bindgen), python3 for the
/// tests' small socket clients.
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
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("install-deps") => install_deps(),
        Some("demo") => install_deps().and_then(|_| demo::run_demo()),
        Some("test") => install_deps().and_then(|_| test(&args[1..])),
        Some("build-ebpf") => build_ebpf(),
        Some("bench") => install_deps().and_then(|_| bench::run_bench(&args[1..])),
        // Used by the benchmark: runs inside a cgroup, holds N sessions idle.
        Some("hold-connections") => bench::hold_connections(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <install-deps | build-ebpf | demo | test [-- cargo test args] | bench [--short]>"
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
    if Command::new("apt-get").arg("--version").output().is_err() {
        eprintln!(
            "xtask: no apt-get here; make sure these are installed: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
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
