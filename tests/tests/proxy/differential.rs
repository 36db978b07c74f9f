//! Differential testing of the classifier against the server: queries generated from a
//! grammar (joins, subqueries in every clause, CTEs that shadow tables, recursive CTEs, set
//! operations, LATERAL, writable CTEs, INSERT … SELECT, UPDATE … FROM, DELETE … USING,
//! RETURNING, quoted and qualified names) are planned by PostgreSQL (`EXPLAIN (VERBOSE,
//! FORMAT JSON)`), and every relation the plan touches must be among the relations pgiam's
//! classifier found in the text, a relation the plan modifies with a write access. The
//! classifier may name more (a CTE it cannot tell from a table, a join the planner removed),
//! never fewer: a relation it misses is one the policy is never asked about.
//!
//! `PGIAM_DIFF_CASES` (default 300) sets how many queries; `PGIAM_DIFF_SEED` replays a run.
//! Queries that once disagreed are kept in `tests/differential/regressions.sql` and tried first.

use std::collections::BTreeSet;

use pgiam::sql::{classify, Access};
use serde_json::Value;

use crate::fixture::DB;

/// Tables as a query may write them, and the (schema, name) the server resolves them to.
const TABLES: &[(&str, &str, &str)] = &[
    ("a", "public", "a"),
    ("public.a", "public", "a"),
    ("A", "public", "a"),
    ("b", "public", "b"),
    ("PUBLIC.B", "public", "b"),
    ("\"Mixed\"", "public", "Mixed"),
    ("public.\"Mixed\"", "public", "Mixed"),
    ("s2.c", "s2", "c"),
    ("\"s2\".\"c\"", "s2", "c"),
    ("s2.a", "s2", "a"),
];

/// CTE names: some shadow the tables `a` and `b`.
const CTE_NAMES: &[&str] = &["x", "y", "a", "b"];

/// A small deterministic generator (xorshift64*): no dependency, and a seed replays a run.
struct Gen {
    state: u64,
    /// CTE names in scope, innermost last.
    ctes: Vec<Vec<&'static str>>,
    aliases: usize,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen {
            state: seed | 1,
            ctes: Vec::new(),
            aliases: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn alias(&mut self) -> String {
        self.aliases += 1;
        format!("q{}", self.aliases)
    }

    fn table(&mut self) -> &'static str {
        TABLES[self.below(TABLES.len())].0
    }

    /// Something that yields rows of (id int, v text), as written after FROM, with an alias.
    fn source(&mut self, depth: usize) -> (String, String) {
        let alias = self.alias();
        let in_scope: Vec<&'static str> = self.ctes.iter().flatten().copied().collect();
        let item = match self.below(if depth > 2 { 2 } else { 5 }) {
            0 if !in_scope.is_empty() => in_scope[self.below(in_scope.len())].to_owned(),
            0 | 1 => self.table().to_owned(),
            2 => format!("({})", self.select(depth + 1)),
            3 => format!("LATERAL ({})", self.select(depth + 1)),
            _ => format!("(SELECT id, v FROM {} WHERE true)", self.table()),
        };
        (format!("{item} AS {alias}"), alias)
    }

    fn condition(&mut self, alias: &str, depth: usize) -> String {
        if depth > 2 {
            return format!("{alias}.id > 0");
        }
        match self.below(6) {
            0 => format!("EXISTS ({})", self.select(depth + 1)),
            1 => format!(
                "{alias}.id IN (SELECT id FROM ({}) AS {})",
                self.select(depth + 1),
                self.alias()
            ),
            2 => format!(
                "{alias}.id = (SELECT max(id) FROM {} AS {})",
                self.table(),
                self.alias()
            ),
            3 => format!(
                "NOT ({} OR {alias}.v IS NULL)",
                self.condition(alias, depth + 1)
            ),
            4 => format!("{alias}.v <> ALL (SELECT v FROM {})", self.table()),
            _ => format!("{alias}.id > 0"),
        }
    }

