//! pg_dump, pg_restore and psql's catalog commands through pgiam: a parallel directory dump
//! restored through pgiam matches its source, and the shipped introspection policy
//! (`pgiam-userspace/dist/introspection.cedar`) lets psql's `\d` family and a dump of one
//! schema run with everything else refused.

use std::process::{Command, Output};

use crate::fixture::*;

/// A schema with one of each kind of object pg_dump handles, owned by the mapped role, and
/// another schema the role owns too (so only pgiam stands between it and the data).
fn objects(env: &Env) {
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE SCHEMA dumped AUTHORIZATION {ROLE}; \
                 CREATE SCHEMA other AUTHORIZATION {ROLE}; \
                 SET ROLE {ROLE}; \
                 CREATE TABLE dumped.accounts (id int PRIMARY KEY, owner text NOT NULL, \
                   opened date DEFAULT '2026-01-01'); \
                 INSERT INTO dumped.accounts SELECT i, 'owner ' || i FROM generate_series(1, 2000) i; \
                 CREATE TABLE dumped.entries (id bigserial PRIMARY KEY, \
                   account int REFERENCES dumped.accounts, amount numeric(12,2), note text); \
                 INSERT INTO dumped.entries (account, amount, note) \
                   SELECT i % 2000 + 1, i * 1.5, repeat('n', i % 50) FROM generate_series(1, 5000) i; \
                 CREATE INDEX entries_by_account ON dumped.entries (account); \
                 CREATE VIEW dumped.owners AS SELECT owner FROM dumped.accounts; \
                 CREATE SEQUENCE dumped.ids START 42; \
                 CREATE FUNCTION dumped.plus(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 1'; \
                 COMMENT ON TABLE dumped.accounts IS 'who holds what'; \
                 CREATE TABLE other.secret (v text); INSERT INTO other.secret VALUES ('s3cr3t')"
            ),
        )
        .unwrap();
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(pgiam_tests::pg_bin_dir().join(name))
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

/// A plain dump straight from PostgreSQL as the superuser: what a database holds.
fn direct_dump(env: &Env, db: &str) -> String {
    let out = tool(
        "pg_dump",
        &[
            "-h",
            &env.pg.socket_dir.display().to_string(),
            "-p",
            &env.pg.port.to_string(),
            "-U",
            "postgres",
            "--schema=dumped",
            db,
        ],
    );
    assert!(out.status.success(), "direct pg_dump: {}", stderr(&out));
    comparable(&String::from_utf8(out.stdout).unwrap())
}

