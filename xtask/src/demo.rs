//! `cargo xtask demo`: the main job on an embedded default. A throwaway PostgreSQL, pgiam in
//! front of it, and real psql sessions: one mapped identity, TLS, and one refused identity.

use std::process::Command;

use anyhow::{bail, Context};
use pgiam_tests::idp::{Idp, ALICE_TOTP};
use pgiam_tests::{
    free_port, pg_bin_dir, run_as, write_file, PgCluster, PgOptions, Pgiam, TestCgroup,
};

use crate::{run, workspace_root};

fn section(title: &str) {
    println!("\n\x1b[1m== {title} ==\x1b[0m");
}

fn psql(dsn: &str, sql: &str, as_user: Option<&str>) -> anyhow::Result<(bool, String)> {
    psql_in(None, dsn, sql, as_user)
}

/// psql, unmodified, optionally started inside a cgroup (and as another OS user).
fn psql_in(
    cgroup: Option<&TestCgroup>,
    dsn: &str,
    sql: &str,
    as_user: Option<&str>,
) -> anyhow::Result<(bool, String)> {
    let psql = pg_bin_dir().join("psql");
    let mut cmd = match (cgroup, as_user) {
        (Some(cg), Some(u)) => cg.command_as(&psql, u),
        (Some(cg), None) => cg.command(&psql),
        (None, u) => {
            let mut c = Command::new(&psql);
            if let Some(u) = u {
                run_as(&mut c, u);
            }
            c
        }
    };
    cmd.args(["-X", dsn, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10");
    if as_user.is_some() {
        // Not root's home: libpq would try to read root's client certificate there.
        cmd.env("HOME", "/");
    }
    let out = cmd.output().context("running psql")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

pub fn run_demo() -> anyhow::Result<()> {
    // The debug build: the one `cargo xtask test` builds too, so the README's two commands
    // build pgiam once. Everything below runs this binary and nothing else that a build may
    // or may not have left behind.
    section("building pgiam");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root())
            .args(["build", "--bin", "pgiam"]),
    )?;
    let bin = workspace_root().join("target/debug/pgiam");

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
         CREATE TABLE salaries(owner text, amount int); \
         INSERT INTO salaries VALUES ('alice', 100000); \
         GRANT SELECT ON accounts, salaries TO app_reader",
    )?;
    println!(
        "role app_reader (password known only to pgiam) may read app.public.accounts and \
         app.public.salaries; pgiam's policy lets it read only accounts"
    );

    let dir = tempfile::Builder::new().prefix("pgiam-demo-").tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let pw = write_file(dir.path(), "app_reader.password", &password, 0o600);
    let policy = write_file(dir.path(), "policy.cedar", DEMO_POLICY, 0o644);
    section("the statement policy (Cedar)");
    print!("{DEMO_POLICY}");
    let tcp_port = free_port();
    let unix_port = free_port();
    let me = nix_user_name();
    // Interception needs root (BPF, cgroups); elsewhere the demo shows the explicit listeners.
    let intercept = nix::unistd::geteuid().is_root();
    let cgroup = intercept.then(|| TestCgroup::new("pgiam-demo"));
    let (proxy_cg, app_cg, person_cg) = match &cgroup {
        Some(cg) => (
            Some(cg.child("pgiam")),
            Some(cg.child("app")),
            Some(cg.child("alice-login-session")),
        ),
        None => (None, None, None),
    };
    // A real OpenID provider for the person scene (it needs a login session: a cgroup).
    let idp = match &person_cg {
        Some(_) => Some(Idp::start(dir.path(), 300).context("starting the OpenID provider")?),
        None => None,
    };
    let people = match &idp {
        Some(idp) => format!(
            "\n[people]\nsocket = \"{dir}/login.sock\"\n\n[[oidc]]\nalias = \"corp\"\nissuer = \"{issuer}\"\nclient_id = \"pgiam\"\n\n[[mapping]]\nprincipal = \"oidc:corp:alice\"\ndatabase = \"app\"\nrole = \"app_reader\"\n",
            dir = dir.path().display(),
            issuer = idp.issuer,
        ),
        None => String::new(),
    };
    let bpffs = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let interception = match &cgroup {
        Some(cg) => format!(
            "\n[interception]\ncgroup = \"{}\"\nendpoints = [\"127.0.0.1\"]\nports = [{}]\nbpffs_dir = \"/sys/fs/bpf/{bpffs}\"\n",
            cg.path, pg.port
        ),
        None => String::new(),
    };
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

[policy]
file = "{policy}"

[roles.app_reader]
password_file = "{pw}"

[[mapping]]
principal = "user:{me}"
database = "app"
role = "app_reader"

[audit]
path = "{dir}/audit.jsonl"

[admin]
socket = "{dir}/admin.sock"
{people}{interception}"#,
        dir = dir.path().display(),
        pg_port = pg.port,
        pw = pw.display(),
        policy = policy.display(),
    );
    section("pgiam configuration");
    print!("{config}");
    write_file(dir.path(), "demo.toml", &config, 0o600);
    let pgiam = Pgiam::start_in(
        bin,
        &config,
        format!("127.0.0.1:{tcp_port}").parse()?,
        proxy_cg.as_ref(),
    )?;
    let result =
        scenes(&pg, &pgiam, &dir, tcp_port, unix_port, &me, app_cg.as_ref()).and_then(|_| {
            match (&idp, &person_cg) {
                (Some(idp), Some(cg)) => person(&pg, &pgiam, idp, &dir, cg),
                _ => Ok(()),
            }
        });
    let bin = pgiam.bin.clone();
    drop(pgiam);
    if intercept {
        let out = Command::new(&bin)
            .args(["uninstall-bpf", "--config"])
            .arg(dir.path().join("demo.toml"))
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    drop(idp);
    drop((app_cg, proxy_cg, person_cg, cgroup));
    result?;
    println!(
        "\nDemo complete: PostgreSQL, pgiam, the cgroups, the pins and all files are removed."
    );
    Ok(())
}

