//! Operators and casts run what the server's catalog says they run: pgiam reads it over a
//! short connection of its own, asks the policy about those functions, reads it again after
//! DDL passes through pgiam and once it is `catalog_max_age_secs` old, and refuses what needs
//! it while it cannot be read. (The bypass suite holds the attacks themselves.)

use std::time::Duration;

use crate::fixture::*;

/// Everything, but the functions named `reveal*`.
const POLICY: &str = r#"
@id("everything")
permit(principal, action, resource);
@id("not-reveal")
forbid(principal, action == PgIam::Action::"execute", resource)
  when { resource.name like "reveal*" };
"#;

fn env(max_age_secs: u64) -> Env {
    env_with(POLICY, max_age_secs)
}

/// A `secret` table the mapped role may read, and `reveal(int, int)` that reads it.
fn env_with(policy: &str, max_age_secs: u64) -> Env {
    let env = Env::with(Setup {
        policy: policy.into(),
        policy_settings: format!("catalog_max_age_secs = {max_age_secs}"),
        ..Setup::default()
    });
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE TABLE secret (v text); INSERT INTO secret VALUES ('s3cret'); \
                 GRANT ALL ON secret TO {ROLE}; GRANT CREATE ON SCHEMA public TO {ROLE}; \
                 CREATE FUNCTION reveal(int, int) RETURNS text LANGUAGE sql \
                   AS 'SELECT v FROM secret'; \
                 ALTER FUNCTION reveal(int, int) OWNER TO {ROLE}"
            ),
        )
        .unwrap();
    env
}

fn refused(out: &std::process::Output) -> bool {
    !out.status.success() && stderr(out).contains("pgiam: permission denied")
}

#[test]
fn an_operator_created_through_pgiam_is_known_to_the_next_statement() {
    // An hour: only the DDL passing through can make pgiam read the catalog again.
    let env = env(3600);
    let dsn = env.tcp_dsn("");
    // The catalog is read before the operator exists.
    assert_eq!(psql_ok(&dsn, "SELECT 1 = 1"), "t");
    let reads = env.catalog_reads();
    assert_eq!(reads, 1, "{}", env.pg.log());
    psql_ok(
        &dsn,
        "CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = reveal)",
    );
    // Directly, the operator reads the secret.
    assert_eq!(
        env.pg
            .psql_db(DB, &format!("SET ROLE {ROLE}; SELECT 1 === 2"))
            .unwrap(),
        "s3cret"
    );
    let out = psql(&dsn, "SELECT 1 === 2");
    assert!(refused(&out), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("function public.reveal"),
        "{}",
        stderr(&out)
    );
    assert!(env.catalog_reads() > reads);
}

#[test]
fn an_operator_created_behind_pgiams_back_is_known_once_the_snapshot_is_old() {
    let env = env(1);
    let dsn = env.tcp_dsn("");
    assert_eq!(psql_ok(&dsn, "SELECT 1 = 1"), "t");
    env.pg
        .psql_db(
            DB,
            "CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = reveal)",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let out = psql(&dsn, "SELECT 1 === 2");
    assert!(refused(&out), "{}", stderr(&out));
    // What runs no forbidden function goes on.
    assert_eq!(psql_ok(&dsn, "SELECT 1 = 1"), "t");
}

#[test]
fn without_the_catalog_what_needs_it_is_refused() {
    let env = env(1);
    let dsn = env.tcp_dsn("");
    // The mapped role may no longer read the operator catalog.
    env.pg
        .psql_db(DB, "REVOKE SELECT ON pg_catalog.pg_operator FROM PUBLIC")
        .unwrap();
    let out = psql(&dsn, "SELECT 1 = 1");
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains("cannot read the server's catalog") && said.contains("42501"),
        "{said}"
    );
    // What has no expression needs no catalog.
    psql_ok(&dsn, "BEGIN; COMMIT");
    // Readable again: served again (a failed read keeps the next one away for a second).
    env.pg
        .psql_db(DB, "GRANT SELECT ON pg_catalog.pg_operator TO PUBLIC")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(psql_ok(&dsn, "SELECT 1 = 1"), "t");
}

