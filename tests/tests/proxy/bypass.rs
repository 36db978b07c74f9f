//! The bypass suite: statements a restricted principal must not get past pgiam, each checked by
//! an oracle that asks the database itself (a canary table's contents, a secret in what came
//! back, `current_user` afterwards, an object's existence), never pgiam's error text.
//!
//! Every case runs twice: through pgiam as the restricted principal, where no oracle may fire,
//! and directly against PostgreSQL as the same role (which holds every privilege the attacks
//! need), where every oracle must fire. A case whose oracle cannot fire proves nothing, so the
//! direct run failing to fire is a test failure too.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use crate::fixture::*;

const SECRET: &str = "TOPSECRET";
const FILE_SECRET: &str = "FILESECRET";
/// A built-in setting's value (custom ones are not listed by SHOW ALL and pg_settings).
const SETTING_SECRET: &str = "SETTINGSECRET";

/// The principal may connect, read and add to `items`, read nothing else, call ordinary
/// functions and change ordinary settings. Nothing else.
const POLICY: &str = r#"
@id("connect")
permit(principal, action == PgIam::Action::"connect", resource == PgIam::Database::"app");
@id("items")
permit(principal, action in [PgIam::Action::"select", PgIam::Action::"insert",
                             PgIam::Action::"copy_in", PgIam::Action::"copy_out"],
       resource == PgIam::Table::"app.public.items");
@id("functions")
permit(principal, action == PgIam::Action::"execute", resource);
@id("not-reveal")
forbid(principal, action == PgIam::Action::"execute", resource)
  when { resource.name like "reveal*" };
@id("not-label-text")
forbid(principal, action == PgIam::Action::"execute", resource)
  when { context has overloads && context.overloads.contains("label(text, text)") };
@id("settings")
permit(principal, action == PgIam::Action::"set", resource);
@id("show-search-path")
permit(principal, action == PgIam::Action::"show", resource)
  when { context has parameter && context.parameter == "search_path" };
"#;

/// Statement classes the policy models apart from plain reads: reading a setting is `show`
/// however it is read (a database-level setting holds the secret), and row locks are `lock`,
/// not `select`, so a reader cannot block writers (the locker's xid stays in the rows' xmax
/// after it commits). Operators and casts run the functions the catalog says they do: the
/// forbidden `reveal*` functions behind `===` and the cast into `secret_box` read the secret,
/// and so does the overload of `label` the policy forbids by its signature.
/// Each runs as a simple Query and through the extended protocol, in both upstream modes.
const CLASSES: &[(&str, &str, Oracle)] = &[
    (
        "user-defined operator",
        "SELECT 1 === 2",
        Oracle::Leak(SECRET),
    ),
    (
        "operator in a where clause",
        "SELECT 1 === 2 FROM items WHERE 1 === 2 > ''",
        Oracle::Leak(SECRET),
    ),
    (
        "qualified operator",
        "SELECT 1 OPERATOR(other.===) 2",
        Oracle::Leak(SECRET),
    ),
    // One overload of `label` is forbidden, the other permitted: the call may run the
    // forbidden one (the same argument count), and only the policy's name for it says so.
    (
        "a forbidden overload",
        "SELECT label('a', 'b')",
        Oracle::Leak(SECRET),
    ),
    (
        "a forbidden overload in named notation",
        "SELECT public.label(b => 'b', a => 'a')",
        Oracle::Leak(SECRET),
    ),
    (
        "user-defined cast",
        "SELECT (1::secret_box).v",
        Oracle::Leak(SECRET),
    ),
    (
        "cast written with CAST",
        "SELECT CAST(1 AS public.secret_box)",
        Oracle::Leak(SECRET),
    ),
    // Names looked up in the catalog: the lookup is a read of the catalog table that answers
    // it, which the policy does not permit (the oracles fire when the lookup answers).
    (
        "regclass input",
        "SELECT CASE WHEN 'secret'::regclass IS NOT NULL THEN 'TOP' || 'SECRET' END",
        Oracle::Leak(SECRET),
    ),
    (
        "to_regclass",
        "SELECT CASE WHEN to_regclass('secret') IS NOT NULL THEN 'TOP' || 'SECRET' END",
        Oracle::Leak(SECRET),
    ),
    (
        "privilege of a named table",
        "SELECT CASE WHEN has_table_privilege('secret', 'select') THEN 'TOP' || 'SECRET' END",
        Oracle::Leak(SECRET),
    ),
    (
        "a view's definition by name",
        "SELECT pg_get_viewdef('secret_view')",
        Oracle::Leak("FROM secret"),
    ),
    (
        "show a setting",
        "SHOW pgiam_test.secret",
        Oracle::Leak(SECRET),
    ),
    ("show all", "SHOW ALL", Oracle::Leak(SETTING_SECRET)),
    (
        "current_setting",
        "SELECT current_setting('pgiam_test.secret')",
        Oracle::Leak(SECRET),
    ),
    (
        "qualified current_setting",
        "SELECT pg_catalog.current_setting('pgiam_test.secret', true)",
        Oracle::Leak(SECRET),
    ),
    (
        "pg_settings",
        "SELECT setting FROM pg_settings WHERE name = 'application_name'",
        Oracle::Leak(SETTING_SECRET),
    ),
    (
        "pg_show_all_settings",
        "SELECT setting FROM pg_show_all_settings() WHERE name = 'application_name'",
        Oracle::Leak(SETTING_SECRET),
    ),
    ("for update", "SELECT * FROM items FOR UPDATE", LOCKED),
    (
        "for no key update",
        "SELECT * FROM items FOR NO KEY UPDATE",
        LOCKED,
    ),
    ("for share", "SELECT * FROM items FOR SHARE", LOCKED),
    ("for key share", "SELECT * FROM items FOR KEY SHARE", LOCKED),
    (
        "for update of",
        "SELECT * FROM items i FOR UPDATE OF i NOWAIT",
        LOCKED,
    ),
    (
        "skip locked",
        "SELECT * FROM items FOR UPDATE SKIP LOCKED",
        LOCKED,
    ),
    (
        "locking subquery",
        "SELECT * FROM (SELECT * FROM items FOR UPDATE) s",
        LOCKED,
    ),
    (
        "locking cte",
        "WITH x AS (SELECT * FROM items FOR SHARE) SELECT * FROM x",
        LOCKED,
    ),
    // A sequence named by text is a relation the call touches: advancing it is an update
    // the policy must permit, whatever `execute` allows.
    ("nextval", "SELECT nextval('secret_seq')", SEQUENCE_MOVED),
    (
        "nextval quoted and qualified",
        r#"SELECT pg_catalog.nextval('PUBLIC."secret_seq"')"#,
        SEQUENCE_MOVED,
    ),
    (
        "nextval of a regclass",
        "SELECT nextval('secret_seq'::regclass)",
        SEQUENCE_MOVED,
    ),
    ("setval", "SELECT setval('secret_seq', 100)", SEQUENCE_MOVED),
    (
        "nextval of a computed name",
        "SELECT nextval('secret' || '_seq')",
        SEQUENCE_MOVED,
    ),
    (
        "nextval by oid",
        "SELECT nextval(('secret_seq'::regclass)::oid::regclass)",
        SEQUENCE_MOVED,
    ),
];

