//! What the server's catalog says where a statement's text cannot: which functions its
//! operators and casts run, and which overloads a call may run. A user-defined operator
//! (`a === b`) or cast (`x::mytype`, or one the server applies by itself) calls a function the
//! statement never names; the policy is asked about that function as if it had been called
//! by name. A call by name asks about the name; the policy sees, in `context.overloads`, the
//! signatures of the user-defined functions of that name the call may run.
//!
//! Only what users created is listed (oid ≥ 16384, PostgreSQL's FirstNormalObjectId, which
//! extensions' objects are too): built-in operators and casts run the catalog's own functions,
//! as the syntax they stand for does. Every overload is listed, wherever it lives: pgiam does
//! not infer argument types, so it asks about every function an operator of that name could
//! run, and names every overload of a called function that takes the call's argument count
//! (more than the server's choice, never less).
//!
//! The server also calls functions on its own: an operator family's comparison and hash
//! functions when it sorts, groups, hashes, joins or scans an index (`ORDER BY` on a
//! user-defined type), a type's input and output functions. Those written in C (a
//! superuser's, like the built-in ones) are trusted as the built-in ones are; one in any
//! other language, which its owner can replace, is asked about by every statement with an
//! expression, as an implicit cast's function is.

pub mod cache;

use std::collections::{BTreeSet, HashMap};

use crate::sql::{QualifiedName, Statement};

/// The query that reads a [`Snapshot`]: one row per (operator or cast, function), as
/// `kind` (`o`, or `c` followed by pg_cast.castcontext), the operator's or target type's name,
/// the schema it is in, the function's schema, name and argument types; and one row per
/// user-defined function (`f`), with its argument count, how many of them have defaults and
/// whether it is variadic; and one row per function the server calls on its own (`i`): the
/// support functions and operators of user-defined operator families (sorting, grouping,
/// hashing, joins, indexes) and the I/O functions of user-defined types, where a user could
/// have written them (any language but C: a C function is a superuser's, as the built-in
/// ones are). Every name is qualified with pg_catalog, so the session's search_path cannot
/// change what is read.
pub const QUERY: &str = "\
SELECT 'o', o.oprname::text, ns.nspname::text, fs.nspname::text, p.proname::text, \
       pg_catalog.oidvectortypes(p.proargtypes), NULL, NULL, NULL \
  FROM pg_catalog.pg_operator o \
  JOIN pg_catalog.pg_namespace ns ON ns.oid = o.oprnamespace \
  JOIN pg_catalog.pg_proc p ON p.oid IN (o.oprcode, o.oprrest, o.oprjoin) \
  JOIN pg_catalog.pg_namespace fs ON fs.oid = p.pronamespace \
 WHERE o.oid >= 16384 AND (p.oid = o.oprcode OR fs.nspname <> 'pg_catalog') \
UNION ALL \
SELECT 'c' || c.castcontext::text, t.typname::text, tn.nspname::text, fs.nspname::text, \
       p.proname::text, pg_catalog.oidvectortypes(p.proargtypes), NULL, NULL, NULL \
  FROM pg_catalog.pg_cast c \
  JOIN pg_catalog.pg_type t ON t.oid = c.casttarget \
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace \
  JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc \
  JOIN pg_catalog.pg_namespace fs ON fs.oid = p.pronamespace \
 WHERE c.oid >= 16384 \
UNION ALL \
SELECT 'f', p.proname::text, fs.nspname::text, fs.nspname::text, p.proname::text, \
       pg_catalog.oidvectortypes(p.proargtypes), p.pronargs::text, \
       p.pronargdefaults::text, (p.provariadic <> 0)::text \
  FROM pg_catalog.pg_proc p \
  JOIN pg_catalog.pg_namespace fs ON fs.oid = p.pronamespace \
 WHERE p.oid >= 16384 \
UNION ALL \
SELECT 'i', '', fs.nspname::text, fs.nspname::text, p.proname::text, \
       pg_catalog.oidvectortypes(p.proargtypes), NULL, NULL, NULL \
  FROM pg_catalog.pg_proc p \
  JOIN pg_catalog.pg_namespace fs ON fs.oid = p.pronamespace \
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
 WHERE p.oid >= 16384 AND l.lanname NOT IN ('c', 'internal') \
   AND (p.oid IN (SELECT a.amproc FROM pg_catalog.pg_amproc a \
                   WHERE a.amprocfamily >= 16384) \
     OR p.oid IN (SELECT o.oprcode FROM pg_catalog.pg_amop m \
                    JOIN pg_catalog.pg_operator o ON o.oid = m.amopopr \
                   WHERE m.amopfamily >= 16384) \
     OR p.oid IN (SELECT pg_catalog.unnest(ARRAY[t.typinput, t.typoutput, t.typmodin, \
                                                 t.typmodout]) \
                    FROM pg_catalog.pg_type t WHERE t.oid >= 16384))";