#[test]
fn a_policy_names_the_overload_it_forbids_and_the_other_one_runs() {
    // An hour: only the DDL passing through can make pgiam read the catalog again.
    let env = env_with(
        r#"
@id("everything")
permit(principal, action, resource);
@id("not-tag-text")
forbid(principal, action == PgIam::Action::"execute", resource)
  when { context has overloads && context.overloads.contains("tag(text, text)") };
"#,
        3600,
    );
    env.pg
        .psql_db(
            DB,
            "CREATE FUNCTION tag(int) RETURNS text LANGUAGE sql AS 'SELECT ''tag'''",
        )
        .unwrap();
    let dsn = env.tcp_dsn("");
    assert_eq!(psql_ok(&dsn, "SELECT tag(1)"), "tag");
    // The overload is created through pgiam, after the catalog was read.
    psql_ok(
        &dsn,
        "CREATE FUNCTION tag(text, text) RETURNS text LANGUAGE sql AS 'SELECT v FROM secret'",
    );
    assert_eq!(
        env.pg
            .psql_db(DB, &format!("SET ROLE {ROLE}; SELECT tag('a', 'b')"))
            .unwrap(),
        "s3cret"
    );
    let out = psql(&dsn, "SELECT tag('a', 'b')");
    assert!(refused(&out), "{}", stderr(&out));
    assert_eq!(psql_ok(&dsn, "SELECT tag(1)"), "tag");
}

#[test]
fn a_sort_runs_the_operator_family_s_functions_and_the_policy_is_asked_about_them() {
    let env = env(3600);
    // An enum whose default btree operator class compares through a PL/pgSQL function that
    // leaves a trace: `ORDER BY` calls it, though the statement names no function.
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); \
                 CREATE TABLE moods (m mood); INSERT INTO moods VALUES ('happy'), ('sad'); \
                 CREATE TABLE canary (v text); GRANT ALL ON moods, canary TO {ROLE}; \
                 CREATE FUNCTION reveal_cmp(a mood, b mood) RETURNS int LANGUAGE plpgsql \
                   AS $$BEGIN INSERT INTO canary VALUES ('ran'); RETURN enum_cmp(a, b); END$$; \
                 CREATE FUNCTION mood_lt(mood, mood) RETURNS bool LANGUAGE sql AS 'SELECT enum_lt($1, $2)'; \
                 CREATE FUNCTION mood_le(mood, mood) RETURNS bool LANGUAGE sql AS 'SELECT enum_le($1, $2)'; \
                 CREATE FUNCTION mood_eq(mood, mood) RETURNS bool LANGUAGE sql AS 'SELECT enum_eq($1, $2)'; \
                 CREATE FUNCTION mood_ge(mood, mood) RETURNS bool LANGUAGE sql AS 'SELECT enum_ge($1, $2)'; \
                 CREATE FUNCTION mood_gt(mood, mood) RETURNS bool LANGUAGE sql AS 'SELECT enum_gt($1, $2)'; \
                 CREATE OPERATOR < (LEFTARG = mood, RIGHTARG = mood, FUNCTION = mood_lt); \
                 CREATE OPERATOR <= (LEFTARG = mood, RIGHTARG = mood, FUNCTION = mood_le); \
                 CREATE OPERATOR = (LEFTARG = mood, RIGHTARG = mood, FUNCTION = mood_eq); \
                 CREATE OPERATOR >= (LEFTARG = mood, RIGHTARG = mood, FUNCTION = mood_ge); \
                 CREATE OPERATOR > (LEFTARG = mood, RIGHTARG = mood, FUNCTION = mood_gt); \
                 CREATE OPERATOR CLASS mood_ops DEFAULT FOR TYPE mood USING btree AS \
                   OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, \
                   FUNCTION 1 reveal_cmp(mood, mood)"
            ),
        )
        .unwrap();
    let ran = || {
        env.pg
            .psql_db(DB, "SELECT count(*) FROM canary")
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    // Directly, the sort calls the comparison function.
    assert_eq!(
        env.pg
            .psql_db(
                DB,
                &format!("SET ROLE {ROLE}; SELECT m FROM moods ORDER BY m")
            )
            .unwrap(),
        "sad\nhappy"
    );
    assert!(ran() > 0, "the comparison function did not run directly");
    env.pg.psql_db(DB, "TRUNCATE canary").unwrap();
    let dsn = env.tcp_dsn("");
    let out = psql(&dsn, "SELECT m FROM moods ORDER BY m");
    assert!(refused(&out), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("function public.reveal_cmp"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ran(), 0);
}
