//! `cargo xtask package`: pgiam as a Debian package. Every file of the package (control data,
//! maintainer scripts, copyright, README.Debian) is written here and the archive is made by
//! `dpkg-deb --build --root-owner-group`, so a machine needs nothing beyond dpkg and binutils:
//! no packaging tool to install or compile.
//!
//! The package ships `/usr/bin/pgiam`, the systemd unit, an example configuration and policy in
//! `/etc/pgiam` (conffiles) and the documentation. It never enables or starts the service, and
//! never deletes `/var/lib/pgiam` or `/var/log/pgiam`, not even on purge.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::{cargo, run, workspace_root};

const PACKAGE: &str = "pgiam";
const MAINTAINER: &str = "pgiam engineers <pgiam@localhost>";
/// Where Debian 12's packages ship units; on a merged-/usr system it is /usr/lib/systemd/system.
const UNIT_DIR: &str = "lib/systemd/system";
const CONFFILES: &[&str] = &["/etc/pgiam/pgiam.toml", "/etc/pgiam/policy.cedar"];

/// The shared libraries pgiam may link and the Debian packages providing them. A library not
/// listed stops the build: the Depends field would otherwise silently miss it.
fn library_package(soname: &str) -> Option<&'static str> {
    match soname {
        "libc.so.6" | "libm.so.6" | "libpthread.so.0" | "libdl.so.2" | "librt.so.1"
        | "libutil.so.1" => Some("libc6"),
        s if s.starts_with("ld-linux") => Some("libc6"),
        "libgcc_s.so.1" => Some("libgcc-s1"),
        _ => None,
    }
}

const USAGE: &str = "usage: cargo xtask package [--binary PATH] [--out DIR]";

struct Options {
    binary: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> anyhow::Result<Options> {
    let mut opts = Options {
        binary: None,
        out: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let slot = match name {
            "--binary" => &mut opts.binary,
            "--out" => &mut opts.out,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        };
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))?
                .clone(),
        };
        *slot = Some(PathBuf::from(value));
    }
    Ok(opts)
}

pub fn run_package(args: &[String]) -> anyhow::Result<()> {
    let opts = parse_args(args)?;
    let root = workspace_root();
    let meta = workspace_metadata(&root)?;
    let arch = pgiam_tests::run_checked(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture (is this a Debian-family system?)")?
        .trim()
        .to_owned();

    let binary = match opts.binary {
        Some(b) => b,
        None => {
            run(cargo().args(["build", "--release", "-p", "pgiam-userspace"]))?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(|d| root.join(d))
                .unwrap_or_else(|| root.join("target"));
            target.join("release/pgiam")
        }
    };
    if !binary.is_file() {
        bail!("{} is not a file", binary.display());
    }
    check_binary_version(&binary, &meta.version)?;

    let out = opts.out.unwrap_or_else(|| root.join("target/debian"));
    fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;

    let deb_version = debian_version(&meta.version);
    let staging = tempfile::Builder::new()
        .prefix("pgiam-package-")
        .tempdir()
        .context("creating a staging directory")?;
    let tree = staging
        .path()
        .join(format!("{PACKAGE}_{deb_version}_{arch}"));
    stage(&tree, &root, &binary, &meta)?;
    let depends = depends(&tree.join("usr/bin/pgiam"))?;
    write_control(&tree, &deb_version, &arch, &depends)?;
    set_directory_modes(&tree)?;

    let deb = out.join(format!("{PACKAGE}_{deb_version}_{arch}.deb"));
    let build = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb)
        .stdin(Stdio::null())
        .output()
        .context("running dpkg-deb")?;
    // Our stdout is the .deb's path alone, for scripts: dpkg-deb's chatter goes to stderr.
    eprint!(
        "{}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    if !build.status.success() {
        bail!("dpkg-deb --build failed ({})", build.status);
    }
    lintian(&deb);
    println!("{}", deb.display());
    Ok(())
}

struct Metadata {
    version: String,
    license: String,
}

/// `[workspace.package]` of the root Cargo.toml, which pgiam-userspace inherits its version
/// and license from (checked, so a crate that stops inheriting them cannot be mislabelled).
fn workspace_metadata(root: &Path) -> anyhow::Result<Metadata> {
    let crate_manifest = root.join("pgiam-userspace/Cargo.toml");
    let crate_text = fs::read_to_string(&crate_manifest)
        .with_context(|| format!("reading {}", crate_manifest.display()))?;
    for key in ["version", "license"] {
        if !crate_text
            .lines()
            .any(|l| l.replace(' ', "") == format!("{key}.workspace=true"))
        {
            bail!(
                "{} no longer has `{key}.workspace = true`: teach xtask/src/package.rs where \
                 pgiam's {key} comes from",
                crate_manifest.display()
            );
        }
    }
    let manifest = root.join("Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let get = |key: &str| {
        toml_section_string(&text, "workspace.package", key).with_context(|| {
            format!(
                "{}: no `{key} = \"…\"` in [workspace.package]",
                manifest.display()
            )
        })
    };
    Ok(Metadata {
        version: get("version")?,
        license: get("license")?,
    })
}