/// The columns of a [`QUERY`] row.
const COLUMNS: usize = 9;

/// A function behind an operator or a cast, and the schema of the operator or the target
/// type (for `OPERATOR(s.op)`, which names only the operators of schema `s`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Behind {
    schema: String,
    function: QualifiedName,
    signature: String,
}

/// One user-defined function of some name: its signature and the argument counts a call of
/// it may have.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Overload {
    schema: String,
    signature: String,
    args: usize,
    defaults: usize,
    variadic: bool,
}

impl Overload {
    /// Whether a call with `n` arguments may run this function: from its arguments without
    /// defaults up to all of them, or (variadic) any number from its fixed ones on. Named
    /// arguments count as positional ones do; `VARIADIC array` is one argument.
    fn takes(&self, n: usize) -> bool {
        let fixed = self.args.saturating_sub(self.defaults);
        if self.variadic {
            n >= fixed.min(self.args.saturating_sub(1))
        } else {
            (fixed..=self.args).contains(&n)
        }
    }
}

/// A function a statement runs through an operator or a cast, with the signatures of the
/// functions of that name it may be.
#[derive(Debug, PartialEq, Eq)]
pub struct Called<'a> {
    pub function: &'a QualifiedName,
    pub signatures: Vec<String>,
}

/// The user-defined operators, casts and functions of one database, as read at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// By operator name.
    operators: HashMap<String, Vec<Behind>>,
    /// By target type name.
    casts: HashMap<String, Vec<Behind>>,
    /// Functions the server may run with nothing written for them: those of implicit and
    /// assignment casts, of user-defined operator families and of user-defined types' I/O.
    /// Any statement with an expression may run them.
    unwritten: Vec<Behind>,
    /// By function name.
    functions: HashMap<String, Vec<Overload>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRow {
    #[error("the catalog query answered a row of {0} columns, not {COLUMNS}")]
    Columns(usize),
    #[error("the catalog query answered a function row without its argument counts")]
    Counts,
}