    /// A query yielding (id int, v text).
    fn select(&mut self, depth: usize) -> String {
        let mut with = String::new();
        let pushed = depth < 3 && self.one_in(3);
        if pushed {
            with = self.with_clause(depth);
        }
        let (first, alias) = self.source(depth);
        let mut from = first;
        for _ in 0..self.below(3) {
            let (item, _) = self.source(depth);
            from = match self.below(3) {
                0 => format!("{from} JOIN {item} ON true"),
                1 => format!("{from} LEFT JOIN {item} ON true"),
                _ => format!("{from}, {item}"),
            };
        }
        let mut list = format!("{alias}.id, {alias}.v");
        if depth < 3 && self.one_in(4) {
            list = format!(
                "{alias}.id + (SELECT count(*)::int FROM {}) AS id, {alias}.v",
                self.table()
            );
        }
        let mut q = format!("{with}SELECT {list} FROM {from}");
        if self.one_in(2) {
            q = format!("{q} WHERE {}", self.condition(&alias, depth));
        }
        if depth < 3 && self.one_in(5) {
            let op = ["UNION", "UNION ALL", "INTERSECT", "EXCEPT"][self.below(4)];
            q = format!("{q} {op} SELECT id, v FROM {}", self.table());
        }
        if pushed {
            self.ctes.pop();
        }
        q
    }

    /// `WITH …`: its names are in scope for the rest of the query (the caller pops).
    fn with_clause(&mut self, depth: usize) -> String {
        let mut names: Vec<&'static str> = Vec::new();
        let mut parts = Vec::new();
        let recursive = self.one_in(4);
        self.ctes.push(Vec::new());
        // A recursive WITH has its one recursive query (more would refer to each other).
        let count = if recursive { 1 } else { 1 + self.below(2) };
        for _ in 0..count {
            let name = CTE_NAMES[self.below(CTE_NAMES.len())];
            if names.contains(&name) {
                continue;
            }
            let body = if recursive {
                // Its first term names a table qualified, which cannot be the query itself.
                let qualified: Vec<&str> = TABLES
                    .iter()
                    .map(|t| t.0)
                    .filter(|t| t.contains('.'))
                    .collect();
                format!(
                    "SELECT id, v FROM {} UNION ALL SELECT id + 1, v FROM {name} WHERE id < 3",
                    qualified[self.below(qualified.len())]
                )
            } else {
                self.select(depth + 1)
            };
            parts.push(format!("{name}(id, v) AS ({body})"));
            names.push(name);
            // Visible to the CTEs after it, and to the query.
            self.ctes.last_mut().expect("pushed").push(name);
        }
        let r = if recursive { "RECURSIVE " } else { "" };
        format!("WITH {r}{} ", parts.join(", "))
    }

    fn statement(&mut self) -> String {
        self.aliases = 0;
        self.ctes.clear();
        match self.below(10) {
            0 => format!("INSERT INTO {} SELECT id, v FROM ({}) AS ins", self.table(), self.select(1)),
            1 => format!(
                "UPDATE {} AS u SET v = (SELECT max(v) FROM {}) FROM ({}) AS src WHERE u.id = src.id",
                self.table(),
                self.table(),
                self.select(1)
            ),
            2 => format!(
                "DELETE FROM {} AS d USING ({}) AS src WHERE d.id = src.id RETURNING (SELECT count(*) FROM {})",
                self.table(),
                self.select(1),
                self.table()
            ),
            3 => format!(
                "WITH w AS (DELETE FROM {} RETURNING id, v) SELECT id, v FROM w",
                self.table()
            ),
            4 => format!(
                "WITH w AS (UPDATE {} SET v = 'x' RETURNING id, v) INSERT INTO {} SELECT id, v FROM w",
                self.table(),
                self.table()
            ),
            _ => self.select(0),
        }
    }
}

/// Relations by (schema, name).
type Relations = BTreeSet<(String, String)>;

