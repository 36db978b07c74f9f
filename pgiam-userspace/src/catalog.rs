//! What the server's catalog says where a statement's text cannot: which functions its
//! operators and casts run. A user-defined operator (`a === b`) or cast (`x::mytype`, or one
//! the server applies by itself) calls a function the statement never names; the policy is
//! asked about that function as if it had been called by name.
//!
//! Only what users created is listed (oid ≥ 16384, PostgreSQL's FirstNormalObjectId, which
//! extensions' objects are too): built-in operators and casts run the catalog's own functions,
//! as the syntax they stand for does. Every overload is listed, wherever it lives: pgiam does
//! not infer argument types, so it asks about every function an operator of that name could
//! run (more asks than the server's choice, never fewer).
//!
//! Not covered: operators a type's operator class calls for sorting, grouping, joins and
//! indexes without the statement naming one (`ORDER BY` on a user-defined type), and a type's
//! input and output functions. Both are the type owner's, created with the type.

pub mod cache;

use std::collections::HashMap;

use crate::sql::{QualifiedName, Statement};

/// The query that reads a [`Snapshot`]: one row per (operator or cast, function), as
/// `kind` (`o`, or `c` followed by pg_cast.castcontext), the operator's or target type's name,
/// the schema it is in, the function's schema and the function's name. Every name is
/// qualified with pg_catalog, so the session's search_path cannot change what is read.
pub const QUERY: &str = "\
SELECT 'o', o.oprname::text, ns.nspname::text, fs.nspname::text, p.proname::text \
  FROM pg_catalog.pg_operator o \
  JOIN pg_catalog.pg_namespace ns ON ns.oid = o.oprnamespace \
  JOIN pg_catalog.pg_proc p ON p.oid IN (o.oprcode, o.oprrest, o.oprjoin) \
  JOIN pg_catalog.pg_namespace fs ON fs.oid = p.pronamespace \
 WHERE o.oid >= 16384 AND (p.oid = o.oprcode OR fs.nspname <> 'pg_catalog') \
UNION ALL \
SELECT 'c' || c.castcontext::text, t.typname::text, tn.nspname::text, fs.nspname::text, p.proname::text \
  FROM pg_catalog.pg_cast c \
  JOIN pg_catalog.pg_type t ON t.oid = c.casttarget \
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace \
  JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc \
  JOIN pg_catalog.pg_namespace fs ON fs.oid = p.pronamespace \
 WHERE c.oid >= 16384";

/// A function behind an operator or a cast, and the schema of the operator or the target
/// type (for `OPERATOR(s.op)`, which names only the operators of schema `s`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Behind {
    schema: String,
    function: QualifiedName,
}

/// The user-defined operators and casts of one database, as read at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// By operator name.
    operators: HashMap<String, Vec<Behind>>,
    /// By target type name.
    casts: HashMap<String, Vec<Behind>>,
    /// Functions of casts the server may apply with no cast written (implicit and assignment
    /// casts): any statement with an expression may run them.
    unwritten_casts: Vec<QualifiedName>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the catalog query answered a row of {0} columns, not 5")]
pub struct BadRow(usize);

impl Snapshot {
    /// Builds a snapshot from [`QUERY`]'s rows (NULL as `None`).
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = Vec<Option<&'a str>>>,
    ) -> Result<Snapshot, BadRow> {
        let mut s = Snapshot::default();
        for row in rows {
            let [Some(kind), Some(name), Some(schema), Some(fschema), Some(fname)] = row[..] else {
                return Err(BadRow(row.len()));
            };
            let behind = Behind {
                schema: schema.to_owned(),
                function: QualifiedName {
                    schema: Some(fschema.to_owned()),
                    name: fname.to_owned(),
                },
            };
            let into = match kind {
                "o" => &mut s.operators,
                _ => {
                    // castcontext: 'e' explicit only, 'a' assignment, 'i' implicit.
                    if kind != "ce" && !s.unwritten_casts.contains(&behind.function) {
                        s.unwritten_casts.push(behind.function.clone());
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

    /// Every function `statement` may run through an operator or a cast, each once.
    pub fn functions_behind(&self, statement: &Statement) -> Vec<&QualifiedName> {
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
            .then_some(&self.unwritten_casts)
            .into_iter()
            .flatten();
        let mut out: Vec<&QualifiedName> = Vec::new();
        for f in operators.chain(casts).map(|b| &b.function).chain(unwritten) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }
}

/// Statements that can add an operator or a cast, or change the name one is found by (a
/// DO block could do anything). One that only removes them needs no new read: the snapshot
/// then asks about more than the server can run, never less.
const ADDING: &[&str] = &[
    "DefineStmt",
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
            ["o", "===", "public", "public", "leak"],
            ["o", "===", "other", "other", "other_eq"],
            ["o", "===", "public", "public", "leak_sel"],
            ["o", "===", "public", "public", "leak"],
            ["ce", "mytype", "public", "public", "to_mytype"],
            ["ci", "text", "pg_catalog", "public", "mytype_text"],
        ];
        Snapshot::from_rows(rows.iter().map(|r| r.iter().map(|v| Some(*v)).collect())).unwrap()
    }

    fn behind(sql: &str) -> Vec<String> {
        let s = snapshot();
        let statement = &crate::sql::classify(sql, true).unwrap()[0];
        s.functions_behind(statement)
            .into_iter()
            .map(|f| format!("{}.{}", f.schema.as_deref().unwrap_or(""), f.name))
            .collect()
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
        assert_eq!(Snapshot::from_rows(rows).unwrap_err(), BadRow(2));
    }
}
