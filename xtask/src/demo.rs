//! `cargo xtask demo`: the main job on an embedded default. A throwaway PostgreSQL, pgiam in
//! front of it, and real psql sessions: one mapped identity, TLS, and one refused identity.

use std::process::Command;

use anyhow::{bail, Context};
use pgiam_tests::{free_port, pg_bin_dir, run_as, write_file, PgCluster, PgOptions, Pgiam};

use crate::{run, workspace_root};

fn section(title: &str) {
    println!("\n\x1b[1m== {title} ==\x1b[0m");
}

fn psql(dsn: &str, sql: &str, as_user: Option<&str>) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new(pg_bin_dir().join("psql"));
    cmd.args(["-X", dsn, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(u) = as_user {
        run_as(&mut cmd, u);
    }
    let out = cmd.output().context("running psql")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

pub fn run_demo() -> anyhow::Result<()> {
    section("building pgiam (release)");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root())
            .args(["build", "--release", "--bin", "pgiam"]),
    )?;
    let bin = workspace_root().join("target/release/pgiam");

    section("starting a throwaway PostgreSQL");
    let pg = PgCluster::start(PgOptions::default())?;
    println!(
        "PostgreSQL on 127.0.0.1:{} (data in {})",
        pg.port,
        pg.data_dir.display()
    );
    let password = format!("demo-{}", std::process::id());
    pg.psql(&format!(
        "CREATE ROLE app_reader LOGIN PASSWORD '{password}'"
    ))?;
    pg.psql("CREATE DATABASE app")?;
    pg.psql_db(
        "app",
        "CREATE TABLE accounts(id int, owner text); \
         INSERT INTO accounts VALUES (1, 'alice'), (2, 'bob'); \
         GRANT SELECT ON accounts TO app_reader",
    )?;
    println!("role app_reader (password known only to pgiam), table app.public.accounts");

    let dir = tempfile::Builder::new().prefix("pgiam-demo-").tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let pw = write_file(dir.path(), "app_reader.password", &password, 0o600);
    let tcp_port = free_port();
    let unix_port = free_port();
    let me = nix_user_name();
    let config = format!(
        r#"state_dir = "{dir}/state"

[listen]
tcp = "127.0.0.1:{tcp_port}"
unix = "{dir}/.s.PGSQL.{unix_port}"

[client_tls]
mode = "generate"

[upstream]
host = "127.0.0.1"
port = {pg_port}

[roles.app_reader]
password_file = "{pw}"

[[mapping]]
principal = "user:{me}"
database = "app"
role = "app_reader"
"#,
        dir = dir.path().display(),
        pg_port = pg.port,
        pw = pw.display(),
    );
    section("pgiam configuration");
    print!("{config}");
    let pgiam = Pgiam::start_with(bin, &config, format!("127.0.0.1:{tcp_port}").parse()?)?;

    let unix_dsn = format!(
        "host={} port={unix_port} dbname=app user=anything",
        dir.path().display()
    );
    let tcp_dsn =
        format!("host=127.0.0.1 port={tcp_port} dbname=app user=anything sslmode=require");

    section(&format!(
        "psql as OS user {me:?} over pgiam's unix socket (no password)"
    ));
    let (ok, out) = psql(
        &unix_dsn,
        "SELECT current_user, session_user; SELECT * FROM accounts ORDER BY id",
        None,
    )?;
    print!("{out}");
    if !ok || !out.contains("app_reader") || !out.contains("alice") {
        bail!("the mapped session did not work:\n{out}\n{}", pgiam.log());
    }

    section("psql over pgiam's TCP listener with sslmode=require");
    let (ok, out) = psql(
        &tcp_dsn,
        "SELECT current_user, count(*) AS accounts FROM accounts",
        None,
    )?;
    print!("{out}");
    if !ok {
        bail!("the TLS session did not work:\n{out}");
    }

    section("psql as OS user \"nobody\": no mapping, refused before any database connection");
    let (ok, out) = psql(&unix_dsn, "SELECT 1", Some("nobody"))?;
    print!("{out}");
    if ok || !out.contains("no database role is mapped") {
        bail!("the unmapped identity was not refused:\n{out}");
    }

    section("what pgiam says about who connected (its log)");
    for line in pgiam
        .log()
        .lines()
        .filter(|l| l.contains("session established") || l.contains("session refused"))
    {
        println!("{line}");
    }
    section("what PostgreSQL saw (its log)");
    for line in pg
        .log()
        .lines()
        .filter(|l| l.contains("connection authorized"))
    {
        if !line.contains("user=postgres") {
            println!("{line}");
        }
    }
    println!("\nDemo complete: PostgreSQL, pgiam and their files are removed now.");
    Ok(())
}

fn nix_user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into())
}