/// A `key = "value"` line of one `[section]`. xtask has no TOML parser, and the root manifest
/// writes these as plain basic strings.
fn toml_section_string(text: &str, section: &str, key: &str) -> Option<String> {
    let header = format!("[{section}]");
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == header;
            continue;
        }
        if !inside {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() == key {
            let v = v.trim();
            return v
                .strip_prefix('"')
                .and_then(|v| v.split_once('"'))
                .map(|(v, _)| v.to_owned());
        }
    }
    None
}

/// Cargo's `1.2.0-rc.1` sorts before `1.2.0`; in Debian only `~` does.
fn debian_version(cargo_version: &str) -> String {
    cargo_version.replacen('-', "~", 1)
}

/// A `--binary` from another checkout or an old build would be shipped under the wrong version.
fn check_binary_version(binary: &Path, version: &str) -> anyhow::Result<()> {
    let out = pgiam_tests::run_checked(Command::new(binary).arg("--version"))
        .with_context(|| format!("{} --version", binary.display()))?;
    let first = out.lines().next().unwrap_or_default();
    if first.split_whitespace().last() != Some(version) {
        bail!(
            "{} --version says {first:?}, but the workspace version is {version}",
            binary.display()
        );
    }
    Ok(())
}

/// Every file of the package except DEBIAN/control (which needs the final tree's size).
fn stage(tree: &Path, root: &Path, binary: &Path, meta: &Metadata) -> anyhow::Result<()> {
    let dist = root.join("pgiam-userspace/dist");
    let doc = "usr/share/doc/pgiam";

    let bin = tree.join("usr/bin/pgiam");
    make_parent(&bin)?;
    // Debian policy: binaries are stripped (a release build carries debug info: debug = 1).
    run(Command::new("strip")
        .args([
            "--remove-section=.comment",
            "--remove-section=.note",
            "--strip-unneeded",
            "-o",
        ])
        .arg(&bin)
        .arg(binary))
    .context("stripping pgiam (strip is in binutils)")?;
    set_mode(&bin, 0o755)?;

    copy(
        &dist.join("pgiam.service"),
        &tree.join(UNIT_DIR).join("pgiam.service"),
    )?;
    copy(&dist.join("pgiam.toml"), &tree.join("etc/pgiam/pgiam.toml"))?;
    copy(
        &dist.join("policy.cedar"),
        &tree.join("etc/pgiam/policy.cedar"),
    )?;
    // A fragment to paste into the one policy file pgiam reads: in /etc it would look like a
    // policy in force.
    copy(
        &dist.join("introspection.cedar"),
        &tree.join(doc).join("examples/introspection.cedar"),
    )?;

    gzip(
        &root.join("README.md"),
        &tree.join(doc).join("README.md.gz"),
    )?;
    write(&tree.join(doc).join("README.Debian"), README_DEBIAN, 0o644)?;
    write(
        &tree.join(doc).join("copyright"),
        &copyright(&meta.license)?,
        0o644,
    )?;

    let debian = tree.join("DEBIAN");
    write(
        &debian.join("conffiles"),
        &(CONFFILES.join("\n") + "\n"),
        0o644,
    )?;
    write(&debian.join("postinst"), POSTINST, 0o755)?;
    write(&debian.join("prerm"), PRERM, 0o755)?;
    write(&debian.join("postrm"), POSTRM, 0o755)?;
    write_md5sums(tree)
}

fn copyright(license: &str) -> anyhow::Result<String> {
    // DEP-5 wants the license text unless Debian ships it in /usr/share/common-licenses.
    let text = match license {
        "Apache-2.0" => {
            " On Debian systems, the full text of the Apache License, Version 2.0 can be\n \
             found in /usr/share/common-licenses/Apache-2.0.\n"
        }
        other => bail!(
            "the workspace license is {other:?}: add its text (or common-licenses pointer) to \
             the copyright file in xtask/src/package.rs"
        ),
    };
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: pgiam\n\
         Upstream-Contact: {MAINTAINER}\n\
         \n\
         Files: *\n\
         Copyright: pgiam engineers\n\
         License: {license}\n\
         {text}"
    ))
}