impl Snapshot {
    /// Builds a snapshot from [`QUERY`]'s rows (NULL as `None`).
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = Vec<Option<&'a str>>>,
    ) -> Result<Snapshot, BadRow> {
        let mut s = Snapshot::default();
        for row in rows {
            let [Some(kind), Some(name), Some(schema), Some(fschema), Some(fname), Some(fargs), args, defaults, variadic] =
                row[..]
            else {
                return Err(BadRow::Columns(row.len()));
            };
            let signature = format!("{fname}({fargs})");
            if kind == "f" {
                let count = |v: Option<&str>| v.and_then(|v| v.parse().ok()).ok_or(BadRow::Counts);
                let overload = Overload {
                    schema: schema.to_owned(),
                    signature,
                    args: count(args)?,
                    defaults: count(defaults)?,
                    variadic: variadic == Some("true"),
                };
                s.functions
                    .entry(name.to_owned())
                    .or_default()
                    .push(overload);
                continue;
            }
            let behind = Behind {
                schema: schema.to_owned(),
                function: QualifiedName {
                    schema: Some(fschema.to_owned()),
                    name: fname.to_owned(),
                },
                signature,
            };
            let into = match kind {
                "o" => &mut s.operators,
                "i" => {
                    if !s.unwritten.contains(&behind) {
                        s.unwritten.push(behind);
                    }
                    continue;
                }
                _ => {
                    // castcontext: 'e' explicit only, 'a' assignment, 'i' implicit.
                    if kind != "ce" && !s.unwritten.contains(&behind) {
                        s.unwritten.push(behind.clone());
                    }
                    &mut s.casts
                }
            };
            let list = into.entry(name.to_owned()).or_default();
            if !list.contains(&behind) {
                list.push(behind);
            }
        }
        Ok(s)
    }

    /// Two overloads of `public.f`, as function rows: `f(integer)` and `f(text, text)`.
    #[cfg(test)]
    pub const TEST_OVERLOADS: [[&'static str; 9]; 2] = [
        [
            "f", "f", "public", "public", "f", "integer", "1", "0", "false",
        ],
        [
            "f",
            "f",
            "public",
            "public",
            "f",
            "text, text",
            "2",
            "0",
            "false",
        ],
    ];

    /// A snapshot of operator, cast and `i` rows (`rows`) and function rows with their counts.
    #[cfg(test)]
    pub fn for_tests(rows: &[[&str; 6]], functions: &[[&str; 9]]) -> Snapshot {
        let rows = rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|v| Some(*v))
                    .chain([None, None, None])
                    .collect()
            })
            .chain(
                functions
                    .iter()
                    .map(|r| r.iter().map(|v| Some(*v)).collect()),
            );
        Snapshot::from_rows(rows).unwrap()
    }

    /// Every function `statement` may run through an operator or a cast, each once, with
    /// the signatures it may run under that name.
    pub fn functions_behind(&self, statement: &Statement) -> Vec<Called<'_>> {
        let operators = statement.operators.iter().flat_map(|op| {
            self.operators
                .get(&op.name)
                .into_iter()
                .flatten()
                .filter(move |b| op.schema.as_ref().is_none_or(|s| *s == b.schema))
        });
        let casts = statement
            .casts
            .iter()
            .flat_map(|t| self.casts.get(t).into_iter().flatten());
        let unwritten = consulted_by(statement)
            .then_some(&self.unwritten)
            .into_iter()
            .flatten();
        let mut out: Vec<Called> = Vec::new();
        for b in operators.chain(casts).chain(unwritten) {
            match out.iter_mut().find(|c| *c.function == b.function) {
                Some(c) if c.signatures.contains(&b.signature) => {}
                Some(c) => c.signatures.push(b.signature.clone()),
                None => out.push(Called {
                    function: &b.function,
                    signatures: vec![b.signature.clone()],
                }),
            }
        }
        for c in &mut out {
            c.signatures.sort();
        }
        out
    }

    /// The signatures of the user-defined functions `schema.name` a call with one of
    /// `arities` arguments may run (any count: every one), sorted; `None` when the catalog
    /// lists no user-defined function of that name in that schema (a built-in's overloads
    /// are not read: they are the server's own).
    pub fn overloads(
        &self,
        schema: &str,
        name: &str,
        arities: Option<&BTreeSet<usize>>,
    ) -> Option<Vec<String>> {
        let all: Vec<&Overload> = self
            .functions
            .get(name)?
            .iter()
            .filter(|o| o.schema == schema)
            .collect();
        if all.is_empty() {
            return None;
        }
        let mut out: Vec<String> = all
            .into_iter()
            .filter(|o| arities.is_none_or(|a| a.iter().any(|&n| o.takes(n))))
            .map(|o| o.signature.clone())
            .collect();
        out.sort();
        out.dedup();
        Some(out)
    }
}

/// Statements that can add an operator, a cast or a function overload, or change the name
/// one is found by (a DO block could do anything). One that only removes them needs no new
/// read: the snapshot then asks about more than the server can run, never less.
const ADDING: &[&str] = &[
    "DefineStmt",
    "CreateFunctionStmt",
    "CreateOpClassStmt",
    "CreateOpFamilyStmt",
    "AlterOpFamilyStmt",
    "CreateCastStmt",
    "CreateExtensionStmt",
    "AlterExtensionStmt",
    "AlterExtensionContentsStmt",
    "AlterOperatorStmt",
    "RenameStmt",
    "AlterObjectSchemaStmt",
];

/// Whether running `statement` may make the catalog's snapshot miss something.
pub fn may_change(statement: &Statement) -> bool {
    statement.do_block || ADDING.contains(&statement.node.as_str())
}

