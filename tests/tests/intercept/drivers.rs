//! Real drivers, unmodified, in the intercepted cgroup, dialling PostgreSQL's own address in
//! sslmode disable, require and verify-full (against pgiam's generated client CA): psycopg 3,
//! asyncpg, node-postgres and pgJDBC. Each driver's checks are a script in `tests/drivers/`
//! that prints one line per check and exits non-zero at the first failure; the drivers are
//! installed, pinned, into `target/drivers/` by `cargo xtask install-deps`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use pgiam_tests::workspace_root;

use super::{output, text, Env, DB, RW};

const SSLMODES: [&str; 3] = ["disable", "require", "verify-full"];

/// A file the drivers' installation leaves in `target/drivers/`, or a panic that says how to
/// get it: these tests are never skipped.
fn installed(relative: &str) -> PathBuf {
    let path = workspace_root().join("target/drivers").join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask install-deps` (it installs the pinned drivers into \
         target/drivers)",
        path.display()
    );
    path
}

fn system_file(path: &str) -> PathBuf {
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask install-deps`",
        path.display()
    );
    path
}

fn script(name: &str) -> PathBuf {
    workspace_root().join("tests/drivers").join(name)
}

impl Env {
    /// pgiam's generated client CA, which verify-full clients trust.
    fn client_ca(&self) -> PathBuf {
        self._dir.path().join("state").join("client-ca.crt")
    }

    /// A writable HOME for the drivers, inside the test's directory.
    fn driver_home(&self) -> PathBuf {
        let home = self._dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        home
    }

    /// `program` in the app cgroup with a clean environment for a driver: no password (only
    /// pgiam can log it in) and no libpq settings inherited from whoever runs the tests.
    fn driver_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.app.command(program);
        for var in [
            "PGPASSWORD",
            "PGPASSFILE",
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGSSLMODE",
            "PGSSLROOTCERT",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", self.driver_home());
        cmd
    }

    /// A CA of nobody's: verify-full against it must fail.
    fn foreign_ca(&self) -> PathBuf {
        pgiam_tests::write_file(
            self._dir.path(),
            "foreign-ca.crt",
            &pgiam_tests::TestCa::new().cert_pem(),
            0o644,
        )
    }

    /// The arguments every script but pgJDBC's takes: HOST PORT DBNAME USER SSLMODE CAFILE ROLE.
    /// The user is one PostgreSQL does not know: pgiam replaces it with the mapped role.
    fn driver_args(&self, sslmode: &str) -> Vec<String> {
        self.driver_args_with_ca(sslmode, &self.client_ca())
    }

    fn driver_args_with_ca(&self, sslmode: &str, ca: &Path) -> Vec<String> {
        vec![
            "127.0.0.1".into(),
            self.pg.port.to_string(),
            DB.into(),
            "whoever".into(),
            sslmode.into(),
            ca.display().to_string(),
            RW.into(),
        ]
    }