/// (schema, name) of every relation the plan touches, and those it modifies.
fn planned(
    plan: &Value,
    touched: &mut BTreeSet<(String, String)>,
    modified: &mut BTreeSet<(String, String)>,
) {
    match plan {
        Value::Object(m) => {
            if let (Some(Value::String(rel)), Some(Value::String(schema))) =
                (m.get("Relation Name"), m.get("Schema"))
            {
                let key = (schema.clone(), rel.clone());
                if m.get("Node Type").and_then(Value::as_str) == Some("ModifyTable") {
                    modified.insert(key.clone());
                }
                touched.insert(key);
            }
            for v in m.values() {
                planned(v, touched, modified);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| planned(v, touched, modified)),
        _ => {}
    }
}

/// What the classifier found: every relation, and those written.
fn classified(sql: &str) -> Result<(Relations, Relations), String> {
    let statements = classify(sql, true).map_err(|e| e.to_string())?;
    let mut all = BTreeSet::new();
    let mut written = BTreeSet::new();
    for s in &statements {
        for r in &s.relations {
            let key = (
                r.name.schema.clone().unwrap_or_else(|| "public".into()),
                r.name.name.clone(),
            );
            if matches!(
                r.access,
                Access::Insert | Access::Update | Access::Delete | Access::Merge
            ) {
                written.insert(key.clone());
            }
            all.insert(key);
        }
    }
    Ok((all, written))
}

/// What checking one query found.
enum Checked {
    Agrees,
    /// The server does not accept it (nothing to compare), and why.
    NotAccepted(String),
}

/// Checks one query; an error is a disagreement (or text the classifier cannot read).
async fn check(client: &tokio_postgres::Client, sql: &str) -> Result<Checked, String> {
    let answer = match client
        .simple_query(&format!("EXPLAIN (VERBOSE, FORMAT JSON) {sql}"))
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            let why = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            return Ok(Checked::NotAccepted(why));
        }
    };
    let text = answer
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| format!("{sql}\n  EXPLAIN answered no plan"))?;
    let explained: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let (mut touched, mut modified) = (BTreeSet::new(), BTreeSet::new());
    planned(&explained, &mut touched, &mut modified);
    let (found, written) = classified(sql).map_err(|e| format!("{sql}\n  not classified: {e}"))?;
    let missed: Vec<_> = touched.difference(&found).collect();
    let unwritten: Vec<_> = modified.difference(&written).collect();
    if missed.is_empty() && unwritten.is_empty() {
        Ok(Checked::Agrees)
    } else {
        Err(format!(
            "{sql}\n  the server touches {missed:?} and modifies {unwritten:?} beyond what pgiam found ({found:?}, written {written:?})"
        ))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_classifier_finds_every_relation_the_server_plans_to_touch() {
    let pg = pgiam_tests::PgCluster::start(pgiam_tests::PgOptions::default()).unwrap();
    pg.psql(&format!("CREATE DATABASE {DB}")).unwrap();
    pg.psql_db(
        DB,
        "CREATE SCHEMA s2; \
             CREATE TABLE a (id int, v text); CREATE TABLE b (id int, v text); \
             CREATE TABLE \"Mixed\" (id int, v text); CREATE TABLE s2.c (id int, v text); \
             CREATE TABLE s2.a (id int, v text); \
             INSERT INTO a VALUES (1, 'a'); INSERT INTO b VALUES (1, 'b')",
    )
    .unwrap();
    let dsn = format!(
        "host={} port={} user=postgres dbname={DB}",
        pg.socket_dir.display(),
        pg.port
    );
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .simple_query("SET search_path = public")
        .await
        .unwrap();

    let regressions = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("differential/regressions.sql"),
    )
    .unwrap();
    let mut failures = Vec::new();
    let mut kept = 0;
    for sql in regressions
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("--"))
    {
        match check(&client, sql).await {
            Ok(Checked::Agrees) => kept += 1,
            Ok(Checked::NotAccepted(why)) => {
                failures.push(format!("{sql}\n  the server no longer accepts it: {why}"))
            }
            Err(e) => failures.push(e),
        }
    }

    let cases: usize = std::env::var("PGIAM_DIFF_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("PGIAM_DIFF_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut gen = Gen::new(seed);
    let (mut compared, mut rejected) = (0, std::collections::BTreeMap::<String, usize>::new());
    for _ in 0..cases {
        let sql = gen.statement();
        match check(&client, &sql).await {
            Ok(Checked::Agrees) => compared += 1,
            Ok(Checked::NotAccepted(why)) => *rejected.entry(why).or_default() += 1,
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "differential: seed {seed}: {kept} kept cases, {compared} generated queries compared, \
         {} the server refused: {rejected:?}",
        rejected.values().sum::<usize>()
    );
    assert!(
        failures.is_empty(),
        "seed {seed} (PGIAM_DIFF_SEED replays it); add each to tests/differential/regressions.sql once fixed:\n{}",
        failures.join("\n")
    );
    // A generator whose queries the server mostly refuses tests nothing.
    assert!(
        compared * 2 > cases,
        "only {compared} of {cases} generated queries were valid"
    );
}
