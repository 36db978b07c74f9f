//! The Debian package (`cargo xtask package`): dpkg installs it, its files are where it says, the
//! example configuration it ships passes `pgiam check-config`, and a purge leaves none of its
//! files behind. It installs system-wide (root, dpkg), so it refuses to run where a pgiam
//! package or any file of the package already exists, and purges what it installed even when
//! an assertion fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgiam_tests::{pgiam_bin, workspace_root};

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn succeed(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg's state of the `pgiam` package: None when dpkg knows no such package, or knows it only
/// as not installed (a purged package can leave that record).
fn package_status() -> Option<String> {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "pgiam"]));
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && status != "not-installed").then_some(status)
}

/// Purges the package on drop, so a failed assertion leaves the host as it was.
struct Installed {
    purged: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = Command::new("dpkg").args(["--purge", "pgiam"]).status();
        }
    }
}

/// Paths in a .deb (`dpkg-deb -c`), as installed: (regular files, directories).
fn contents(deb: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let listing = succeed(Command::new("dpkg-deb").arg("-c").arg(deb));
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for line in listing.lines() {
        let path = line.split_whitespace().last().expect("a dpkg-deb -c line");
        let path = PathBuf::from(path.trim_start_matches('.'));
        match line.chars().next() {
            Some('-') => files.push(path),
            Some('d') => dirs.push(path),
            _ => panic!("unexpected entry in the package: {line}"),
        }
    }
    (files, dirs)
}

#[test]
fn the_debian_package_installs_validates_and_purges_cleanly() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "installing a Debian package needs root: run as root through `cargo xtask test`"
    );
    let xtask = workspace_root().join("target/debug/xtask");
    // Not `cargo run`: the cargo test running us holds the build lock, and would wait forever.
    assert!(
        xtask.exists(),
        "{} is missing: run the tests through `cargo xtask test`, which builds it",
        xtask.display()
    );
    if let Some(status) = package_status() {
        panic!(
            "a pgiam package is already on this host (dpkg status {status:?}); this test \
             installs and purges its own, so remove that one first (dpkg --purge pgiam)"
        );
    }

    let out = tempfile::tempdir().unwrap();
    let printed = succeed(
        Command::new(&xtask)
            .args(["package", "--binary"])
            .arg(pgiam_bin())
            .arg("--out")
            .arg(out.path()),
    );
    let deb = PathBuf::from(
        printed
            .lines()
            .last()
            .expect("xtask printed the .deb")
            .trim(),
    );
    assert!(
        deb.starts_with(out.path().canonicalize().unwrap()) && deb.is_file(),
        "xtask printed {printed:?}, not a .deb it wrote in {}",
        out.path().display()
    );
    let version = succeed(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"));
    let version = version.trim();
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION").replacen('-', "~", 1),
        "the package's version is the workspace's"
    );

    let (files, dirs) = contents(&deb);
    for f in &files {
        assert!(
            !f.exists(),
            "{} exists already; installing the package would overwrite it",
            f.display()
        );
    }
    let expected = [
        "/usr/bin/pgiam",
        "/lib/systemd/system/pgiam.service",
        "/etc/pgiam/pgiam.toml",
        "/etc/pgiam/policy.cedar",
        "/usr/share/doc/pgiam/README.md.gz",
        "/usr/share/doc/pgiam/README.Debian",
        "/usr/share/doc/pgiam/copyright",
        "/usr/share/doc/pgiam/examples/introspection.cedar",
    ];
    for e in expected {
        assert!(
            files.contains(&PathBuf::from(e)),
            "the package lacks {e}: {files:?}"
        );
    }

    let mut installed = Installed { purged: false };
    succeed(Command::new("dpkg").arg("-i").arg(&deb));
    for f in &files {
        assert!(f.is_file(), "{} was not installed", f.display());
    }
    for e in expected {
        assert!(Path::new(e).is_file(), "{e} is not where the package says");
    }
    let listed = succeed(Command::new("dpkg").args(["-L", "pgiam"]));
    for f in &files {
        assert!(
            listed.lines().any(|l| Path::new(l) == f),
            "dpkg -L pgiam does not list {}:\n{listed}",
            f.display()
        );
    }
    let conffiles = succeed(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "pgiam"]));
    for c in ["/etc/pgiam/pgiam.toml", "/etc/pgiam/policy.cedar"] {
        assert!(
            conffiles
                .lines()
                .any(|l| l.split_whitespace().next() == Some(c)),
            "{c} is not a conffile: {conffiles:?}"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/usr/bin/pgiam").unwrap().permissions(),
    );
    assert_eq!(mode & 0o7777, 0o755, "/usr/bin/pgiam's mode");

    let checked =
        output(Command::new("/usr/bin/pgiam").args(["check-config", "/etc/pgiam/pgiam.toml"]));
    let checked_out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && checked_out.starts_with("/etc/pgiam/pgiam.toml: ok"),
        "pgiam check-config on the shipped example ({}):\n{checked_out}{}",
        checked.status,
        String::from_utf8_lossy(&checked.stderr)
    );
    let shown = succeed(Command::new("/usr/bin/pgiam").arg("--version"));
    assert_eq!(
        shown.split_whitespace().last(),
        Some(env!("CARGO_PKG_VERSION")),
        "pgiam --version: {shown:?}"
    );
    let status = succeed(Command::new("dpkg").args(["-s", "pgiam"]));
    assert!(
        status.lines().any(|l| l == format!("Version: {version}")),
        "dpkg -s pgiam:\n{status}"
    );
    assert!(
        status.lines().any(|l| l == "Status: install ok installed"),
        "dpkg -s pgiam:\n{status}"
    );

    succeed(Command::new("dpkg").args(["--purge", "pgiam"]));
    installed.purged = true;
    for f in &files {
        assert!(!f.exists(), "{} is left after the purge", f.display());
    }
    // The package's own directories; /etc, /usr/bin and the like are everyone's.
    for d in dirs
        .iter()
        .filter(|d| d.starts_with("/etc/pgiam") || d.starts_with("/usr/share/doc/pgiam"))
    {
        assert!(!d.exists(), "{} is left after the purge", d.display());
    }
    assert_eq!(
        package_status(),
        None,
        "dpkg still knows pgiam after the purge"
    );
}