/// The Depends field, from the libraries the ELF file asks for and the glibc symbol versions it
/// uses (what dpkg-shlibdeps would find, without needing dpkg-dev and a debian/ directory).
fn depends(binary: &Path) -> anyhow::Result<String> {
    let headers = pgiam_tests::run_checked(Command::new("objdump").arg("-p").arg(binary))
        .context("objdump -p (objdump is in binutils)")?;
    let mut packages = Vec::new();
    for line in headers.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("NEEDED") {
            continue;
        }
        let Some(soname) = words.next() else {
            continue;
        };
        let Some(package) = library_package(soname) else {
            bail!(
                "pgiam links {soname}, which no package in xtask/src/package.rs \
                 (library_package) provides: add it, so Depends names it"
            );
        };
        packages.push(package);
    }
    packages.sort();
    packages.dedup();

    let symbols = pgiam_tests::run_checked(Command::new("objdump").arg("-T").arg(binary))
        .context("objdump -T")?;
    // The newest symbol version used from each library is the oldest package that has it.
    let newest = |prefix: &str| {
        symbols
            .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
            .filter_map(|w| w.strip_prefix(prefix))
            .filter_map(|v| {
                v.split('.')
                    .map(|n| n.parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()
            })
            .max()
            .map(|mut v| {
                // GCC_4.2.0 is Debian's 4.2, as dpkg-shlibdeps writes it.
                while v.len() > 2 && v.last() == Some(&0) {
                    v.pop();
                }
                v.iter().map(u32::to_string).collect::<Vec<_>>().join(".")
            })
    };
    Ok(packages
        .iter()
        .map(|&p| {
            let min = match p {
                "libc6" => newest("GLIBC_"),
                "libgcc-s1" => newest("GCC_"),
                _ => None,
            };
            match min {
                Some(v) => format!("{p} (>= {v})"),
                None => p.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(", "))
}

fn write_control(tree: &Path, version: &str, arch: &str, depends: &str) -> anyhow::Result<()> {
    let mut control = String::new();
    // Written with fmt::Write into a String, which cannot fail.
    let _ = write!(
        control,
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {}\n\
         Depends: {depends}\n\
         Section: database\n\
         Priority: optional\n\
         Description: identity-aware access layer for PostgreSQL\n\
         {DESCRIPTION}",
        installed_size_kib(tree)?
    );
    write(&tree.join("DEBIAN/control"), &control, 0o644)
}

const DESCRIPTION: &str =
    " pgiam runs on each host where database clients run. It learns from the\n \
kernel who is calling (uid, systemd unit or container, executable), maps that\n \
identity to a database role, and logs in to PostgreSQL as that role with\n \
credentials the application never sees.\n \
.\n \
Every statement is authorized against a Cedar policy, parsed with\n \
PostgreSQL's own parser, and its decision is written to a tamper-evident\n \
audit log before the statement reaches the database. With eBPF\n \
interception, applications need no change to their connection strings.\n";

/// As dpkg-gencontrol counts it: each file's size rounded up to a KiB, one per directory.
fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    let (files, dirs) = walk(tree)?;
    let mut kib = 0;
    for f in files.iter().filter(|f| !f.starts_with("DEBIAN")) {
        let len = fs::symlink_metadata(tree.join(f))
            .with_context(|| format!("stat {}", f.display()))?
            .len();
        kib += len.div_ceil(1024);
    }
    Ok(kib + dirs.iter().filter(|d| !d.starts_with("DEBIAN")).count() as u64)
}

/// DEBIAN/md5sums for `dpkg --verify` and debsums; conffiles are left out, as dh_md5sums
/// does, since dpkg records their sums itself.
fn write_md5sums(tree: &Path) -> anyhow::Result<()> {
    let (files, _) = walk(tree)?;
    let files: Vec<&PathBuf> = files
        .iter()
        .filter(|f| !f.starts_with("DEBIAN"))
        .filter(|f| !CONFFILES.contains(&format!("/{}", f.display()).as_str()))
        .collect();
    let sums = pgiam_tests::run_checked(Command::new("md5sum").current_dir(tree).args(&files))
        .context("md5sum")?;
    write(&tree.join("DEBIAN/md5sums"), &sums, 0o644)
}

/// Regular files and directories below `tree`, relative to it, sorted.
fn walk(tree: &Path) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    fn visit(
        tree: &Path,
        rel: &Path,
        files: &mut Vec<PathBuf>,
        dirs: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let dir = tree.join(rel);
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let rel = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                dirs.push(rel.clone());
                visit(tree, &rel, files, dirs)?;
            } else {
                files.push(rel);
            }
        }
        Ok(())
    }
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    visit(tree, Path::new(""), &mut files, &mut dirs)?;
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}

/// 0755 for every directory, the tree's root included: the staging directory is created 0700,
/// and dpkg-deb takes modes as they are.
fn set_directory_modes(tree: &Path) -> anyhow::Result<()> {
    set_mode(tree, 0o755)?;
    for d in walk(tree)?.1 {
        set_mode(&tree.join(d), 0o755)?;
    }
    Ok(())
}

fn make_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    make_parent(path)?;
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    make_parent(to)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, 0o644)
}