fn scenes(
    pg: &PgCluster,
    pgiam: &Pgiam,
    dir: &tempfile::TempDir,
    tcp_port: u16,
    unix_port: u16,
    me: &str,
    app_cg: Option<&TestCgroup>,
) -> anyhow::Result<()> {
    if let Some(app) = app_cg {
        let dsn = format!("host=127.0.0.1 port={} dbname=app user=anything", pg.port);
        section(&format!(
            "unmodified psql in cgroup {} dialling PostgreSQL itself ({dsn}), no password",
            app.path
        ));
        let (ok, out) = psql_in(
            Some(app),
            &dsn,
            "SELECT current_user, inet_server_port(); SELECT * FROM accounts ORDER BY id",
            None,
        )?;
        print!("{out}");
        if !ok || !out.contains("app_reader") {
            bail!("interception did not work:\n{out}\n{}", pgiam.log());
        }
        section("the same psql as OS user \"nobody\" in that cgroup: no mapping, refused");
        let (ok, out) = psql_in(Some(app), &dsn, "SELECT 1", Some("nobody"))?;
        print!("{out}");
        if ok {
            bail!("the unmapped identity was not refused");
        }
        section("the same psql outside the cgroup: not intercepted, PostgreSQL wants a password");
        let (_, out) = psql_in(None, &format!("{dsn} sslmode=disable"), "SELECT 1", None)?;
        print!("{out}");
        section("eBPF counters");
        let out = pgiam.cli(&["bpf-stats"]);
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }

    let unix_dsn = format!(
        "host={} port={unix_port} dbname=app user=anything",
        dir.path().display()
    );
    let me = me.to_owned();
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

    section("statements the policy refuses: another table, a role change, a server file");
    for sql in [
        "SELECT * FROM salaries",
        "SET ROLE postgres",
        "SELECT pg_read_file('/etc/passwd')",
    ] {
        let (ok, out) = psql(&unix_dsn, sql, None)?;
        println!("=> {sql}");
        print!("{out}");
        if ok || !out.contains("permission denied") {
            bail!("{sql:?} was not refused:\n{out}");
        }
    }

    section("psql as OS user \"nobody\": no mapping, refused before any database connection");
    let (ok, out) = psql(&unix_dsn, "SELECT 1", Some("nobody"))?;
    print!("{out}");
    if ok || !out.contains("no database role is mapped") {
        bail!("the unmapped identity was not refused:\n{out}");
    }

    operate(pgiam, &unix_dsn)?;

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
    section("the audit log: every decision, hash-chained");
    let audit = dir.path().join("audit.jsonl");
    print!("{}", std::fs::read_to_string(&audit).unwrap_or_default());
    let out = Command::new(&pgiam.bin)
        .args(["audit", "verify"])
        .arg(&audit)
        .output()?;
    let out =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    print!("{out}");
    if !out.contains("hash chain intact") {
        bail!("the audit log does not verify");
    }
    Ok(())
}