/// Rows of `items` carry a locker's transaction id.
const LOCKED: Oracle = Oracle::Exists("SELECT bool_or(xmax::text <> '0') FROM items");

/// `secret_seq` moved from where the reset left it (1, not yet called).
const SEQUENCE_MOVED: Oracle =
    Oracle::Exists("SELECT last_value <> 1 OR is_called FROM secret_seq");

/// What the database is asked afterwards.
#[derive(Clone, Copy, Debug)]
enum Oracle {
    /// `canary` still holds exactly its one row.
    Canary,
    /// Neither `canary` nor `items` changed (a pipeline's earlier work was rolled back).
    Untouched,
    /// What came back to the client contains this.
    Leak(&'static str),
    /// `current_user` in the same session afterwards is not the mapped role.
    Role,
    /// This query, as the superuser, says `t`.
    Exists(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// A simple Query.
    Q(&'static str),
    /// Parse/Bind/Execute/Sync (tokio-postgres).
    X(&'static str),
    /// Parse/Bind/Execute/Sync with one text parameter bound (tokio-postgres).
    Bound(&'static str, &'static str),
    /// COPY … TO STDOUT (tokio-postgres).
    CopyOut(&'static str),
    /// COPY … FROM STDIN with one row, `9` (tokio-postgres).
    CopyIn(&'static str),
    /// Parse/Bind/Execute for each statement, then one Sync, in one write (hand-driven).
    Pipeline(&'static [&'static str]),
    /// Simple Query messages in one write, without waiting between them (hand-driven).
    Queries(&'static [&'static str]),
    /// A FunctionCall message for this function with these text arguments (hand-driven).
    FunctionCall(&'static str, &'static [&'static str]),
}

struct Case {
    name: String,
    /// Startup `options`, for attacks made at connect time.
    options: Option<&'static str>,
    /// More startup parameters, for attacks made at connect time (raw steps only).
    params: &'static [(&'static str, &'static str)],
    steps: Vec<Step>,
    oracle: Oracle,
}

/// Single statements: each runs as a simple Query and through the extended protocol.
const STATEMENTS: &[(&str, &str, Oracle)] = &[
    ("delete", "DELETE FROM canary", Oracle::Canary),
    ("update", "UPDATE canary SET v = 2", Oracle::Canary),
    ("insert", "INSERT INTO canary VALUES (5)", Oracle::Canary),
    ("truncate", "TRUNCATE canary", Oracle::Canary),
    ("quoted", r#"DELETE FROM "canary""#, Oracle::Canary),
    ("qualified", "DELETE FROM public.canary", Oracle::Canary),
    ("upper case", "DELETE FROM PUBLIC.CANARY", Oracle::Canary),
    (
        "unicode escape",
        r#"DELETE FROM U&"c\0061nary""#,
        Oracle::Canary,
    ),
    ("comment", "DELETE/**/FROM/* x */canary", Oracle::Canary),
    (
        "writable cte",
        "WITH x AS (DELETE FROM canary RETURNING *) SELECT * FROM items",
        Oracle::Canary,
    ),
    (
        "cte shadowing the target",
        "WITH canary AS (SELECT 1) DELETE FROM canary",
        Oracle::Canary,
    ),
    (
        "merge",
        "MERGE INTO canary c USING items i ON c.v = i.id WHEN MATCHED THEN DELETE",
        Oracle::Canary,
    ),
    (
        "allowed insert, then a delete",
        "INSERT INTO items VALUES (3, 'x'); DELETE FROM canary",
        Oracle::Canary,
    ),
    (
        "explain analyze",
        "EXPLAIN ANALYZE DELETE FROM canary",
        Oracle::Canary,
    ),
    (
        "do block",
        "DO $$BEGIN DELETE FROM canary; END$$",
        Oracle::Canary,
    ),
    (
        "copy from program",
        "COPY canary FROM PROGRAM 'echo 7'",
        Oracle::Canary,
    ),
    ("rename", "ALTER TABLE canary RENAME TO c2", Oracle::Canary),
    ("drop", "DROP TABLE canary", Oracle::Canary),
    ("select", "SELECT * FROM secret", Oracle::Leak(SECRET)),
    (
        "select quoted",
        r#"SELECT * FROM "secret""#,
        Oracle::Leak(SECRET),
    ),
    (
        "select mixed case",
        "SELECT * FROM Public.SECRET",
        Oracle::Leak(SECRET),
    ),
    (
        "select unicode",
        r#"SELECT * FROM U&"s\0065cret""#,
        Oracle::Leak(SECRET),
    ),
    ("table", "TABLE secret", Oracle::Leak(SECRET)),
    ("only", "SELECT * FROM ONLY secret", Oracle::Leak(SECRET)),
    (
        "scalar subquery",
        "SELECT id, (SELECT v FROM secret) FROM items",
        Oracle::Leak(SECRET),
    ),
    (
        "lateral",
        "SELECT * FROM items, LATERAL (SELECT v FROM secret) s",
        Oracle::Leak(SECRET),
    ),
    (
        "union",
        "SELECT name FROM items UNION SELECT v FROM secret",
        Oracle::Leak(SECRET),
    ),
    (
        "cte",
        "WITH s AS (SELECT v FROM secret) SELECT * FROM s",
        Oracle::Leak(SECRET),
    ),
    (
        "cte named like an allowed table",
        "WITH items AS (SELECT v FROM secret) SELECT * FROM items",
        Oracle::Leak(SECRET),
    ),
    (
        "self-referencing cte",
        "WITH secret AS (SELECT * FROM secret) SELECT * FROM secret",
        Oracle::Leak(SECRET),
    ),
    (
        "recursive cte",
        "WITH RECURSIVE r(v) AS (SELECT v FROM secret UNION SELECT v FROM r) SELECT * FROM r",
        Oracle::Leak(SECRET),
    ),
    (
        "error message",
        "SELECT CAST(v AS int) FROM secret",
        Oracle::Leak(SECRET),
    ),
    ("view", "SELECT * FROM secret_view", Oracle::Leak(SECRET)),
    (
        "other schema",
        "SELECT * FROM other.items",
        Oracle::Leak(SECRET),
    ),
    (
        "dollar quoting",
        "SELECT $$';$$, v FROM secret",
        Oracle::Leak(SECRET),
    ),
    (
        "query_to_xml",
        "SELECT query_to_xml('select * from secret', true, true, '')",
        Oracle::Leak(SECRET),
    ),
    (
        "table_to_xml",
        "SELECT table_to_xml('secret', true, true, '')",
        Oracle::Leak(SECRET),
    ),
    (
        "ts_stat",
        "SELECT * FROM ts_stat('select to_tsvector(v) from secret')",
        Oracle::Leak("topsecret"),
    ),
    (
        "pg_read_file",
        "SELECT pg_read_file('pgiam_secret.txt')",
        Oracle::Leak(FILE_SECRET),
    ),
    (
        "qualified pg_read_file",
        "SELECT pg_catalog.pg_read_file('pgiam_secret.txt')",
        Oracle::Leak(FILE_SECRET),
    ),
    (
        "pg_read_binary_file",
        "SELECT convert_from(pg_read_binary_file('pgiam_secret.txt'), 'UTF8')",
        Oracle::Leak(FILE_SECRET),
    ),
    (
        "copy to program",
        "COPY (SELECT 1) TO PROGRAM 'touch pgiam_program_ran'",
        Oracle::Exists("SELECT (pg_stat_file('pgiam_program_ran', true)).size IS NOT NULL"),
    ),
    (
        "create table as",
        "CREATE TABLE evil AS SELECT 1 AS a",
        Oracle::Exists("SELECT to_regclass('public.evil') IS NOT NULL"),
    ),
    (
        "select into",
        "SELECT 1 AS a INTO evil2",
        Oracle::Exists("SELECT to_regclass('public.evil2') IS NOT NULL"),
    ),
    (
        "create view",
        "CREATE VIEW evil_view AS SELECT 1 AS a",
        Oracle::Exists("SELECT to_regclass('public.evil_view') IS NOT NULL"),
    ),
    (
        "create function",
        "CREATE FUNCTION evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        Oracle::Exists("SELECT to_regproc('public.evil') IS NOT NULL"),
    ),
    (
        "lo_import",
        "SELECT lo_import('/etc/passwd')",
        Oracle::Exists("SELECT count(*) > 0 FROM pg_largeobject_metadata"),
    ),
    ("set role", "SET ROLE admin_role", Oracle::Role),
    (
        "set session role",
        "SET SESSION ROLE admin_role",
        Oracle::Role,
    ),
    (
        "set_config role",
        "SELECT set_config('role', 'admin_role', false)",
        Oracle::Role,
    ),
    (
        "set_config ROLE",
        "SELECT set_config('ROLE', 'admin_role', false)",
        Oracle::Role,
    ),
    (
        "qualified set_config",
        "SELECT pg_catalog.set_config('role', 'admin_role', false)",
        Oracle::Role,
    ),
    (
        "computed set_config",
        "SELECT set_config(lower('ROLE'), 'admin_role', false)",
        Oracle::Role,
    ),
];

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for &(name, sql, oracle) in STATEMENTS.iter().chain(CLASSES) {
        let single = !sql.contains("; ");
        // The extended protocol's Parse takes one statement.
        for (route, step) in [("simple", Step::Q(sql)), ("extended", Step::X(sql))] {
            if route == "extended" && !single {
                continue;
            }
            out.push(Case {
                name: format!("{name} ({route})"),
                options: None,
                params: &[],
                steps: vec![step],
                oracle,
            });
        }
    }
    let mut case = |name: &str, options, steps: Vec<Step>, oracle| {
        out.push(Case {
            name: name.to_owned(),
            options,
            params: &[],
            steps,
            oracle,
        })
    };
    use Step::*;
    case(
        "multi-statement string",
        None,
        vec![Q("SELECT 1; DELETE FROM canary")],
        Oracle::Canary,
    );
    case(
        "statement hidden by a backslash",
        None,
        vec![Q(r"SELECT 'a\'; DELETE FROM canary; --'")],
        Oracle::Canary,
    );
    case(
        "string rules restored after SET LOCAL",
        None,
        vec![
            Q("BEGIN"),
            Q("SET LOCAL standard_conforming_strings = off"),
            Q("COMMIT"),
            Q(r"SELECT 'a\'; DELETE FROM canary; --'"),
        ],
        Oracle::Canary,
    );
    // In SJIS, 0x95 0x5C is one character: the backslash pgiam reads as escaping the quote is
    // not one for the server, which then ends the string and runs the DELETE.
    case(
        "client_encoding SJIS hides a backslash",
        None,
        vec![
            Q("SET client_encoding = 'SJIS'"),
            Q("SELECT E'\u{3055}\\'; DELETE FROM canary; --'"),
        ],
        Oracle::Canary,
    );
    // Under standard_conforming_strings = off, 'a\' , ' is one string and the subquery runs;
    // under on it is two strings. The server reports the change once it has run it, when the
    // statement pipelined behind it is already on its way.
    case(
        "standard_conforming_strings changed ahead of a pipelined statement",
        None,
        vec![Queries(&[
            "SET standard_conforming_strings = off",
            r"SELECT 'a\' , ' , (SELECT v FROM secret) --'",
        ])],
        Oracle::Leak(SECRET),
    );
    case(
        "client_encoding via set_config",
        None,
        vec![
            Q("SELECT set_config('client_encoding', 'SJIS', false)"),
            Q("SELECT E'\u{3055}\\'; DELETE FROM canary; --'"),
        ],
        Oracle::Canary,
    );
    case(
        "sql prepare then execute",
        None,
        vec![Q("PREPARE p AS DELETE FROM canary"), Q("EXECUTE p")],
        Oracle::Canary,
    );
    case(
        "prepare and execute in one string",
        None,
        vec![Q("PREPARE p AS DELETE FROM canary; EXECUTE p")],
        Oracle::Canary,
    );
    case(
        "prepared name reused after deallocate",
        None,
        vec![
            Q("PREPARE q AS SELECT 1"),
            Q("DEALLOCATE q"),
            Q("PREPARE q AS DELETE FROM canary"),
            Q("EXECUTE q"),
        ],
        Oracle::Canary,
    );
    case(
        "protocol parse of sql prepare",
        None,
        vec![X("PREPARE p AS DELETE FROM canary"), Q("EXECUTE p")],
        Oracle::Canary,
    );
    case(
        "sql prepare then protocol execute",
        None,
        vec![Q("PREPARE p AS DELETE FROM canary"), X("EXECUTE p")],
        Oracle::Canary,
    );
    case(
        "transaction block",
        None,
        vec![Q("BEGIN"), Q("DELETE FROM canary"), Q("COMMIT")],
        Oracle::Canary,
    );
    case(
        "cursor",
        None,
        vec![
            Q("BEGIN"),
            Q("DECLARE c CURSOR FOR SELECT * FROM secret"),
            Q("FETCH ALL FROM c"),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "cursor through the extended protocol",
        None,
        vec![
            Q("BEGIN"),
            X("DECLARE c CURSOR FOR SELECT * FROM secret"),
            X("FETCH ALL FROM c"),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "copy out",
        None,
        vec![CopyOut("COPY secret TO STDOUT")],
        Oracle::Leak(SECRET),
    );
    case(
        "copy in",
        None,
        vec![CopyIn("COPY canary FROM STDIN")],
        Oracle::Canary,
    );
    case(
        "copy in, quoted and qualified",
        None,
        vec![CopyIn(r#"COPY public."canary" (v) FROM STDIN"#)],
        Oracle::Canary,
    );
    case(
        "copy out of a query",
        None,
        vec![CopyOut("COPY (SELECT * FROM secret) TO STDOUT")],
        Oracle::Leak(SECRET),
    );
    case(
        "pipeline: refused statement after an allowed insert",
        None,
        vec![Pipeline(&[
            "INSERT INTO items VALUES (2, 'two')",
            "DELETE FROM canary",
        ])],
        Oracle::Untouched,
    );
    case(
        "pipeline: refused statement first",
        None,
        vec![Pipeline(&[
            "DELETE FROM canary",
            "INSERT INTO items VALUES (2, 'two')",
        ])],
        Oracle::Untouched,
    );
    case(
        "pipeline: read of a secret",
        None,
        vec![Pipeline(&[
            "SELECT name FROM items",
            "SELECT v FROM secret",
        ])],
        Oracle::Leak(SECRET),
    );
    case(
        "function call: pg_read_file",
        None,
        vec![FunctionCall(
            "pg_catalog.pg_read_file(text)",
            &["pgiam_secret.txt"],
        )],
        Oracle::Leak(FILE_SECRET),
    );
    case(
        "function call: set_config role",
        None,
        vec![FunctionCall(
            "pg_catalog.set_config(text,text,boolean)",
            &["role", "admin_role", "false"],
        )],
        Oracle::Role,
    );
    case(
        "set local role in a transaction",
        None,
        vec![Q("BEGIN"), Q("SET LOCAL ROLE admin_role")],
        Oracle::Role,
    );
    // search_path: `other.items` holds the secret; `items` under the starting path (public) is
    // allowed. Every search_path a session asks for is searched, whichever is in force.
    for (route, set, read) in [
        (
            "simple",
            Q as fn(&'static str) -> Step,
            Q as fn(&'static str) -> Step,
        ),
        ("extended", X, X),
    ] {
        let mut both = |name: &str, steps: Vec<Step>| {
            case(
                &format!("{name} ({route})"),
                None,
                steps,
                Oracle::Leak(SECRET),
            )
        };
        both(
            "search_path set, then an unqualified name",
            vec![set("SET search_path = other"), read("SELECT * FROM items")],
        );
        both(
            "search_path set to a list",
            vec![
                set(r#"SET search_path TO "other", public"#),
                read("SELECT * FROM items"),
            ],
        );
        both(
            "SET SCHEMA",
            vec![set("SET SCHEMA 'other'"), read("SELECT * FROM items")],
        );
        both(
            "set_config search_path",
            vec![
                set("SELECT set_config('search_path', 'other', false)"),
                read("SELECT * FROM items"),
            ],
        );
        both(
            "search_path reset to the one chosen at startup",
            vec![
                set("SET search_path = public"),
                set("RESET search_path"),
                read("SELECT * FROM items"),
            ],
        );
        both(
            "SET LOCAL search_path",
            vec![
                Q("BEGIN"),
                set("SET LOCAL search_path = other"),
                read("SELECT * FROM items"),
            ],
        );
        both(
            "set_config search_path, local",
            vec![
                Q("BEGIN"),
                set("SELECT set_config('search_path', 'other', true)"),
                read("SELECT * FROM items"),
            ],
        );
        both(
            "search_path set in a transaction that rolls back",
            vec![
                Q("BEGIN"),
                set("SET search_path = other"),
                read("SELECT * FROM items"),
                Q("ROLLBACK"),
            ],
        );
        both(
            "search_path set before a savepoint rolled back to",
            vec![
                Q("BEGIN"),
                set("SET search_path = other"),
                Q("SAVEPOINT s"),
                Q("SELECT 1/0"),
                Q("ROLLBACK TO SAVEPOINT s"),
                read("SELECT * FROM items"),
            ],
        );
        both(
            "search_path through a prepared set_config",
            vec![
                Q("PREPARE sp AS SELECT set_config('search_path', 'other', false)"),
                set("EXECUTE sp"),
                read("SELECT * FROM items"),
            ],
        );
    }
    // The RESET cases' startup choice.
    for c in out
        .iter_mut()
        .filter(|c| c.name.starts_with("search_path reset to"))
    {
        c.options = Some("-c search_path=other");
    }
    let mut case = |name: &str, options, steps: Vec<Step>, oracle| {
        out.push(Case {
            name: name.to_owned(),
            options,
            params: &[],
            steps,
            oracle,
        })
    };
    case(
        "search_path set ahead in the same query string",
        None,
        vec![Q("SET search_path = other; SELECT * FROM items")],
        Oracle::Leak(SECRET),
    );
    case(
        "search_path set ahead in a pipeline of queries",
        None,
        vec![Queries(&["SET search_path = other", "SELECT * FROM items"])],
        Oracle::Leak(SECRET),
    );
    case(
        "search_path set ahead in an extended-protocol pipeline",
        None,
        vec![Pipeline(&[
            "SET search_path = other",
            "SELECT * FROM items",
        ])],
        Oracle::Leak(SECRET),
    );
    case(
        "set_config search_path ahead in an extended-protocol pipeline",
        None,
        vec![Pipeline(&[
            "SELECT set_config('search_path', 'other', false)",
            "SELECT * FROM items",
        ])],
        Oracle::Leak(SECRET),
    );
    case(
        "search_path through a cursor",
        None,
        vec![
            Q("BEGIN"),
            Q("DECLARE c CURSOR FOR SELECT set_config('search_path', 'other', false)"),
            Q("FETCH ALL FROM c"),
            Q("SELECT * FROM items"),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "set_config search_path with a bound parameter",
        None,
        vec![
            Bound("SELECT set_config('search_path', $1, false)", "other"),
            X("SELECT * FROM items"),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "set_config search_path with a computed value",
        None,
        vec![
            Q("SELECT set_config('search_path', lower('OTHER'), false)"),
            Q("SELECT * FROM items"),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "function call: set_config search_path",
        None,
        vec![
            FunctionCall(
                "pg_catalog.set_config(text,text,boolean)",
                &["search_path", "other", "false"],
            ),
            Queries(&["SELECT * FROM items"]),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "a function's SET search_path clause",
        None,
        vec![
            Q("CREATE FUNCTION leak() RETURNS SETOF text LANGUAGE sql \
               SET search_path = other AS 'SELECT name FROM items'"),
            Q("SELECT leak()"),
        ],
        Oracle::Leak(SECRET),
    );
    case(
        "search_path at startup",
        Some("-c search_path=other"),
        vec![Q("SELECT * FROM items")],
        Oracle::Leak(SECRET),
    );
    case(
        "search_path at startup, quoted",
        Some(r#"-c search_path=\"other\""#),
        vec![X("SELECT * FROM items")],
        Oracle::Leak(SECRET),
    );
    out.push(Case {
        name: "search_path startup parameter".into(),
        options: None,
        params: &[("search_path", "other")],
        steps: vec![Queries(&["SELECT * FROM items"])],
        oracle: Oracle::Leak(SECRET),
    });
    let mut case = |name: &str, options, steps: Vec<Step>, oracle| {
        out.push(Case {
            name: name.to_owned(),
            options,
            params: &[],
            steps,
            oracle,
        })
    };
    case(
        "role at startup",
        Some("-c role=admin_role"),
        vec![Q("SELECT 1")],
        Oracle::Role,
    );
    out
}

/// A connection, either through pgiam or straight to PostgreSQL.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

struct Target<'a> {
    env: &'a Env,
    direct: bool,
    /// Directly: log in as the gateway role and SET ROLE to the mapped one, as pgiam does in
    /// gateway mode.
    gateway: bool,
}

impl Target<'_> {
    fn login(&self) -> &'static str {
        if self.direct && self.gateway {
            GATEWAY_ROLE
        } else {
            ROLE
        }
    }

    fn dsn(&self, options: Option<&str>) -> String {
        let options = options
            .map(|o| format!(" options='{o}'"))
            .unwrap_or_default();
        if self.direct {
            format!(
                "host={} port={} dbname={DB} user={}{options}",
                self.env.pg.socket_dir.display(),
                self.env.pg.port,
                self.login()
            )
        } else {
            self.env.tcp_dsn(&options)
        }
    }

    fn raw(&self, params: &[(&str, &str)]) -> Box<dyn Stream> {
        let mut s: Box<dyn Stream> = if self.direct {
            let path = self
                .env
                .pg
                .socket_dir
                .join(format!(".s.PGSQL.{}", self.env.pg.port));
            let s = std::os::unix::net::UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            Box::new(s)
        } else {
            let s = std::net::TcpStream::connect(self.env.tcp).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            Box::new(s)
        };
        let mut startup = vec![("user", ROLE), ("database", DB)];
        startup.extend_from_slice(params);
        s.write_all(&Raw::startup_bytes(3 << 16, &startup)).unwrap();
        until_ready(&mut s);
        s
    }
}

fn read_message(s: &mut dyn Stream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).expect("server closed");
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).unwrap();
    (header[0], body)
}

/// Everything up to ReadyForQuery, as text (rows, errors, function results).
fn until_ready(s: &mut dyn Stream) -> String {
    let mut text = String::new();
    loop {
        let (tag, body) = read_message(s);
        if matches!(tag, b'D' | b'E' | b'V' | b'd') {
            text.push_str(&String::from_utf8_lossy(&body));
            text.push('\n');
        }
        if tag == b'Z' {
            return text;
        }
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn pipeline(statements: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for sql in statements {
        out.extend(message(b'P', &[cstr(""), cstr(sql), vec![0, 0]].concat()));
        out.extend(message(
            b'B',
            &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat(),
        ));
        out.extend(message(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
    }
    out.extend(message(b'S', &[]));
    out
}

fn function_call(oid: u32, args: &[&str]) -> Vec<u8> {
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&[0, 1, 0, 0]); // one format code: text
    body.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        body.extend_from_slice(&(a.len() as i32).to_be_bytes());
        body.extend_from_slice(a.as_bytes());
    }
    body.extend_from_slice(&[0, 0]); // result in text
    message(b'F', &body)
}

/// Any column, as the bytes the server sent (text or binary), so that nothing a row carries is
/// missed by the oracle.
struct AnyValue(String);

impl<'a> tokio_postgres::types::FromSql<'a> for AnyValue {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyValue(String::from_utf8_lossy(raw).into_owned()))
    }

    fn from_sql_null(
        _: &tokio_postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyValue(String::new()))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

fn rows_text(rows: &[tokio_postgres::Row]) -> String {
    rows.iter()
        .flat_map(|r| (0..r.len()).map(move |i| r.get::<_, AnyValue>(i).0))
        .collect::<Vec<_>>()
        .join("\t")
}

fn simple_text(messages: &[SimpleQueryMessage]) -> String {
    let mut text = String::new();
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            for i in 0..row.len() {
                text.push_str(row.get(i).unwrap_or(""));
                text.push('\t');
            }
            text.push('\n');
        }
    }
    text
}

/// Runs a case's steps on one session; returns what came back and `current_user` afterwards.
async fn attack(target: &Target<'_>, case: &Case) -> (String, Option<String>) {
    let raw_only = case.steps.iter().all(|s| {
        matches!(
            s,
            Step::Pipeline(_) | Step::Queries(_) | Step::FunctionCall(..)
        )
    });
    if raw_only {
        let mut s = target.raw(case.params);
        let mut text = String::new();
        for step in &case.steps {
            match *step {
                Step::Pipeline(statements) => s.write_all(&pipeline(statements)).unwrap(),
                Step::Queries(queries) => {
                    let all: Vec<u8> = queries
                        .iter()
                        .flat_map(|q| message(b'Q', &cstr(q)))
                        .collect();
                    s.write_all(&all).unwrap();
                    for _ in 1..queries.len() {
                        text.push_str(&until_ready(&mut s));
                    }
                }
                Step::FunctionCall(signature, args) => {
                    let oid: u32 = target
                        .env
                        .pg
                        .psql_db(DB, &format!("SELECT '{signature}'::regprocedure::oid"))
                        .unwrap()
                        .parse()
                        .unwrap();
                    s.write_all(&function_call(oid, args)).unwrap();
                }
                _ => unreachable!(),
            }
            text.push_str(&until_ready(&mut s));
        }
        s.write_all(&message(b'Q', &cstr("SELECT current_user")))
            .unwrap();
        let user = until_ready(&mut s);
        return (text, Some(user));
    }
    let dsn = target.dsn(case.options);
    let client = match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Err(e) => return (format!("connect: {e}"), None),
    };
    if target.direct && target.gateway {
        client
            .simple_query(&format!("SET ROLE {ROLE}"))
            .await
            .unwrap();
    }
    let mut text = String::new();
    for step in &case.steps {
        let r: Result<String, tokio_postgres::Error> = match *step {
            Step::Q(sql) => client.simple_query(sql).await.map(|m| simple_text(&m)),
            Step::X(sql) => client.query(sql, &[]).await.map(|rows| rows_text(&rows)),
            Step::Bound(sql, value) => client
                .query(sql, &[&value])
                .await
                .map(|rows| rows_text(&rows)),
            Step::CopyOut(sql) => match client.copy_out(sql).await {
                Ok(stream) => {
                    use futures_util::TryStreamExt;
                    let chunks: Result<Vec<bytes::Bytes>, _> = stream.try_collect().await;
                    chunks.map(|c| String::from_utf8_lossy(&c.concat()).into_owned())
                }
                Err(e) => Err(e),
            },
            Step::CopyIn(sql) => copy_in(&client, sql).await,
            _ => unreachable!("raw steps are not mixed with client steps"),
        };
        match r {
            Ok(t) => text.push_str(&t),
            Err(e) => {
                // The server's own words, detail included: a secret can leak through an error.
                text.push_str(&format!("error: {e:?}\n"));
            }
        }
    }
    let user = client
        .simple_query("SELECT current_user")
        .await
        .ok()
        .map(|m| simple_text(&m));
    (text, user)
}

async fn copy_in(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"9\n")).await?;
    sink.finish().await.map(|n| format!("{n} rows copied"))
}

fn reset(env: &Env) {
    env.pg
        .psql_db(
            DB,
            &format!(
                "DROP TABLE IF EXISTS canary, c2, evil, evil2 CASCADE; \
                 DROP VIEW IF EXISTS evil_view; DROP FUNCTION IF EXISTS evil(); \
                 DROP FUNCTION IF EXISTS leak(); \
                 CREATE TABLE canary (v int); INSERT INTO canary VALUES (1); \
                 ALTER TABLE canary OWNER TO {ROLE}; \
                 DELETE FROM items; INSERT INTO items VALUES (1, 'one'); \
                 SELECT count(lo_unlink(oid)) FROM pg_largeobject_metadata; \
                 SELECT setval('secret_seq', 1, false)"
            ),
        )
        .unwrap();
    let _ = std::fs::remove_file(env.pg.data_dir.join("pgiam_program_ran"));
}

/// Did the attack work?
fn fired(env: &Env, oracle: Oracle, text: &str, user: Option<&str>) -> bool {
    let q = |sql: &str| env.pg.psql_db(DB, sql).unwrap_or_else(|e| format!("{e}"));
    match oracle {
        Oracle::Canary => q("SELECT string_agg(v::text, ',') FROM canary") != "1",
        Oracle::Untouched => {
            q("SELECT string_agg(v::text, ',') FROM canary") != "1"
                || q("SELECT string_agg(id::text, ',') FROM items") != "1"
        }
        Oracle::Leak(needle) => text.contains(needle),
        Oracle::Role => user.is_some_and(|u| !u.contains(ROLE)),
        Oracle::Exists(sql) => q(sql) == "t",
    }
}

fn prepare(env: &Env) {
    env.pg
        .psql(&format!(
            "CREATE ROLE admin_role NOLOGIN; GRANT admin_role TO {ROLE}; \
             GRANT pg_read_server_files, pg_execute_server_program TO {ROLE}"
        ))
        .unwrap();
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE SCHEMA other; \
                 CREATE TABLE items (id int, name text); \
                 CREATE TABLE secret (v text); INSERT INTO secret VALUES ('{SECRET}'); \
                 CREATE VIEW secret_view AS SELECT * FROM secret; \
                 CREATE TABLE other.items (id int, name text); \
                 INSERT INTO other.items VALUES (1, '{SECRET}'); \
                 GRANT ALL ON ALL TABLES IN SCHEMA public, other TO {ROLE}; \
                 GRANT EXECUTE ON FUNCTION pg_read_file(text), pg_read_binary_file(text), \
                   lo_import(text) TO {ROLE}; \
                 GRANT USAGE, CREATE ON SCHEMA public, other TO {ROLE}; \
                 CREATE SEQUENCE secret_seq; GRANT ALL ON SEQUENCE secret_seq TO {ROLE}; \
                 CREATE FUNCTION reveal(int, int) RETURNS text LANGUAGE sql \
                   AS 'SELECT v FROM secret'; \
                 CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = reveal); \
                 CREATE FUNCTION other.reveal_other(int, int) RETURNS text LANGUAGE sql \
                   AS 'SELECT v FROM public.secret'; \
                 CREATE OPERATOR other.=== (LEFTARG = int, RIGHTARG = int, \
                   FUNCTION = other.reveal_other); \
                 CREATE TYPE secret_box AS (v text); \
                 CREATE FUNCTION reveal_box(int) RETURNS secret_box LANGUAGE sql \
                   AS 'SELECT ROW(v)::secret_box FROM secret'; \
                 CREATE CAST (int AS secret_box) WITH FUNCTION reveal_box(int); \
                 CREATE FUNCTION label(int) RETURNS text LANGUAGE sql AS 'SELECT ''label'''; \
                 CREATE FUNCTION label(a text, b text) RETURNS text LANGUAGE sql \
                   AS 'SELECT v FROM secret'"
            ),
        )
        .unwrap();
    // A secret held in a setting, as an application's database-level custom setting would be.
    env.pg
        .psql(&format!(
            "ALTER DATABASE {DB} SET pgiam_test.secret = '{SECRET}'; \
             ALTER DATABASE {DB} SET application_name = '{SETTING_SECRET}'"
        ))
        .unwrap();
    let file = env.pg.data_dir.join("pgiam_secret.txt");
    std::fs::write(&file, FILE_SECRET).unwrap();
}

#[test]
fn no_bypass_through_pgiam_and_every_oracle_fires_directly() {
    let env = Env::with(Setup {
        policy: POLICY.into(),
        ..Setup::default()
    });
    prepare(&env);
    let cases = cases();
    assert!(cases.len() >= 80, "{} cases", cases.len());
    eprintln!(
        "bypass suite: {} cases, each through pgiam and directly",
        cases.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    run_cases(&rt, &env, &cases, false).assert_clean();
    // What the policy allows still works through every route.
    reset(&env);
    let dsn = env.tcp_dsn("");
    rt.block_on(async {
        let client = tokio_client(&dsn).await;
        assert_eq!(
            simple_text(&client.simple_query("SELECT name FROM items").await.unwrap()),
            "one\t\n"
        );
        let row = client
            .query_one("SELECT name FROM items WHERE id = $1", &[&1i32])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "one");
        client
            .execute("INSERT INTO items VALUES ($1, 'two')", &[&2i32])
            .await
            .unwrap();
        assert_eq!(
            copy_in(&client, "COPY items (id) FROM STDIN")
                .await
                .unwrap(),
            "1 rows copied"
        );
        use futures_util::TryStreamExt;
        let out: Vec<bytes::Bytes> = client
            .copy_out("COPY (SELECT id FROM items ORDER BY id) TO STDOUT")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out.concat(), b"1\n2\n9\n");
        client
            .batch_execute("PREPARE mine AS SELECT count(*) FROM items")
            .await
            .unwrap();
        assert_eq!(
            simple_text(&client.simple_query("EXECUTE mine").await.unwrap()),
            "3\t\n"
        );
        assert_eq!(client.query("EXECUTE mine", &[]).await.unwrap().len(), 1);
        client
            .batch_execute(
                "BEGIN; DECLARE c CURSOR FOR SELECT id FROM items; FETCH 1 FROM c; COMMIT",
            )
            .await
            .unwrap();
        // The same unqualified name, under the starting path however it is set.
        for set in [
            "SET search_path = public",
            "SET search_path TO \"public\"",
            "SET SCHEMA 'public'",
            "RESET search_path",
            "SET search_path TO DEFAULT",
            "SELECT set_config('search_path', 'public', false)",
            "BEGIN; SET LOCAL search_path = public; COMMIT",
            "SELECT pg_catalog.set_config('search_path', '', false)",
        ] {
            client.batch_execute(set).await.unwrap();
            client.batch_execute("RESET search_path").await.unwrap();
            let rows = client
                .query("SELECT count(*) FROM items", &[])
                .await
                .unwrap_or_else(|e| panic!("after {set}: {e}"));
            assert_eq!(rows[0].get::<_, i64>(0), 3, "after {set}");
            assert_eq!(
                simple_text(
                    &client
                        .simple_query("SET search_path = public; SELECT count(*) FROM items")
                        .await
                        .unwrap_or_else(|e| panic!("after {set}: {e}"))
                ),
                "3\t\n"
            );
        }
    });
    // Chosen at startup, as a parameter or in options, it is the session's, and RESET goes
    // back to it.
    assert_eq!(
        psql_ok(
            &env.tcp_dsn("options='-c search_path=other,public'"),
            "SET search_path = public; RESET search_path; SHOW search_path"
        ),
        "SET\nRESET\nother,public"
    );
    assert_eq!(
        psql_ok(
            &env.tcp_dsn("options='-c search_path=public'"),
            "SELECT name FROM items WHERE id = 1"
        ),
        "one"
    );
    let mut raw = Raw::connect(env.tcp);
    raw.send(&Raw::startup_bytes(
        3 << 16,
        &[("user", "x"), ("database", DB), ("search_path", "Public")],
    ));
    raw.until_ready();
    raw.send(&query_bytes("SELECT name FROM items WHERE id = 1"));
    let answer = raw.until_ready();
    assert!(
        answer
            .iter()
            .any(|(t, b)| *t == b'D' && b.ends_with(b"one")),
        "{answer:?}"
    );

    // Every refusal was pgiam's, recorded, and the file still verifies.
    let denies = env
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "statement" && r["decision"] == "deny")
        .count();
    assert!(denies >= cases.len() / 2, "{denies} deny records");
    let (ok, out) = verify(&env.audit_path());
    assert!(ok, "{out}");
}

/// Where the server's search_path could come from without pgiam seeing it: the role's default
/// (ALTER ROLE … SET search_path), which RESET would return to, and `$user`. pgiam always
/// sends the path a session starts with, so a role default never applies through it; `$user`
/// is the session's role.
#[test]
fn search_paths_pgiam_did_not_choose_never_apply() {
    let env = Env::with(Setup {
        policy: POLICY.into(),
        ..Setup::default()
    });
    prepare(&env);
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE SCHEMA {ROLE} AUTHORIZATION {ROLE}; \
                 CREATE TABLE {ROLE}.items (id int, name text); \
                 INSERT INTO {ROLE}.items VALUES (1, '{SECRET}'); \
                 GRANT ALL ON {ROLE}.items TO {ROLE}; \
                 ALTER ROLE {ROLE} IN DATABASE {DB} SET search_path = other"
            ),
        )
        .unwrap();
    use Step::*;
    let cases = [
        ("the role's default", vec![Q("SELECT * FROM items")]),
        (
            "RESET to the role's default",
            vec![
                Q("SET search_path = public"),
                Q("RESET search_path"),
                Q("SELECT * FROM items"),
            ],
        ),
        (
            "RESET ALL to the role's default",
            vec![Q("RESET ALL"), X("SELECT * FROM items")],
        ),
        (
            "$user",
            vec![Q(r#"SET search_path = "$user""#), Q("SELECT * FROM items")],
        ),
        (
            "$user in set_config",
            vec![
                Q("SELECT set_config('search_path', '$USER, public', false)"),
                X("SELECT * FROM items"),
            ],
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut verdicts = Verdicts::default();
    for (name, steps) in cases {
        let case = Case {
            name: name.to_string(),
            options: None,
            params: &[],
            steps,
            oracle: Oracle::Leak(SECRET),
        };
        for direct in [false, true] {
            reset(&env);
            let target = Target {
                env: &env,
                direct,
                gateway: false,
            };
            let (text, user) = rt.block_on(attack(&target, &case));
            let fired = fired(&env, case.oracle, &text, user.as_deref());
            verdicts.judge(direct, fired, || format!("{name}: {text}"));
        }
    }
    verdicts.assert_clean();
    // Through pgiam the session starts, and RESETs back to, the configured path.
    assert_eq!(
        psql_ok(
            &env.tcp_dsn(""),
            "SHOW search_path; RESET search_path; SHOW search_path; SELECT name FROM items"
        ),
        "public\nRESET\npublic\none"
    );
}

/// pg_dump's first statement is `SELECT pg_catalog.set_config('search_path', '', false)`:
/// under a policy that allows what it does, a dump through pgiam works.
#[test]
fn pg_dump_through_pgiam() {
    let env = Env::start();
    env.pg
        .psql_db(
            DB,
            &format!(
                "CREATE SCHEMA dumped AUTHORIZATION {ROLE}; \
                 CREATE TABLE dumped.accounts (id int PRIMARY KEY, owner text); \
                 INSERT INTO dumped.accounts VALUES (1, 'alice'), (2, 'bob'); \
                 CREATE VIEW dumped.owners AS SELECT owner FROM dumped.accounts; \
                 CREATE SEQUENCE dumped.ids; \
                 ALTER TABLE dumped.accounts OWNER TO {ROLE}; \
                 ALTER VIEW dumped.owners OWNER TO {ROLE}; \
                 ALTER SEQUENCE dumped.ids OWNER TO {ROLE}"
            ),
        )
        .unwrap();
    let out = Command::new(pgiam_tests::pg_bin_dir().join("pg_dump"))
        .args(["--schema=dumped", "--no-owner", "-d", &env.tcp_dsn("")])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pg_dump: {}", stderr(&out));
    assert!(
        dump.contains("CREATE TABLE dumped.accounts")
            && dump.contains("CREATE VIEW dumped.owners")
            && dump.contains("CREATE SEQUENCE dumped.ids")
            && dump.contains("1\talice\n2\tbob"),
        "{dump}"
    );
    let records = env.audit_records();
    assert!(
        records.iter().any(|r| r["kind"] == "statement"
            && r["decision"] == "allow"
            && r["sql"]
                .as_str()
                .is_some_and(|s| s.contains("set_config('search_path', '', false)"))),
        "pg_dump's set_config was decided and allowed"
    );
    assert!(!records
        .iter()
        .any(|r| r["kind"] == "statement" && r["decision"] == "deny"));
}

const GATEWAY_ROLE: &str = "pgiam_gw";

/// pgiam in gateway mode (logged in as a NOINHERIT gateway role, SET ROLE to the mapped one)
/// with `setup`'s policy; the directory holds the gateway's password.
fn gateway_env(setup: Setup) -> (Env, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pw = pgiam_tests::write_file(dir.path(), "gw.password", "gw-secret", 0o600);
    let env = Env::with(Setup {
        upstream: Some(format!(
            "host = \"127.0.0.1\"\nport = PGPORT\nmode = \"gateway\"\ngateway_role = \"{GATEWAY_ROLE}\""
        )),
        extra: format!("[roles.{GATEWAY_ROLE}]\npassword_file = \"{}\"\n", pw.display()),
        ..setup
    });
    env.pg
        .psql(&format!(
            "CREATE ROLE {GATEWAY_ROLE} LOGIN NOINHERIT PASSWORD 'gw-secret'; \
             GRANT {ROLE} TO {GATEWAY_ROLE}"
        ))
        .unwrap();
    (env, dir)
}

/// The statement classes in gateway mode too: no setting read, no row lock through pgiam.
#[test]
fn statement_classes_hold_in_gateway_mode() {
    let (env, _dir) = gateway_env(Setup {
        policy: POLICY.into(),
        ..Setup::default()
    });
    prepare(&env);
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| {
            CLASSES
                .iter()
                .any(|(name, ..)| c.name.starts_with(&format!("{name} (")))
        })
        .collect();
    assert_eq!(cases.len(), CLASSES.len() * 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    run_cases(&rt, &env, &cases, true).assert_clean();
}

/// Runs every case through pgiam and directly (from a fresh state each time) and judges it.
fn run_cases(rt: &tokio::runtime::Runtime, env: &Env, cases: &[Case], gateway: bool) -> Verdicts {
    let mut verdicts = Verdicts::default();
    for case in cases {
        for direct in [false, true] {
            reset(env);
            let target = Target {
                env,
                direct,
                gateway,
            };
            let (text, user) = rt.block_on(attack(&target, case));
            let fired = fired(env, case.oracle, &text, user.as_deref());
            verdicts.judge(direct, fired, || {
                format!("{}: {text} / user {user:?}", case.name)
            });
        }
    }
    verdicts
}

/// Every way a session can change its role, in gateway mode (pgiam logs in as a NOINHERIT
/// gateway role and SET ROLEs to the mapped one) and with a policy that permits everything: no
/// policy can let a client leave the mapped role.
#[test]
fn gateway_mode_never_leaves_the_mapped_role() {
    // pgiam refuses FunctionCall messages in gateway mode whatever the function; no lasting
    // role change through one could be shown directly here, so it is not a case.
    use Step::*;
    let (env, _dir) = gateway_env(Setup::default());
    env.pg
        .psql_db(DB, &format!("GRANT CREATE ON SCHEMA public TO {ROLE}"))
        .unwrap();
    // The session is the mapped role, logged in as the gateway: at login (the first), and at
    // the first statement (the second, whose login was deferred).
    for _ in 0..2 {
        assert_eq!(
            psql_ok(
                &env.tcp_dsn(""),
                "SELECT current_user || ' ' || session_user"
            ),
            format!("{ROLE} {GATEWAY_ROLE}")
        );
    }
    let escapes: &[(&str, Vec<Step>)] = &[
        ("reset role", vec![Q("RESET ROLE")]),
        ("reset role (extended)", vec![X("RESET ROLE")]),
        ("set role none", vec![Q("SET ROLE NONE")]),
        ("set role to the gateway", vec![Q("SET ROLE pgiam_gw")]),
        ("set session authorization default", vec![Q("SET SESSION AUTHORIZATION DEFAULT")]),
        ("reset session authorization", vec![Q("RESET SESSION AUTHORIZATION")]),
        ("discard all", vec![Q("DISCARD ALL")]),
        ("set_config", vec![Q("SELECT set_config('role', 'none', false)")]),
        ("set_config (extended)", vec![X("SELECT set_config('role', 'none', false)")]),
        ("set local role in a transaction", vec![Q("BEGIN"), Q("SET LOCAL ROLE NONE")]),
        ("do block", vec![Q("DO $$BEGIN RESET ROLE; END$$")]),
        (
            "function that resets the role",
            vec![
                Q("CREATE FUNCTION esc() RETURNS void LANGUAGE plpgsql AS $$BEGIN RESET ROLE; END$$"),
                Q("SELECT esc()"),
            ],
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut verdicts = Verdicts::default();
    for (name, steps) in escapes {
        let case = Case {
            name: name.to_string(),
            options: None,
            params: &[],
            steps: steps.clone(),
            oracle: Oracle::Role,
        };
        for direct in [false, true] {
            env.pg.psql_db(DB, "DROP FUNCTION IF EXISTS esc()").unwrap();
            let target = Target {
                env: &env,
                direct,
                gateway: true,
            };
            let (text, user) = rt.block_on(attack(&target, &case));
            let fired = fired(&env, case.oracle, &text, user.as_deref());
            verdicts.judge(direct, fired, || format!("{name}: {text} / user {user:?}"));
        }
    }
    verdicts.assert_clean();
}