/// A plain dump without what differs between two runs of pg_dump whatever they dump: the
/// random key of pg_dump ≥ 15.14's `\restrict` / `\unrestrict` lines.
fn comparable(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `pg_dump -Fd -j 2` through pgiam, restored with `pg_restore -j 2` through pgiam into
/// another database: both databases then dump identically.
#[test]
fn a_parallel_directory_dump_restored_through_pgiam_matches_its_source() {
    let env = Env::with(Setup {
        extra: format!(
            "[[mapping]]\nprincipal = \"uid:{}\"\ndatabase = \"restored\"\nrole = \"{ROLE}\"\n",
            nix::unistd::geteuid()
        ),
        ..Setup::default()
    });
    objects(&env);
    env.direct(&format!("CREATE DATABASE restored OWNER {ROLE}"));
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("dump");
    let out = tool(
        "pg_dump",
        &[
            "-Fd",
            "-j",
            "2",
            "--schema=dumped",
            "-f",
            &out_dir.display().to_string(),
            "-d",
            &env.tcp_dsn(""),
        ],
    );
    assert!(out.status.success(), "pg_dump -Fd -j 2: {}", stderr(&out));
    let restore_dsn = env
        .tcp_dsn("")
        .replace(&format!("dbname={DB}"), "dbname=restored");
    let out = tool(
        "pg_restore",
        &[
            "-j",
            "2",
            "--exit-on-error",
            "-d",
            &restore_dsn,
            &out_dir.display().to_string(),
        ],
    );
    assert!(out.status.success(), "pg_restore -j 2: {}", stderr(&out));
    let source = direct_dump(&env, DB);
    let restored = direct_dump(&env, "restored");
    assert!(source.contains("COPY dumped.entries"), "{source}");
    assert_eq!(
        restored, source,
        "the restored schema dumps as its source does"
    );
    // Both jobs of each tool were pgiam sessions, with their statements decided.
    let records = env.audit_records();
    let sessions = records.iter().filter(|r| r["kind"] == "session").count();
    assert!(sessions >= 6, "pg_dump and pg_restore sessions: {sessions}");
    assert!(!records
        .iter()
        .any(|r| r["kind"] == "statement" && r["decision"] == "deny"));
}

fn introspection_policy() -> String {
    let snippet = std::fs::read_to_string(
        pgiam_tests::workspace_root().join("pgiam-userspace/dist/introspection.cedar"),
    )
    .unwrap();
    format!(
        "@id(\"connect\")\npermit(principal, action == PgIam::Action::\"connect\", resource);\n\
         {snippet}\n\
         @id(\"read-dumped\")\n\
         permit(principal, action in [PgIam::Action::\"select\", PgIam::Action::\"copy_out\", \
         PgIam::Action::\"lock\"], resource in PgIam::Schema::\"{DB}.dumped\");\n"
    )
}

fn refused(out: &Output) -> bool {
    !out.status.success() && stderr(out).contains("pgiam: permission denied")
}

/// Under the shipped introspection snippet and a permit to read schema `dumped`: psql's
/// `\d` family and a pg_dump of that schema work; reading another schema, writing, dumping
/// another schema, role changes and the catalog's functions that act are refused.
#[test]
fn the_introspection_policy_serves_psql_and_pg_dump_of_one_schema_and_nothing_else() {
    let env = Env::with(Setup {
        policy: introspection_policy(),
        ..Setup::default()
    });
    objects(&env);
    let dsn = env.tcp_dsn("");
    for meta in [
        "\\d",
        "\\dt+",
        "\\df dumped.*",
        "\\d dumped.accounts",
        "\\d+ dumped.entries",
        "\\dn",
        "\\dv dumped.*",
        "\\ds dumped.*",
        "\\di dumped.*",
        "\\l",
        "\\du",
        "\\dx",
    ] {
        let out = psql(&dsn, meta);
        assert!(out.status.success(), "psql {meta}: {}", stderr(&out));
    }
    let described = psql_ok(&dsn, "\\d dumped.accounts");
    assert!(
        described.contains("owner|text") && described.contains("'2026-01-01'::date"),
        "{described}"
    );

    let out = tool("pg_dump", &["--schema=dumped", "-d", &dsn]);
    assert!(
        out.status.success(),
        "pg_dump of the readable schema: {}",
        stderr(&out)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("CREATE TABLE dumped.accounts")
            && dump.contains("CREATE VIEW dumped.owners")
            && dump.contains("CREATE FUNCTION dumped.plus")
            && dump.contains("1\towner 1\t2026-01-01"),
        "{dump}"
    );
    assert_eq!(
        comparable(&dump),
        direct_dump(&env, DB),
        "the dump through pgiam is the superuser's dump of the schema"
    );

    // Everything else is refused: directly, the role may do each of these (it owns both
    // schemas); through pgiam the policy does not permit them.
    for sql in [
        "SELECT * FROM other.secret",
        "INSERT INTO dumped.accounts VALUES (0, 'x')",
        "UPDATE dumped.accounts SET owner = 'x'",
        "DROP TABLE dumped.accounts",
        "CREATE TABLE dumped.t (i int)",
        "SELECT dumped.plus(1)",
        "SET ROLE postgres",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT pg_catalog.pg_terminate_backend(pg_backend_pid())",
        "SELECT pg_catalog.pg_read_file('PG_VERSION')",
        "SET work_mem = '1GB'",
    ] {
        let out = psql(&dsn, sql);
        assert!(refused(&out), "{sql}: {}", stderr(&out));
    }
    let direct_secret = env
        .pg
        .psql_db(DB, &format!("SET ROLE {ROLE}; SELECT v FROM other.secret"))
        .unwrap();
    assert!(
        direct_secret.contains("s3cr3t"),
        "the role itself may read it: {direct_secret}"
    );
    let out = tool("pg_dump", &["--schema=other", "-d", &dsn]);
    assert!(refused(&out), "pg_dump of another schema: {}", stderr(&out));
    assert_eq!(
        env.pg
            .psql_db(DB, "SELECT count(*) FROM dumped.accounts")
            .unwrap(),
        "2000",
        "nothing was written"
    );
}