/// A person: alice logs in with the provider (password and a TOTP code), and every psql of her
/// login session carries her, with the second factor the policy asks for to read salaries.
fn person(
    pg: &PgCluster,
    pgiam: &Pgiam,
    idp: &Idp,
    dir: &tempfile::TempDir,
    session: &TestCgroup,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let socket = dir.path().join("login.sock");
    section(&format!(
        "a person: OS user \"nobody\" in login session {} runs `pgiam login`",
        session.path
    ));
    let mut login = session
        .command_as(&pgiam.bin, "nobody")
        .args(["login", "--socket"])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running pgiam login")?;
    let mut stdout = std::io::BufReader::new(login.stdout.take().context("piped")?);
    let url = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            let _ = login.wait();
            bail!("pgiam login showed no link:\n{}", pgiam.log());
        }
        print!("{line}");
        if let Some(url) = line.trim().strip_prefix("or open ") {
            break url.to_owned();
        }
    };
    section(&format!(
        "alice approves at {} (oidc-provider): password, then a TOTP code",
        idp.issuer
    ));
    idp.approve(&url, "alice", "alice-pw", Some(ALICE_TOTP));
    println!("approved");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest)?;
    print!("{rest}");
    if !login.wait()?.success() {
        bail!("pgiam login failed:\n{}", pgiam.log());
    }
    let dsn = format!("host=127.0.0.1 port={} dbname=app user=anything", pg.port);
    section("unmodified psql in her login session: she is alice, with MFA, and may read salaries");
    let (ok, out) = psql_in(
        Some(session),
        &dsn,
        "SELECT current_user; SELECT * FROM salaries",
        Some("nobody"),
    )?;
    print!("{out}");
    if !ok || !out.contains("100000") {
        bail!("alice's session did not work:\n{out}\n{}", pgiam.log());
    }
    section("the audit's session record names the person beside the workload");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap_or_default();
    let record = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["kind"] == "session" && r["identity"]["person"]["subject"] == "alice")
        .context("no session record names alice")?;
    println!("{}", serde_json::to_string_pretty(&record["identity"])?);
    Ok(())
}

/// The operator's side: a long statement running, `pgiam sessions` showing it, `pgiam kill`
/// ending it, `pgiam status`.
fn operate(pgiam: &Pgiam, dsn: &str) -> anyhow::Result<()> {
    section("operating it: a psql runs a long statement; pgiam sessions shows it");
    let mut busy = Command::new(pg_bin_dir().join("psql"))
        .args(["-X", dsn, "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting psql")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let id = loop {
        let out = pgiam.cli(&["sessions", "--json"]);
        let sessions: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(s) = sessions.iter().find(|s| s["state"] == "active") {
            break s["id"].as_str().unwrap_or_default().to_owned();
        }
        if std::time::Instant::now() > deadline {
            let _ = busy.kill();
            bail!(
                "the running psql never showed in pgiam sessions:\n{}",
                pgiam.log()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    print!(
        "{}",
        String::from_utf8_lossy(&pgiam.cli(&["sessions"]).stdout)
    );
    section(&format!(
        "pgiam kill {id}: the statement is cancelled, the client told 57P01"
    ));
    let out = pgiam.cli(&["kill", &id]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let ended = busy.wait_with_output().context("waiting for psql")?;
    print!("{}", String::from_utf8_lossy(&ended.stderr));
    if ended.status.success() || !String::from_utf8_lossy(&ended.stderr).contains("killed by") {
        bail!(
            "pgiam kill did not end the session:\n{}",
            String::from_utf8_lossy(&ended.stderr)
        );
    }
    section("pgiam status");
    print!(
        "{}",
        String::from_utf8_lossy(&pgiam.cli(&["status"]).stdout)
    );
    Ok(())
}

const DEMO_POLICY: &str = r#"@id("connect-app")
permit(principal, action == PgIam::Action::"connect", resource == PgIam::Database::"app");

@id("read-accounts")
permit(principal, action == PgIam::Action::"select", resource == PgIam::Table::"app.public.accounts");

@id("salaries-need-a-second-factor")
permit(principal, action == PgIam::Action::"select", resource == PgIam::Table::"app.public.salaries")
  when { principal has mfa && principal.mfa };

@id("functions")
permit(principal, action == PgIam::Action::"execute", resource);

@id("no-server-files")
forbid(principal, action == PgIam::Action::"execute", resource)
  when { resource.name like "pg_read_*" || resource.name like "lo_*" };
"#;

fn nix_user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into())
}