/// `gzip -9n`, as Debian policy asks of documentation: -n keeps the name and time out, so the
/// same input gives the same bytes.
fn gzip(from: &Path, to: &Path) -> anyhow::Result<()> {
    make_parent(to)?;
    let input = fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let output = fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    run(Command::new("gzip").arg("-9n").stdin(input).stdout(output))
        .with_context(|| format!("gzip {}", from.display()))?;
    set_mode(to, 0o644)
}

/// Advice, not a gate: lintian is not installed everywhere, and its opinions (a native package
/// without a changelog, say) should not stop a build.
fn lintian(deb: &Path) {
    if Command::new("lintian")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return;
    }
    match Command::new("lintian")
        .arg(deb)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            eprint!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                eprintln!("xtask: lintian: no complaints");
            } else {
                eprintln!("xtask: lintian found issues ({}); see above", out.status);
            }
        }
        Err(e) => eprintln!("xtask: lintian did not run: {e}"),
    }
}

const POSTINST: &str = r#"#!/bin/sh
# Tells systemd about the (new or changed) unit. Enables and starts nothing: the shipped
# /etc/pgiam/pgiam.toml is an example that names a database and credentials of no real host.
set -e

case "$1" in
configure)
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then
            # An upgrade: a running pgiam goes on with the new binary; a stopped one stays so.
            systemctl try-restart pgiam.service || true
        fi
    fi
    if [ -z "$2" ]; then
        echo "pgiam: the service is neither enabled nor started. Adapt /etc/pgiam/pgiam.toml and"
        echo "pgiam: /etc/pgiam/policy.cedar, check them with 'pgiam check-config /etc/pgiam/pgiam.toml',"
        echo "pgiam: then run 'systemctl enable --now pgiam' (see /usr/share/doc/pgiam/README.Debian)."
    fi
    ;;
esac

exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
# Stops pgiam when the package goes away. On upgrade it keeps running: with interception, a
# stopped pgiam means refused database connections, so postinst restarts it instead.
set -e

case "$1" in
remove|deconfigure)
    if [ -d /run/systemd/system ] && systemctl is-active --quiet pgiam.service; then
        systemctl stop pgiam.service
    fi
    if [ "$1" = remove ] && [ -d /sys/fs/bpf/pgiam ]; then
        echo "pgiam: eBPF interception is still pinned in /sys/fs/bpf/pgiam and refuses intercepted" >&2
        echo "pgiam: connections while pgiam is not running; 'pgiam uninstall-bpf --config FILE' ends it." >&2
    fi
    ;;
esac

exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# Never deletes /var/lib/pgiam (pgiam's client CA, which clients may trust) or /var/log/pgiam
# (the audit log, which is evidence), not even on purge. dpkg itself removes the conffiles.
set -e

case "$1" in
remove)
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
    fi
    ;;
purge)
    for dir in /var/lib/pgiam /var/log/pgiam; do
        if [ -d "$dir" ]; then
            echo "pgiam: $dir is kept (state and audit logs are never deleted); remove it yourself if you mean to."
        fi
    done
    ;;
esac

exit 0
"#;

const README_DEBIAN: &str = "pgiam for Debian
================

This package installs /usr/bin/pgiam, the systemd unit pgiam.service, and an example
configuration in /etc/pgiam: pgiam.toml and policy.cedar. Both are conffiles: your changes
survive upgrades, and purging the package removes them.

The service is neither enabled nor started when the package is installed: the example names a
database host, a CA file and a password credential that exist only on a real deployment.
Adapt them, check the result, and start pgiam:

    pgiam check-config /etc/pgiam/pgiam.toml
    systemctl enable --now pgiam

`systemctl reload pgiam` (SIGHUP) reloads pgiam.toml and the policy without dropping
sessions; what only a restart changes (listeners, state_dir, client_tls, audit, admin) is
logged and kept. `pgiam sessions`, `kill`, `revoke` and `status` work over the admin socket
(root and the [admin] group). Role passwords reach pgiam as systemd credentials: see
[roles.billing_rw] in the example and add LoadCredential= lines with `systemctl edit pgiam`.

examples/introspection.cedar permits what psql's \\d family and pg_dump read from the system
catalogs and nothing else; pgiam reads one policy file, so paste it into
/etc/pgiam/policy.cedar to use it.

Removing the package stops the service. Neither removing nor purging it deletes
/var/lib/pgiam (pgiam's generated client CA, which clients may have been told to trust) or
/var/log/pgiam (the audit log): delete them yourself once they are no longer needed.
With [interception], the eBPF programs stay pinned (in /sys/fs/bpf/pgiam by default) and
refuse intercepted connections while pgiam is not running: run
`pgiam uninstall-bpf --config /etc/pgiam/pgiam.toml` before removing the package if
interception should end with it.
";