    /// Runs one driver's script for one sslmode and checks that every session it opened went
    /// through pgiam: intercepted by eBPF from the app cgroup, TLS (or not) as asked, with the
    /// sk_msg fast path carrying its bytes.
    fn run_driver(&self, driver: &str, sslmode: &str, mut cmd: Command) {
        let log_before = self.log().lines().count();
        let authorized = format!("user={RW} database={DB}");
        let logins_before = self.pg.session_logins(&authorized);
        let redirects = self.stats()["redirect"];
        let started = Instant::now();
        let out = output(&mut cmd);
        let shown = text(&out);
        assert!(
            out.status.success(),
            "{driver} with sslmode={sslmode} failed ({}):\n{shown}\n--- pgiam log ---\n{}",
            out.status,
            self.log()
        );
        assert!(
            shown.contains("all checks passed"),
            "{driver} {sslmode}:\n{shown}"
        );
        let log = self.log();
        let sessions: Vec<&str> = log
            .lines()
            .skip(log_before)
            .filter(|l| l.contains("session established"))
            .collect();
        assert!(
            !sessions.is_empty(),
            "{driver} {sslmode}: no session went through pgiam:\n{log}"
        );
        let tls = format!("tls={}", sslmode != "disable");
        for line in &sessions {
            assert!(line.contains("via=ebpf"), "{driver} {sslmode}: {line}");
            assert!(
                line.contains(&format!("cgroup={}", self.app.path)),
                "{driver} {sslmode}: {line}"
            );
            assert!(
                line.contains(&format!("role={RW}")),
                "{driver} {sslmode}: {line}"
            );
            assert!(line.contains(&tls), "{driver} {sslmode}: {line}");
        }
        // PostgreSQL saw pgiam's logins as the mapped role, one per session at least, and
        // never the user the driver asked for.
        let pg_log = self.pg.log();
        assert!(
            self.pg.session_logins(&authorized) - logins_before >= sessions.len(),
            "{driver} {sslmode}: PostgreSQL did not see a login of {RW} per session:\n{pg_log}"
        );
        assert!(
            !pg_log.contains("user=whoever"),
            "{driver} {sslmode}: the driver's own user reached PostgreSQL:\n{pg_log}"
        );
        assert!(
            self.stats()["redirect"] > redirects,
            "{driver} {sslmode}: no message took the sk_msg fast path"
        );
        eprintln!(
            "{driver} sslmode={sslmode}: {} checks, {} sessions through pgiam, {:.1} s",
            shown.lines().filter(|l| l.starts_with("ok ")).count(),
            sessions.len(),
            started.elapsed().as_secs_f64()
        );
    }

    /// verify-full against a CA that did not issue pgiam's certificate: the driver must refuse
    /// the connection (so the verify-full runs above really verified), and no session starts.
    fn refused_without_trust(&self, driver: &str, mut cmd: Command, why: &str) {
        let log_before = self.log().lines().count();
        let out = output(&mut cmd);
        let shown = text(&out);
        assert!(
            !out.status.success(),
            "{driver} trusted a certificate its CA did not issue:\n{shown}"
        );
        let failed = shown
            .lines()
            .find(|l| l.starts_with("FAIL "))
            .unwrap_or_else(|| panic!("{driver}: no FAIL line:\n{shown}"));
        assert!(
            failed.contains(why),
            "{driver} failed, but not for the certificate ({why:?}):\n{shown}"
        );
        eprintln!("{driver} verify-full with a foreign CA: {failed}");
        let log = self.log();
        assert!(
            !log.lines()
                .skip(log_before)
                .any(|l| l.contains("session established")),
            "{driver}: a session started though the client refused the certificate:\n{log}"
        );
    }
}

#[test]
fn psycopg_through_pgiam() {
    let python = installed("venv/bin/python");
    let env = Env::start(true);
    for sslmode in SSLMODES {
        let mut cmd = env.driver_command(&python);
        cmd.arg(script("psycopg_check.py"))
            .args(env.driver_args(sslmode));
        env.run_driver("psycopg", sslmode, cmd);
    }
    let mut cmd = env.driver_command(&python);
    cmd.arg(script("psycopg_check.py"))
        .args(env.driver_args_with_ca("verify-full", &env.foreign_ca()));
    env.refused_without_trust("psycopg", cmd, "certificate verify failed");
}

#[test]
fn asyncpg_through_pgiam() {
    let python = installed("venv/bin/python");
    let env = Env::start(true);
    for sslmode in SSLMODES {
        let mut cmd = env.driver_command(&python);
        cmd.arg(script("asyncpg_check.py"))
            .args(env.driver_args(sslmode));
        env.run_driver("asyncpg", sslmode, cmd);
    }
    let mut cmd = env.driver_command(&python);
    cmd.arg(script("asyncpg_check.py"))
        .args(env.driver_args_with_ca("verify-full", &env.foreign_ca()));
    env.refused_without_trust("asyncpg", cmd, "CERTIFICATE_VERIFY_FAILED");
}

impl Env {
    /// The app cgroup's mapping pooled by transaction, on two backends.
    fn transaction_pooled(&mut self) {
        self.stop_pgiam();
        let config = self.config().replace(
            &format!("role = \"{RW}\"\n"),
            &format!("role = \"{RW}\"\npool = \"transaction\"\n"),
        ) + "[pool]\nsize = 2\nmax_backends = 2\n";
        std::fs::write(&self.config_path, config).unwrap();
        self.start_pgiam();
    }

