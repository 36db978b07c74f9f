//! The classification's tests: what each statement shape reads, writes, sets and calls.

use super::*;

fn one(sql: &str) -> Statement {
    let mut v = classify(sql, true).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(v.len(), 1, "{sql}");
    v.remove(0)
}

fn rels(sql: &str) -> Vec<(String, Access)> {
    one(sql)
        .relations
        .into_iter()
        .map(|r| (r.name.to_string(), r.access))
        .collect()
}

use Access::*;

fn r(name: &str, a: Access) -> (String, Access) {
    (name.to_owned(), a)
}

#[test]
fn names_fold_as_postgresql_folds_them() {
    assert_eq!(rels("SELECT * FROM Accounts"), [r("accounts", Select)]);
    assert_eq!(rels(r#"SELECT * FROM "Accounts""#), [r("Accounts", Select)]);
    assert_eq!(rels("select * from App.T"), [r("app.t", Select)]);
    let long = "x".repeat(70);
    assert_eq!(
        rels(&format!("select * from {long}")),
        [r(&"x".repeat(63), Select)]
    );
}

#[test]
fn writes_and_their_sources() {
    assert_eq!(
        rels("INSERT INTO t SELECT * FROM secret"),
        [r("secret", Select), r("t", Insert)]
    );
    assert_eq!(
        rels("UPDATE t SET a = s.a FROM secret s WHERE t.id = s.id"),
        [r("secret", Select), r("t", Update)]
    );
    assert_eq!(
        rels("DELETE FROM t USING secret WHERE t.id = secret.id"),
        [r("secret", Select), r("t", Delete)]
    );
    assert_eq!(
        rels("MERGE INTO t USING secret s ON t.id = s.id WHEN MATCHED THEN DELETE"),
        [r("secret", Select), r("t", Merge)]
    );
    assert_eq!(rels("TRUNCATE a, b"), [r("a", Truncate), r("b", Truncate)]);
    assert_eq!(
        rels("SELECT * INTO t3 FROM secret"),
        [r("secret", Select), r("t3", Create)]
    );
    assert_eq!(
        rels("CREATE TABLE t2 AS SELECT * FROM secret"),
        [r("secret", Select), r("t2", Create)]
    );
}

#[test]
fn nested_statements_reveal_their_tables() {
    // The cases pg_query's summary helpers miss.
    assert_eq!(
        rels("DECLARE c CURSOR FOR SELECT * FROM secret"),
        [r("secret", Select)]
    );
    assert_eq!(
        rels("PREPARE p AS SELECT * FROM secret"),
        [r("secret", Select)]
    );
    assert_eq!(
        rels("EXPLAIN ANALYZE DELETE FROM secret"),
        [r("secret", Delete)]
    );
    assert_eq!(
        rels("COPY (SELECT * FROM secret) TO STDOUT"),
        [r("secret", Select)]
    );
    assert_eq!(
        rels("SELECT 1 FROM t WHERE x IN (SELECT y FROM u WHERE EXISTS (SELECT FROM v))"),
        [r("t", Select), r("u", Select), r("v", Select)]
    );
    assert_eq!(
        rels("CREATE VIEW v AS SELECT * FROM secret"),
        [r("secret", Select), r("v", Ddl)]
    );
    assert_eq!(
        rels("CREATE TABLE c (id int REFERENCES parent(id))"),
        [r("c", Ddl), r("parent", Ddl)]
    );
}

#[test]
fn ctes_are_scoped_like_postgresql() {
    assert_eq!(
        rels("WITH x AS (DELETE FROM secret RETURNING *) SELECT * FROM x"),
        [r("secret", Delete)]
    );
    assert_eq!(
        rels("WITH a AS (SELECT * FROM secret) SELECT * FROM a"),
        [r("secret", Select)]
    );
    // Non-recursive: inside its own body, `secret` is the table.
    assert_eq!(
        rels("WITH secret AS (SELECT * FROM secret) SELECT * FROM secret"),
        [r("secret", Select)]
    );
    // Later CTEs see earlier ones, not the other way round.
    assert_eq!(
        rels("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b"),
        [r("b", Select)]
    );
    assert_eq!(
        rels("WITH RECURSIVE r AS (SELECT 1 UNION SELECT * FROM r) SELECT * FROM r"),
        []
    );
    // A schema-qualified name is never a CTE.
    assert_eq!(
        rels("WITH secret AS (SELECT 1) SELECT * FROM public.secret"),
        [r("public.secret", Select)]
    );
    // A CTE's scope ends with its statement.
    assert_eq!(
        rels("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x"),
        [r("x", Select)]
    );
}

#[test]
fn copy_directions_program_and_files() {
    assert_eq!(rels("COPY secret TO STDOUT"), [r("secret", CopyOut)]);
    assert_eq!(rels("COPY t FROM STDIN"), [r("t", CopyIn)]);
    assert!(one("COPY t FROM PROGRAM 'id'").copy_program);
    assert!(one("COPY t TO '/tmp/x'").server_files);
    assert!(!one("COPY t TO STDOUT").server_files);
}

#[test]
fn role_changes_in_every_form() {
    for sql in [
        "SET ROLE postgres",
        "set local role postgres",
        "RESET ROLE",
        "SET SESSION AUTHORIZATION postgres",
        "DISCARD ALL",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT set_config('ROLE', 'postgres', false)",
        "SELECT set_config(current_setting('x'), 'postgres', false)",
        "SELECT pg_catalog.set_config('session_authorization', 'postgres', false)",
    ] {
        assert!(one(sql).role_change, "{sql}");
    }
    // A role's default role applies at its next login: a role may set its own.
    for sql in [
        "ALTER ROLE current_user SET role = postgres",
        "ALTER ROLE app IN DATABASE app SET ROLE TO postgres",
        "ALTER USER app SET session_authorization = postgres",
    ] {
        assert!(one(sql).role_change, "{sql}");
    }
    for sql in [
        "SET search_path = x",
        "ALTER ROLE app SET work_mem = '1MB'",
        "SELECT set_config('work_mem', '4MB', false)",
        "DISCARD PLANS",
        "RESET ALL",
    ] {
        assert!(!one(sql).role_change, "{sql}");
    }
    assert_eq!(
        one("SELECT set_config('Search_Path', 'x', false)").parameters,
        BTreeSet::from(["search_path".to_owned()])
    );
    assert_eq!(
        one("SET LOCAL work_mem = '1MB'").parameters,
        BTreeSet::from(["work_mem".to_owned()])
    );
}

#[test]
fn search_path_values_are_read_as_the_server_reads_them() {
    let schemas = |sql: &str| {
        let s = one(sql);
        assert!(!s.search_path_unknown, "{sql}");
        s.search_path.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(schemas("SET search_path = other"), ["other"]);
    // Each argument is one name, exactly: identifiers as the parser folded them, strings
    // as written (the server quotes them), numbers as unquoted names.
    assert_eq!(
        schemas(r#"SET search_path TO "Other", Public, 'a, B', 1, "$user""#),
        ["$user", "1", "Other", "a, B", "public"]
    );
    assert_eq!(schemas("SET SCHEMA 'Tenant'"), ["Tenant"]);
    assert_eq!(schemas("set local search_path = x"), ["x"]);
    assert_eq!(
        schemas("SET SESSION search_path = x, pg_temp"),
        ["pg_temp", "x"]
    );
    // set_config's value is a list, split and folded as the server does.
    assert_eq!(
        schemas(r#"SELECT set_config('Search_Path', ' "A b" ,  C,pg_temp , "x""y"', false)"#),
        ["A b", "c", "pg_temp", "x\"y"]
    );
    assert_eq!(
        schemas("SELECT pg_catalog.set_config('search_path', '', false)"),
        Vec::<String>::new()
    );
    // Wherever a SET sits: a function's SET clause, a role's default, a prepared
    // statement, a cursor.
    assert_eq!(
        schemas(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = fn_path \
             AS 'select 1'"
        ),
        ["fn_path"]
    );
    assert_eq!(
        schemas("ALTER FUNCTION f() SET search_path = a, b"),
        ["a", "b"]
    );
    assert_eq!(schemas("ALTER ROLE r SET search_path = c"), ["c"]);
    assert_eq!(
        schemas("ALTER ROLE r IN DATABASE d SET search_path = c2"),
        ["c2"]
    );
    assert_eq!(schemas("ALTER DATABASE d SET search_path = c3"), ["c3"]);
    assert_eq!(schemas("ALTER SYSTEM SET search_path = c4"), ["c4"]);
    assert_eq!(
        schemas("PREPARE p AS SELECT set_config('search_path', 'd', false)"),
        ["d"]
    );
    assert_eq!(
        schemas("DECLARE c CURSOR FOR SELECT set_config('search_path', 'e', true)"),
        ["e"]
    );
    // Back to the starting value: nothing new.
    for sql in [
        "RESET search_path",
        "SET search_path TO DEFAULT",
        "RESET ALL",
        "SELECT set_config('search_path', NULL, false)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path FROM CURRENT AS 'select 1'",
    ] {
        assert_eq!(schemas(sql), Vec::<String>::new(), "{sql}");
    }
    // Values pgiam cannot read when it decides.
    for sql in [
        "SELECT set_config('search_path', $1, false)",
        "SELECT set_config('search_path', 'a' || 'b', false)",
        "SELECT set_config('search_path', 'x'::text, false)",
        "SELECT set_config('search_path', current_setting('x'), false)",
        "SELECT set_config('search_path', '\"a', false)",
        "SELECT set_config('search_path', 'a b', false)",
        "SELECT set_config('search_path', 'a,', false)",
        "SELECT set_config('search_path', E'a\\vb', false)",
        "SELECT set_config('search_path')",
        "SELECT set_config(lower('SEARCH_PATH'), lower('x'), false)",
        "SELECT set_config(lower('SEARCH_PATH'), E'a\\vb', false)",
        "SELECT set_config(setting_name => 'search_path', new_value => 'x', is_local => false)",
    ] {
        assert!(one(sql).search_path_unknown, "{sql}");
    }
    assert!(!one("SELECT set_config('role', 'x', false)").search_path_unknown);
    // A setting name that is not a constant might be search_path: its constant value is
    // what the path would become, if the server accepts it as one.
    let s = one(
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
         WHERE name LIKE 'restrict%'",
    );
    assert!(s.role_change && !s.search_path_unknown);
    assert_eq!(
        s.search_path,
        BTreeSet::from(["view".into(), "foreign-table".into()])
    );
    let s = one("SELECT set_config(lower('X'), '1 day', false)");
    assert!(s.role_change && !s.search_path_unknown && s.search_path.is_empty());
    assert!(!one("SELECT set_config('work_mem', $1, false)").search_path_unknown);
}

#[test]
fn search_path_lists_split_like_split_identifier_string() {
    let p = |v: &str| parse_search_path(v);
    assert_eq!(p(""), Some(vec![]));
    assert_eq!(p("  "), Some(vec![]));
    assert_eq!(p("a"), Some(vec!["a".into()]));
    assert_eq!(
        p("\t$User ,\n\"$user\",PUBLIC"),
        Some(vec!["$user".into(), "$user".into(), "public".into()])
    );
    assert_eq!(p(r#""""#), Some(vec!["".into()]));
    assert_eq!(p(r#""a,b""#), Some(vec!["a,b".into()]));
    assert_eq!(p(r#""Ab""c""#), Some(vec![r#"Ab"c"#.into()]));
    // An unquoted name runs to a comma or whitespace, quotes and all.
    assert_eq!(p(r#"A"b""#), Some(vec![r#"a"b""#.into()]));
    assert_eq!(p(&"x".repeat(70)), Some(vec!["x".repeat(63)]));
    assert_eq!(
        p(&format!("\"{}\"", "é".repeat(40))),
        Some(vec!["é".repeat(31)])
    );
    for bad in [",", "a,", ",a", "a b", "\"a", "\"a\"b", "a,,b", "a\u{b}"] {
        assert_eq!(p(bad), None, "{bad:?}");
    }
}

#[test]
fn sequences_named_by_text_are_relations() {
    assert_eq!(rels("SELECT nextval('s')"), [r("s", Update)]);
    assert_eq!(
        rels(r#"SELECT pg_catalog.setval('App."Seq"', 5)"#),
        [r("app.Seq", Update)]
    );
    assert_eq!(rels("SELECT currval('s'::regclass)"), [r("s", Select)]);
    assert_eq!(
        rels("SELECT nextval(' public . s ')"),
        [r("public.s", Update)]
    );
    for dynamic in [
        "SELECT nextval('s' || 'x')",
        "SELECT nextval('16384')",
        "SELECT nextval('db.public.s')",
        "SELECT nextval($1)",
        "SELECT nextval(('s'::regclass)::oid::regclass)",
        r#"SELECT nextval('"unterminated')"#,
    ] {
        let s = one(dynamic);
        // (A regclass cast inside is a lookup in pg_class of its own.)
        let lookups = s
            .relations
            .iter()
            .all(|r| r.name.to_string() == "pg_catalog.pg_class");
        assert!(s.do_block && lookups, "{dynamic}: {s:?}");
    }
    // Another schema's function of the same name is an ordinary function.
    let s = one("SELECT other.nextval('s')");
    assert!(s.relations.is_empty() && !s.do_block, "{s:?}");
}

#[test]
fn functions_do_blocks_and_file_access() {
    let s = one("SELECT pg_catalog.pg_read_file('/etc/passwd'), lower('A')");
    assert!(s.server_files);
    assert!(s.functions.contains(&QualifiedName {
        schema: Some("pg_catalog".into()),
        name: "pg_read_file".into()
    }));
    assert!(s.functions.contains(&QualifiedName {
        schema: None,
        name: "lower".into()
    }));
    assert!(one("DO $$ BEGIN PERFORM 1; END $$").do_block);
    assert!(one("SELECT query_to_xml('select * from secret', true, true, '')").do_block);
    assert!(one("SELECT pg_catalog.table_to_xml('secret', true, true, '')").do_block);
    assert!(one("CALL proc(1)")
        .functions
        .iter()
        .any(|f| f.name == "proc"));
    assert_eq!(one("EXECUTE p(1)").executes.as_deref(), Some("p"));
    assert_eq!(one("PREPARE P AS SELECT 1").prepares.as_deref(), Some("p"));
    assert_eq!(one("DEALLOCATE p").deallocates.as_deref(), Some("p"));
    assert_eq!(one("DEALLOCATE ALL").deallocates.as_deref(), Some(""));
}

#[test]
fn statements_split_by_the_servers_string_rules() {
    let sql = r"SELECT 'a\'; DROP TABLE t; --'";
    let on = classify(sql, true).unwrap();
    assert_eq!(
        on.iter().map(|s| s.command).collect::<Vec<_>>(),
        ["select", "ddl"],
        "with standard_conforming_strings on, the backslash ends nothing"
    );
    let off = classify(sql, false).unwrap();
    assert_eq!(off.len(), 1, "off: the whole thing is one string literal");
    assert_eq!(
        classify("SELECT 1; SELECT * FROM secret", true)
            .unwrap()
            .len(),
        2
    );
    assert!(matches!(
        classify("SELEC 1", true),
        Err(SqlError::Syntax { .. })
    ));
}

/// Every relation name anywhere in the parse tree surfaces as an access, unless it names a
/// CTE: the walker has no statement kind it does not look into.
#[test]
fn no_relation_in_the_tree_is_missed() {
    let corpus = [
        "SELECT * FROM a JOIN b USING (id) LEFT JOIN LATERAL (SELECT * FROM c) x ON true",
        "SELECT (SELECT max(v) FROM d), array(SELECT 1 FROM e) FROM f",
        "INSERT INTO g (a) VALUES ((SELECT 1 FROM h)) ON CONFLICT (a) DO UPDATE SET a = (SELECT 2 FROM i)",
        "UPDATE j SET a = 1 WHERE id IN (SELECT id FROM k) RETURNING (SELECT 1 FROM l)",
        "DELETE FROM m WHERE EXISTS (SELECT FROM n)",
        "MERGE INTO o USING p ON o.id = p.id WHEN NOT MATCHED THEN INSERT VALUES (p.id)",
        "CREATE TABLE q (id int REFERENCES r, LIKE s)",
        "CREATE INDEX ON t (a)",
        "CREATE TRIGGER tr AFTER INSERT ON u FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE POLICY pol ON v USING (true)",
        "ALTER TABLE w ADD CONSTRAINT c FOREIGN KEY (a) REFERENCES x(a)",
        "ALTER TABLE y RENAME TO z2",
        "GRANT SELECT ON aa, bb TO public",
        "VACUUM cc",
        "CLUSTER dd USING idx",
        "REFRESH MATERIALIZED VIEW ee",
        "CREATE MATERIALIZED VIEW ff AS SELECT * FROM gg",
        "CREATE RULE r AS ON INSERT TO hh DO INSTEAD NOTHING",
        "LOCK TABLE ii, jj",
        "COMMENT ON TABLE kk IS 'x'",
        "ALTER TABLE ll ATTACH PARTITION mm FOR VALUES IN (1)",
        "CREATE TABLE nn PARTITION OF oo FOR VALUES IN (1)",
        "TABLE pp",
        "SELECT * FROM qq TABLESAMPLE SYSTEM (10)",
        "WITH cte AS (SELECT * FROM rr) INSERT INTO ss SELECT * FROM cte",
        "CREATE PUBLICATION pub FOR TABLE tt",
        "ANALYZE uu",
        "CREATE STATISTICS st ON a, b FROM vv",
        "SELECT * FROM ww FOR UPDATE OF ww",
    ];
    for sql in corpus {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
        let tree = serde_json::to_string(&serde_json::to_value(&parsed.protobuf).unwrap()).unwrap();
        let found: BTreeSet<String> = one(sql)
            .relations
            .iter()
            .map(|r| r.name.name.clone())
            .collect();
        let mut rest = tree.as_str();
        while let Some(at) = rest.find("\"relname\":\"") {
            rest = &rest[at + 11..];
            let name = &rest[..rest.find('"').unwrap()];
            if name != "cte" {
                assert!(
                    found.contains(name),
                    "{sql}: {name} missed; found {found:?}"
                );
            }
        }
    }
}

#[test]
fn the_shape_cache_shares_literal_variants_and_never_a_decision() {
    use std::sync::atomic::Ordering;
    let hits = || SHAPE_HITS.load(Ordering::Relaxed);
    let a = classify_cached("SELECT v FROM shape_t WHERE id = 1 AND n = 'x'", true).unwrap();
    let before = hits();
    let b = classify_cached(
        "select v  FROM shape_t WHERE id = 42 AND n = 'y' /* c */",
        true,
    )
    .unwrap();
    assert!(hits() > before, "a literal-only difference is a cache hit");
    assert_eq!(a, b);
    // A constant that decides the classification is never shared by shape.
    let safe = classify_cached(
        "SELECT set_config('work_mem', '1MB', false) FROM shape_u",
        true,
    )
    .unwrap();
    assert!(!safe[0].role_change);
    let role =
        classify_cached("SELECT set_config('role', '1MB', false) FROM shape_u", true).unwrap();
    assert!(role[0].role_change);
    assert!(!classify_cached("COPY shape_v TO STDOUT", true).unwrap()[0].server_files);
    assert!(classify_cached("COPY shape_v TO '/tmp/x'", true).unwrap()[0].server_files);
    let path = |v: &str| {
        let sql = format!("SELECT set_config('search_path', '{v}', false), x FROM shape_w");
        classify_cached(&sql, true).unwrap()[0].search_path.clone()
    };
    assert_eq!(path("a"), BTreeSet::from(["a".to_owned()]));
    assert_eq!(path("b"), BTreeSet::from(["b".to_owned()]));
    // Identifiers are not literals.
    let c = classify_cached("SELECT v FROM shape_t2 WHERE id = 1 AND n = 'x'", true).unwrap();
    assert_eq!(c[0].relations.iter().next().unwrap().name.name, "shape_t2");
    let q = classify_cached(r#"SELECT v FROM "shape_T" WHERE id = 1"#, true).unwrap();
    assert_eq!(q[0].relations.iter().next().unwrap().name.name, "shape_T");
    // With standard_conforming_strings off the split differs: never served by shape.
    let off = classify_cached(r"SELECT 'a\'; DELETE FROM shape_t; --'", false).unwrap();
    assert_eq!(off.len(), 1);
    let on = classify_cached(r"SELECT 'a\'; DELETE FROM shape_t; --'", true).unwrap();
    assert_eq!(on.len(), 2);
}

#[test]
fn pg_dumps_one_row_of_pg_settings_sets_that_setting() {
    let s = one(
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
         WHERE name = 'restrict_nonsystem_relation_kind'",
    );
    assert!(!s.role_change && s.setting_from_pg_settings);
    assert_eq!(
        s.parameters,
        BTreeSet::from(["restrict_nonsystem_relation_kind".to_owned()])
    );
    let s = one(
        "SELECT pg_catalog.set_config(name, 'x', false) FROM pg_catalog.pg_settings \
         WHERE name = 'Role'",
    );
    assert!(s.role_change, "the row named is role: a role change");
    // Anything more or other than the exact shape might reach another row or setting.
    for sql in [
        "SELECT set_config(name, 'x', false) FROM pg_settings",
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name <> 'work_mem'",
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' OR true",
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' UNION SELECT 'b'",
        "SELECT set_config(name, 'x', false) FROM pg_settings s WHERE name = 'a'",
        "SELECT set_config(name, 'x', false) FROM app.pg_settings WHERE name = 'a'",
        "SELECT set_config(name, 'x', false) FROM pg_settings, t WHERE name = 'a'",
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' GROUP BY name",
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name OPERATOR(public.=) 'a'",
        "SELECT set_config(lower(name), 'x', false) FROM pg_settings WHERE name = 'a'",
        "SELECT set_config(name, 'x', false), 1 FROM pg_settings WHERE name = 'a'",
        "WITH pg_settings AS (SELECT 'role' AS name) SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a'",
    ] {
        assert!(one(sql).role_change, "{sql}");
    }
}

#[test]
fn text_of_white_space_alone_classifies_as_nothing() {
    for sql in ["", " ", "\n\t\r\x0b\x0c "] {
        assert!(shape(sql).is_none(), "{sql:?}");
        assert!(classify_cached(sql, true).unwrap().is_empty(), "{sql:?}");
    }
    assert!(shape("-- only a comment").is_some());
}

#[test]
fn values_given_to_client_encoding_and_standard_conforming_strings_are_read() {
    use SettingValue::*;
    let v = |s: &str| Value(s.into());
    let enc = |sql: &str| one(sql).client_encoding;
    let scs = |sql: &str| one(sql).standard_conforming_strings;
    assert_eq!(enc("SET client_encoding = 'SJIS'"), [v("SJIS")]);
    assert_eq!(enc("SET client_encoding TO 'Shift_JIS'"), [v("Shift_JIS")]);
    assert_eq!(enc("SET NAMES 'big5'"), [v("big5")]);
    assert_eq!(enc("SET LOCAL client_encoding = gbk"), [v("gbk")]);
    assert_eq!(enc("SET client_encoding = 8"), [v("8")]);
    assert_eq!(enc("SET client_encoding TO DEFAULT"), [Default]);
    assert_eq!(enc("SET NAMES"), [Default]);
    assert_eq!(enc("RESET client_encoding"), [Default]);
    assert_eq!(
        enc("SELECT set_config('client_encoding', 'EUC_JP', false)"),
        [v("EUC_JP")]
    );
    assert_eq!(
        enc("SELECT pg_catalog.set_config('CLIENT_ENCODING', NULL, true)"),
        [Default]
    );
    assert_eq!(
        enc("SELECT set_config('client_encoding', $1, false)"),
        [Parameter(1)]
    );
    assert_eq!(
        enc("EXPLAIN ANALYZE SELECT set_config('client_encoding', $2, false)"),
        [Parameter(2)]
    );
    // $1 in a PREPARE's body is EXECUTE's argument, not a bound parameter.
    for sql in [
        "PREPARE p(text) AS SELECT set_config('client_encoding', $1, false)",
        "SELECT set_config('client_encoding', lower('SJIS'), false)",
        "SELECT set_config('client_encoding', $1::text, false)",
        "SELECT set_config('client_encoding')",
    ] {
        assert_eq!(enc(sql), [Unknown], "{sql}");
    }
    // Kept for later.
    assert_eq!(
        enc(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'LATIN1' \
             AS 'select 1'"
        ),
        [Stored("LATIN1".into())]
    );
    assert_eq!(
        enc("ALTER ROLE r SET client_encoding = 'LATIN2'"),
        [Stored("LATIN2".into())]
    );
    assert_eq!(
        enc("ALTER SYSTEM SET client_encoding = 'LATIN3'"),
        [Stored("LATIN3".into())]
    );
    assert_eq!(
        scs("ALTER SYSTEM SET standard_conforming_strings = on"),
        [Unknown]
    );
    assert_eq!(
        scs("ALTER DATABASE d SET standard_conforming_strings = on"),
        [Stored("on".into())]
    );
    assert_eq!(
        scs("CREATE FUNCTION f() RETURNS int LANGUAGE sql \
             SET standard_conforming_strings FROM CURRENT AS 'select 1'"),
        [Current]
    );
    // standard_conforming_strings, every way.
    assert_eq!(scs("SET standard_conforming_strings = on"), [v("on")]);
    assert_eq!(scs("SET standard_conforming_strings TO true"), [v("true")]);
    assert_eq!(scs("SET standard_conforming_strings = 1"), [v("1")]);
    assert_eq!(
        scs("SET LOCAL standard_conforming_strings = 'off'"),
        [v("off")]
    );
    assert_eq!(scs("RESET standard_conforming_strings"), [Default]);
    assert_eq!(scs("SET standard_conforming_strings TO DEFAULT"), [Default]);
    assert_eq!(
        scs("SELECT set_config('standard_conforming_strings', $1, false)"),
        [Parameter(1)]
    );
    // RESET ALL and DISCARD ALL go back to the login values.
    for sql in ["RESET ALL", "DISCARD ALL"] {
        assert_eq!(enc(sql), [Default], "{sql}");
        assert_eq!(scs(sql), [Default], "{sql}");
    }
    // A setting name that is not a constant could be either.
    let s = one("SELECT set_config(name, 'off', false) FROM pg_settings");
    assert_eq!(s.client_encoding, [IfThisSetting("off".into())]);
    assert_eq!(s.standard_conforming_strings, [IfThisSetting("off".into())]);
    let s = one("SET work_mem = '1MB'");
    assert!(s.client_encoding.is_empty() && s.standard_conforming_strings.is_empty());
    assert!(is_unsafe_encoding("Shift_JIS") && is_unsafe_encoding("windows-950"));
    assert!(!is_unsafe_encoding("EUC_JP") && !is_unsafe_encoding("nonsense"));
}

#[test]
fn booleans_read_as_postgresql_reads_a_setting() {
    for (text, value) in [
        ("on", Some(true)),
        ("ON", Some(true)),
        ("of", Some(false)),
        ("off", Some(false)),
        ("o", None),
        ("onn", None),
        ("t", Some(true)),
        ("TRU", Some(true)),
        ("truee", None),
        ("f", Some(false)),
        ("y", Some(true)),
        ("yes", Some(true)),
        ("n", Some(false)),
        ("no", Some(false)),
        ("1", Some(true)),
        ("0", Some(false)),
        ("01", None),
        (" on", None),
        ("on ", None),
        ("", None),
    ] {
        assert_eq!(parse_bool(text), value, "{text:?}");
    }
}

#[test]
fn names_outside_ascii_are_found_wherever_the_classification_holds_them() {
    for sql in [
        r#"SELECT * FROM "é""#,
        r#"SELECT * FROM "ß".t"#,
        "SELECT ü()",
        "SELECT s\u{e9}.f()",
        "SET search_path = 'schéma'",
        "SELECT set_config('search_path', 'a, \"b\u{e9}\"', false)",
        r#"SET "my.settïng" = 1"#,
        r#"PREPARE "pé" AS SELECT 1"#,
        r#"EXECUTE "pé""#,
        r#"DEALLOCATE "pé""#,
        r#"SELECT * FROM U&"\00e9""#,
    ] {
        assert!(one(sql).non_ascii_name().is_some(), "{sql}");
    }
    for sql in [
        "SELECT 'é', \"t\".v FROM t -- é",
        "SELECT /* ü */ 1",
        "SELECT $é$x$é$",
        r#"SELECT * FROM U&"\0074""#,
    ] {
        assert_eq!(one(sql).non_ascii_name(), None, "{sql}");
    }
}

#[test]
fn bound_parameters_replace_the_values_they_stand_for() {
    let s = one("SELECT set_config('client_encoding', $2, false), $1::int");
    assert!(s.needs_bind());
    let bound = s
        .bind(|n| Ok((n == 2).then(|| "LATIN9".to_owned())))
        .unwrap();
    assert!(!bound.needs_bind());
    assert_eq!(
        bound.client_encoding,
        [SettingValue::Value("LATIN9".into())]
    );
    let null = s.bind(|_| Ok(None)).unwrap();
    assert_eq!(null.client_encoding, [SettingValue::Default]);
    assert_eq!(s.bind(|_| Err("no".into())), Err("no".to_owned()));
    assert!(!one("SELECT set_config('work_mem', $1, false)").needs_bind());
}

#[test]
fn temporary_relations_are_noticed() {
    assert!(one("CREATE TEMP TABLE t (a int)").temp);
    assert!(one("SELECT 1 INTO TEMP t").temp);
    assert!(one("CREATE TABLE pg_temp.t (a int)").temp);
    assert!(!one("CREATE TABLE t (a int)").temp);
}

#[test]
fn commands() {
    for (sql, command) in [
        ("select 1", "select"),
        ("select 1 into t", "select_into"),
        ("begin", "transaction"),
        ("listen x", "listen"),
        ("notify x", "notify"),
        ("show work_mem", "show"),
        ("lock table t", "lock"),
        ("create table t(a int)", "ddl"),
        ("grant select on t to public", "ddl"),
    ] {
        assert_eq!(one(sql).command, command, "{sql}");
    }
    assert_eq!(rels("lock table t"), [r("t", Lock)]);
    assert_eq!(rels("grant select on t to public"), [r("t", Ddl)]);
}

#[test]
fn effects() {
    use Effect::*;
    for (sql, effect) in [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", None),
        ("select 1", None),
        (
            "SELECT * FROM a JOIN b USING (id) WHERE a.x IN (SELECT y FROM c)",
            None,
        ),
        ("show work_mem", None),
        ("begin", None),
        ("start transaction isolation level serializable", None),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            Transactional,
        ),
        ("INSERT INTO h (a) VALUES (1) RETURNING a", Transactional),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
             VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
            Transactional,
        ),
        (
            "DELETE FROM t WHERE id IN (SELECT id FROM u)",
            Transactional,
        ),
        // Functions are opaque; row locks are writes; so is anything else.
        ("select count(*) from t", Immediate),
        ("select nextval('s')", Immediate),
        ("select * from t for update", Immediate),
        (
            "select * from t where id in (select id from u for share)",
            Immediate,
        ),
        (
            "with d as (delete from t returning *) select * from d",
            Immediate,
        ),
        ("select 1 into t2", Immediate),
        ("insert into t values (now())", Immediate),
        ("commit", Commits),
        ("end", Commits),
        ("commit and chain", Commits),
        ("commit prepared 'x'", Immediate),
        ("prepare transaction 'x'", Immediate),
        ("rollback", Immediate),
        ("savepoint s", Immediate),
        ("set work_mem = '1MB'", Immediate),
        (
            "merge into t using u on t.a = u.a when matched then delete",
            Immediate,
        ),
        ("truncate t", Immediate),
        ("copy t from stdin", Immediate),
        ("explain select 1", Immediate),
        ("prepare p as select 1", Immediate),
        ("execute p", Immediate),
        ("declare c cursor for select 1", Immediate),
        ("create table t(a int)", Immediate),
    ] {
        assert_eq!(one(sql).effect, effect, "{sql}");
    }
}

#[test]
fn operators_and_casts_are_found_wherever_the_syntax_puts_them() {
    let ops = |sql: &str| -> Vec<String> {
        one(sql)
            .operators
            .iter()
            .map(|o| match &o.schema {
                Some(s) => format!("{s}.{}", o.name),
                None => o.name.clone(),
            })
            .collect()
    };
    assert_eq!(ops("SELECT 1 === 2"), ["==="]);
    assert_eq!(ops("SELECT 1 OPERATOR(s.===) 2"), ["s.==="]);
    assert_eq!(
        ops("SELECT * FROM t WHERE a = 1 AND b LIKE 'x%'"),
        ["=", "~~"]
    );
    assert_eq!(ops("SELECT * FROM t WHERE a IN (1, 2)"), ["="]);
    assert_eq!(
        ops("SELECT * FROM t WHERE a NOT IN (SELECT b FROM u)"),
        ["="]
    );
    assert_eq!(
        ops("SELECT * FROM t WHERE a <<< ANY (SELECT b FROM u)"),
        ["<<<"]
    );
    assert_eq!(ops("SELECT a BETWEEN 1 AND 2"), ["<", "<=", ">", ">="]);
    assert_eq!(ops("SELECT * FROM t ORDER BY a USING ~<~"), ["~<~"]);
    assert_eq!(ops("SELECT CASE a WHEN 1 THEN 2 END FROM t"), ["="]);
    assert_eq!(ops("SELECT -a FROM t"), ["-"]);
    // Inside what other statements carry.
    assert_eq!(ops("PREPARE p AS SELECT 1 #@# 2"), ["#@#"]);
    assert_eq!(ops("EXPLAIN SELECT 1 #@# 2"), ["#@#"]);
    assert_eq!(
        ops("UPDATE t SET a = a %% 2 WHERE b ~~~ 'x'"),
        ["%%", "~~~"]
    );
    assert!(ops("SELECT a FROM t").is_empty());

    let casts = |sql: &str| -> Vec<String> { one(sql).casts.into_iter().collect() };
    assert_eq!(casts("SELECT 'x'::mytype"), ["mytype"]);
    assert_eq!(casts("SELECT CAST(a AS s.\"Odd\") FROM t"), ["Odd"]);
    assert_eq!(casts("SELECT int4 '1'"), ["int4"]);
    assert_eq!(casts("SELECT a::text::mytype[] FROM t"), ["mytype", "text"]);
    assert!(casts("CREATE TABLE t2 (a mytype)").is_empty());
}

#[test]
fn names_looked_up_in_the_catalog_are_reads_of_it() {
    let reads = |sql: &str| -> Vec<String> {
        rels(sql)
            .into_iter()
            .filter(|(_, a)| *a == Access::Select)
            .map(|(n, _)| n)
            .collect()
    };
    assert_eq!(reads("SELECT 'secret'::regclass"), ["pg_catalog.pg_class"]);
    assert_eq!(
        reads("SELECT to_regclass('secret')"),
        ["pg_catalog.pg_class"]
    );
    assert_eq!(
        reads("SELECT pg_catalog.pg_get_viewdef('v')"),
        ["pg_catalog.pg_class", "pg_catalog.pg_rewrite"]
    );
    assert_eq!(reads("SELECT 'f'::regproc"), ["pg_catalog.pg_proc"]);
    assert_eq!(
        reads("SELECT has_schema_privilege('s', 'usage')"),
        ["pg_catalog.pg_namespace"]
    );
    // Another schema's function of that name is an ordinary function.
    assert!(reads("SELECT other.to_regclass('secret')").is_empty());
}