/// Whether deciding `s` needs the catalog: it names an operator or a cast, or has expressions
/// a cast the server applies by itself could run in.
pub fn consulted_by(s: &Statement) -> bool {
    !(s.relations.is_empty()
        && s.functions.is_empty()
        && s.operators.is_empty()
        && s.casts.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let rows = [
            ["o", "===", "public", "public", "leak", "integer, integer"],
            ["o", "===", "other", "other", "other_eq", "text, text"],
            ["o", "===", "public", "public", "leak_sel", "internal, oid"],
            ["o", "===", "public", "public", "leak", "integer, integer"],
            ["o", "===", "public", "public", "leak", "text, text"],
            ["ce", "mytype", "public", "public", "to_mytype", "text"],
            [
                "ci",
                "text",
                "pg_catalog",
                "public",
                "mytype_text",
                "mytype",
            ],
        ];
        let functions: Vec<[&str; 9]> = Snapshot::TEST_OVERLOADS
            .into_iter()
            .chain([
                [
                    "f",
                    "f",
                    "public",
                    "public",
                    "f",
                    "text, integer, text[]",
                    "3",
                    "1",
                    "true",
                ],
                ["f", "f", "other", "other", "f", "", "0", "0", "false"],
            ])
            .collect();
        Snapshot::for_tests(&rows, &functions)
    }

    fn behind(sql: &str) -> Vec<String> {
        let s = snapshot();
        let statement = &crate::sql::classify(sql, true).unwrap()[0];
        s.functions_behind(statement)
            .into_iter()
            .map(|c| {
                format!(
                    "{}.{}",
                    c.function.schema.as_deref().unwrap_or(""),
                    c.function.name
                )
            })
            .collect()
    }

    #[test]
    fn what_the_server_calls_on_its_own_is_run_by_any_expression() {
        let s = Snapshot::for_tests(
            &[["i", "", "public", "public", "mood_cmp", "mood, mood"]],
            &[],
        );
        let called = |sql: &str| {
            let statement = &crate::sql::classify(sql, true).unwrap()[0];
            s.functions_behind(statement)
                .iter()
                .map(|c| format!("{}", c.function))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            called("SELECT m FROM moods ORDER BY m"),
            ["public.mood_cmp"]
        );
        assert_eq!(called("SELECT a FROM t"), ["public.mood_cmp"]);
        // Constants alone have built-in types.
        assert!(called("SELECT 1, 'x'").is_empty());
        assert!(called("BEGIN").is_empty());
    }

    #[test]
    fn what_an_operator_runs_is_named_by_signature() {
        let s = snapshot();
        let statement = &crate::sql::classify("SELECT 1 OPERATOR(public.===) 2", true).unwrap()[0];
        let called = s.functions_behind(statement);
        assert_eq!(
            called[0].signatures,
            ["leak(integer, integer)", "leak(text, text)"]
        );
        assert_eq!(called[1].signatures, ["leak_sel(internal, oid)"]);
    }

    #[test]
    fn a_call_may_run_the_overloads_that_take_its_argument_count() {
        let s = snapshot();
        let arities = |n: &[usize]| n.iter().copied().collect::<BTreeSet<usize>>();
        assert_eq!(
            s.overloads("public", "f", Some(&arities(&[1]))).unwrap(),
            ["f(integer)"]
        );
        // Two arguments: f(text, text), or the variadic one with its default taken.
        assert_eq!(
            s.overloads("public", "f", Some(&arities(&[2]))).unwrap(),
            ["f(text, integer, text[])", "f(text, text)"]
        );
        // Only the variadic one takes five.
        assert_eq!(
            s.overloads("public", "f", Some(&arities(&[5]))).unwrap(),
            ["f(text, integer, text[])"]
        );
        // Called with two counts in one statement: both.
        assert_eq!(
            s.overloads("public", "f", Some(&arities(&[1, 3]))).unwrap(),
            ["f(integer)", "f(text, integer, text[])"]
        );
        assert_eq!(s.overloads("other", "f", None).unwrap(), ["f()"]);
        // No user-defined function of that name there.
        assert_eq!(s.overloads("pg_catalog", "f", None), None);
        assert_eq!(s.overloads("public", "g", None), None);
    }

    #[test]
    fn operators_lead_to_every_function_that_could_implement_them() {
        assert_eq!(
            behind("SELECT 1 === 2"),
            [
                "public.leak",
                "other.other_eq",
                "public.leak_sel",
                "public.mytype_text"
            ]
        );
        assert_eq!(
            behind("SELECT 1 OPERATOR(other.===) 2"),
            ["other.other_eq", "public.mytype_text"]
        );
    }

    #[test]
    fn casts_lead_to_their_functions_and_unwritten_ones_to_any_expression() {
        assert_eq!(
            behind("SELECT 'x'::mytype"),
            ["public.to_mytype", "public.mytype_text"]
        );
        // An implicit cast may run wherever there is an expression to apply it to.
        assert_eq!(behind("SELECT a FROM t"), ["public.mytype_text"]);
        // Nothing to apply a cast to.
        assert!(behind("BEGIN").is_empty());
        assert!(!consulted_by(
            &crate::sql::classify("SET x = 1", true).unwrap()[0]
        ));
    }

    #[test]
    fn a_row_of_another_shape_is_refused() {
        let rows = vec![vec![Some("o"), Some("===")]];
        assert_eq!(Snapshot::from_rows(rows).unwrap_err(), BadRow::Columns(2));
        let counts = ["f", "f", "public", "public", "f", "", "x", "0", "false"];
        let rows = vec![counts.iter().map(|v| Some(*v)).collect()];
        assert_eq!(Snapshot::from_rows(rows).unwrap_err(), BadRow::Counts);
    }
}