    /// Runs a driver's transaction pooling check (its arguments given, no TLS): every check
    /// passes, and the database saw no more than the pool's two logins.
    fn run_transactions_check(&self, driver: &str, mut cmd: Command) {
        let authorized = format!("user={RW} database={DB}");
        let logins_before = self.pg.session_logins(&authorized);
        let out = output(&mut cmd);
        assert!(
            out.status.success() && text(&out).contains("all checks passed"),
            "{driver}:\n{}\n--- pgiam log ---\n{}",
            text(&out),
            self.log()
        );
        let logins = self.pg.session_logins(&authorized) - logins_before;
        assert!(
            logins <= 2,
            "{driver}: {logins} backends, more than the cap"
        );
    }
}

/// Drivers through transaction pooling, each with more connections than pgiam's two backends:
/// asyncpg (its own pool, the statements it names itself, explicit prepared statements used
/// across other connections' transactions, transaction blocks, a cursor, executemany; its
/// reset on release, RESET ALL among it, keeps no backend), psycopg 3 (every statement
/// prepared, pipeline mode, transaction blocks, executemany), node-postgres (its pool,
/// named statements, transaction blocks) and pgJDBC (statements it prepares on the server once
/// reused, under the same names in every connection for other SQL; transactions; a batch).
#[test]
fn drivers_through_transaction_pooling() {
    let python = installed("venv/bin/python");
    let modules = installed("node/node_modules");
    let jar = system_file("/usr/share/java/postgresql.jar");
    let mut env = Env::start(true);
    env.transaction_pooled();
    let args = env.driver_args("disable")[..4].to_vec();
    for (driver, script_name) in [
        ("asyncpg", "asyncpg_transactions.py"),
        ("psycopg", "psycopg_transactions.py"),
    ] {
        let mut cmd = env.driver_command(&python);
        cmd.arg(script(script_name)).args(&args);
        env.run_transactions_check(driver, cmd);
    }
    let mut cmd = env.driver_command("node");
    cmd.env("NODE_PATH", &modules)
        .arg(script("pg_transactions.js"))
        .args(&args);
    env.run_transactions_check("node-postgres", cmd);
    let mut cmd = env.driver_command("java");
    cmd.arg("-cp")
        .arg(&jar)
        .arg(script("JdbcTransactions.java"))
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/{DB}?user=whoever&sslmode=disable",
            env.pg.port
        ));
    env.run_transactions_check("pgJDBC", cmd);
}

#[test]
fn node_postgres_through_pgiam() {
    let modules = installed("node/node_modules");
    installed("node/node_modules/pg/package.json");
    let env = Env::start(true);
    for sslmode in SSLMODES {
        let mut cmd = env.driver_command("node");
        cmd.env("NODE_PATH", &modules)
            .arg(script("pg_check.js"))
            .args(env.driver_args(sslmode));
        env.run_driver("node-postgres", sslmode, cmd);
    }
    let mut cmd = env.driver_command("node");
    cmd.env("NODE_PATH", &modules)
        .arg(script("pg_check.js"))
        .args(env.driver_args_with_ca("verify-full", &env.foreign_ca()));
    env.refused_without_trust("node-postgres", cmd, "SELF_SIGNED_CERT_IN_CHAIN");
}

#[test]
fn pgjdbc_through_pgiam() {
    let jar = system_file("/usr/share/java/postgresql.jar");
    let env = Env::start(true);
    let url = |sslmode: &str, ca: &Path| {
        let mut url = format!(
            "jdbc:postgresql://127.0.0.1:{}/{DB}?user=whoever&sslmode={sslmode}",
            env.pg.port
        );
        if sslmode == "verify-full" {
            url += &format!("&sslrootcert={}", ca.display());
        }
        url
    };
    let command = |url: String| {
        let mut cmd = env.driver_command("java");
        cmd.arg("-cp")
            .arg(&jar)
            .arg(script("JdbcCheck.java"))
            .args([&url, RW]);
        cmd
    };
    for sslmode in SSLMODES {
        env.run_driver("pgJDBC", sslmode, command(url(sslmode, &env.client_ca())));
    }
    env.refused_without_trust(
        "pgJDBC",
        command(url("verify-full", &env.foreign_ca())),
        "PKIX path building failed",
    );
}
