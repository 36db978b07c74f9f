//! Reading an audit file's records in order and following what they point to.
//!
//! Format 2 says each fact once: a statement record (kind `statement`) holds a statement's
//! text and classification with the session's who and where; the record of each execution of
//! a prepared statement (kind `execute`, or `bind` for a refused Bind) names that record in
//! `of` and holds only its own decision (an unnamed statement run at once, Parse, Bind and
//! Execute in one batch, has no execute record: its statement record says `"executed": true`
//! and stands for the execution); a completion names its decision record in `of`. A
//! [`Reader`] checks that every such reference points to an earlier record of the right kind
//! (`pgiam audit verify`) and puts the referenced text and classification back into the
//! records that point to it (`pgiam audit expand`). Records of format 1 (no `v` field) carry
//! everything themselves and are passed through.
//!
//! Only what can still be pointed to is remembered: a statement record until its session ends,
//! a decision record until its completion, so a file of any length is read in bounded memory.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::sync::Arc;

use serde_json::{Map, Value};

/// The newest record format this reader knows.
pub const VERSION: u64 = 2;

/// The fields of a statement record that the records pointing to it leave out.
const STATEMENT_FIELDS: &[&str] = &[
    "session",
    "principal",
    "person",
    "role",
    "database",
    "statement",
    "sql",
    "statements",
    "error",
    // Not inlined with the others: only into an allowed execution that leaves them out.
    "policies",
];

/// What a file holds, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub records: u64,
    /// Statement records: the text and classification of a Query, a Parse, a FunctionCall.
    pub statements: u64,
    /// Execute records: one per Execute message pgiam decided.
    pub executions: u64,
    pub completions: u64,
    /// References to records before the first one read: a set whose older files were rotated
    /// away (see [`Reader::continuing`]).
    pub earlier: u64,
}

/// Why a record cannot be read, or what it points to is not where it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// 1-based.
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Follows a file's records in order.
#[derive(Default)]
pub struct Reader {
    line: u64,
    counts: Counts,
    /// Statement records of sessions that have not ended, by id: what to inline.
    statements: HashMap<String, Arc<Map<String, Value>>>,
    /// Those ids by session, to forget at the session's end.
    by_session: HashMap<String, Vec<String>>,
    /// Decision records not completed yet.
    open: HashSet<String>,
    /// The input continues a log whose beginning is not read: a reference to nothing read yet
    /// may point before it.
    continuing: bool,
}

impl Reader {
    pub fn new() -> Reader {
        Reader::default()
    }

    /// A reader for a rotated set whose first file continues one not given (kept files only):
    /// references to records before it are counted, not broken. (The hash chain, checked
    /// apart, is what proves nothing was removed in between.)
    pub fn continuing() -> Reader {
        Reader {
            continuing: true,
            ..Reader::default()
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Reads the next line (without its newline). `Ok`: the record, and what is wrong with its
    /// references if anything is (the record is still taken in, so reading can go on); `Err`:
    /// the line is not a record at all.
    pub fn read(&mut self, line: &[u8]) -> Result<(Map<String, Value>, Option<Broken>), Broken> {
        self.line += 1;
        let line_no = self.line;
        let broken = |reason: String| Broken {
            line: line_no,
            reason,
        };
        let record = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(record)) => record,
            Ok(_) => return Err(broken("not a JSON object".into())),
            Err(e) => return Err(broken(format!("not JSON: {e}"))),
        };
        self.counts.records += 1;
        let problem = self.take(&record).err().map(broken);
        Ok((record, problem))
    }

    /// Counts a record and follows its references.
    fn take(&mut self, record: &Map<String, Value>) -> Result<(), String> {
        let field = |name: &str| record.get(name).and_then(Value::as_str);
        let kind = field("kind").unwrap_or_default();
        match kind {
            "statement" => {
                self.counts.statements += 1;
                // An unnamed statement run at once: its record is its execution's too.
                if record.get("executed") == Some(&Value::Bool(true)) {
                    self.counts.executions += 1;
                }
            }
            "execute" => self.counts.executions += 1,
            "completion" => self.counts.completions += 1,
            _ => {}
        }
        let version = match record.get("v") {
            None => 1,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("the format version is not a number: {v}"))?,
        };
        if version > VERSION {
            return Err(format!(
                "format version {version}: this pgiam reads up to version {VERSION}"
            ));
        }
        if version < 2 {
            // Self-contained: nothing points anywhere.
            if kind == "statement" && field("protocol") == Some("execute") {
                self.counts.executions += 1;
            }
            return Ok(());
        }
        let id = field("id");
        match kind {
            "statement" | "execute" | "bind" => {
                let id = id.ok_or_else(|| format!("a {kind} record without an id"))?;
                if !self.open.insert(id.to_owned()) {
                    return Err(format!("a second record with id {id}"));
                }
                match (kind, record.get("of")) {
                    ("statement", _) => self.remember(id, record),
                    (_, None) => {}
                    (_, Some(of)) => {
                        let of = of.as_str().unwrap_or_default();
                        if !self.statements.contains_key(of) && self.continuing {
                            self.counts.earlier += 1;
                        } else if !self.statements.contains_key(of) {
                            return Err(format!(
                                "the {kind} record {id} points to {of}, which is no statement \
                                 record earlier in the file (of a session still open)"
                            ));
                        }
                    }
                }
            }
            "completion" => {
                let of = field("of").ok_or("a completion without `of`")?;
                if self.open.remove(of) {
                } else if self.continuing {
                    self.counts.earlier += 1;
                } else {
                    return Err(format!(
                        "a completion of {of}, which is no decision record earlier in the file \
                         (or one completed already)"
                    ));
                }
            }
            "session_end" => {
                // No execution can point to the session's statements any more.
                if let Some(ids) = field("session").and_then(|s| self.by_session.remove(s)) {
                    for id in ids {
                        self.statements.remove(&id);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn remember(&mut self, id: &str, record: &Map<String, Value>) {
        let Some(session) = record.get("session").and_then(Value::as_str) else {
            return;
        };
        let kept: Map<String, Value> = STATEMENT_FIELDS
            .iter()
            .filter_map(|k| Some((k.to_string(), record.get(*k)?.clone())))
            .collect();
        self.statements.insert(id.to_owned(), Arc::new(kept));
        self.by_session
            .entry(session.to_owned())
            .or_default()
            .push(id.to_owned());
    }

    /// The record with what its `of` statement record holds inlined, in the order a
    /// statement record has them: who and where after `of`, the text and classification
    /// before `ts`. Records that point to no statement record are returned as they are.
    /// (Call it right after [`Reader::read`] of the record.)
    pub fn expand(&self, record: Map<String, Value>) -> Map<String, Value> {
        let kind = record.get("kind").and_then(Value::as_str);
        if !matches!(kind, Some("execute" | "bind")) {
            return record;
        }
        let Some(of) = record
            .get("of")
            .and_then(Value::as_str)
            .and_then(|of| self.statements.get(of))
            .cloned()
        else {
            return record;
        };
        // Who and where come before the statement's text.
        let text_at = STATEMENT_FIELDS
            .iter()
            .position(|f| *f == "sql")
            .expect("sql is a statement field");
        let (who, rest) = STATEMENT_FIELDS.split_at(text_at);
        let what = &rest[..rest.len() - 1];
        let inline = |out: &mut Map<String, Value>, names: &[&str]| {
            for k in names {
                if let (Some(v), false) = (of.get(*k), record.contains_key(*k)) {
                    out.insert(k.to_string(), v.clone());
                }
            }
        };
        // An execution allowed by the policies that allowed its statement leaves them out.
        let allowed_as_its_statement = record.get("decision").and_then(Value::as_str)
            == Some("allow")
            && !record.contains_key("policies");
        let mut out = Map::new();
        let mut placed = false;
        for (k, v) in &record {
            if k == "ts" {
                inline(&mut out, what);
                placed = true;
            }
            out.insert(k.clone(), v.clone());
            if k == "of" {
                inline(&mut out, who);
            }
            if k == "decision" && allowed_as_its_statement {
                inline(&mut out, &["policies"]);
            }
        }
        if !placed {
            inline(&mut out, what);
        }
        out
    }
}

/// Reads every line of `input`; stops at the first that is not a record or whose references
/// are broken.
pub fn check(input: impl BufRead) -> std::io::Result<Result<Counts, Broken>> {
    check_with(Reader::new(), input)
}

/// [`check`] with `reader` (e.g. [`Reader::continuing`]).
pub fn check_with(
    mut reader: Reader,
    input: impl BufRead,
) -> std::io::Result<Result<Counts, Broken>> {
    for line in input.split(b'\n') {
        match reader.read(&line?) {
            Ok((_, None)) => {}
            Ok((_, Some(b))) | Err(b) => return Ok(Err(b)),
        }
    }
    Ok(Ok(reader.counts()))
}

/// Writes every record of `input` to `out` expanded, one JSON object per line; a record whose
/// reference is broken is written as it is, and a line that is not a record is left out. Every
/// such problem is in the list returned.
pub fn expand(input: impl BufRead, mut out: impl Write) -> std::io::Result<(Counts, Vec<Broken>)> {
    let mut reader = Reader::new();
    let mut problems = Vec::new();
    for line in input.split(b'\n') {
        match reader.read(&line?) {
            Ok((record, problem)) => {
                let record = match problem {
                    Some(p) => {
                        problems.push(p);
                        record
                    }
                    None => reader.expand(record),
                };
                serde_json::to_writer(&mut out, &record)?;
                out.write_all(b"\n")?;
            }
            Err(b) => problems.push(b),
        }
    }
    out.flush()?;
    Ok((reader.counts(), problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = r#"{"v":2,"id":"r-0","kind":"session","decision":"allow","identity":{"uid":1},"principal":"uid:1","database":"app","role":"app","ts":"t","hash":"h"}"#;
    const PARSE: &str = r#"{"v":2,"id":"r-1","kind":"statement","session":"r-0","principal":"uid:1","role":"app","database":"app","protocol":"parse","statement":"s0","decision":"allow","policies":["p"],"sql":"SELECT 1","statements":[{"command":"select","node":"SelectStmt"}],"ts":"t","hash":"h"}"#;

    fn execute(id: &str, of: &str) -> String {
        format!(
            r#"{{"v":2,"id":"{id}","kind":"execute","of":"{of}","decision":"allow","policies":["p"],"ts":"t","hash":"h"}}"#
        )
    }

    fn completion(of: &str) -> String {
        format!(
            r#"{{"v":2,"kind":"completion","of":"{of}","tag":"SELECT 1","duration_us":5,"ts":"t","hash":"h"}}"#
        )
    }

    fn file(lines: &[&str]) -> Vec<u8> {
        lines.join("\n").into_bytes()
    }

    fn checked(lines: &[&str]) -> Result<Counts, Broken> {
        check(&file(lines)[..]).unwrap()
    }

    #[test]
    fn executions_point_to_an_earlier_statement_record() {
        let (e2, e3) = (execute("r-2", "r-1"), execute("r-3", "r-1"));
        let (c1, c2, c3) = (completion("r-1"), completion("r-2"), completion("r-3"));
        let counts = checked(&[SESSION, PARSE, &c1, &e2, &c2, &e3, &c3]).unwrap();
        assert_eq!(
            counts,
            Counts {
                records: 7,
                statements: 1,
                executions: 2,
                completions: 3,
                earlier: 0,
            }
        );
        // Read from the middle of a rotated set, the references before it are counted.
        let mut reader = Reader::continuing();
        for line in [&e3, &c3, &c2] {
            let (_, problem) = reader.read(line.as_bytes()).unwrap();
            assert_eq!(problem, None);
        }
        assert_eq!(
            reader.counts().earlier,
            2,
            "r-1 (of r-3) and r-2; r-3 is read"
        );
    }

    #[test]
    fn a_reference_to_nothing_earlier_is_broken() {
        let e2 = execute("r-2", "r-1");
        // Before its statement record (moved), to one that is not there (removed), to a
        // record that is not a statement record.
        for (lines, line) in [
            (vec![SESSION, &e2, PARSE], 2),
            (vec![SESSION, &e2], 2),
            (vec![SESSION, PARSE, &e2, &execute("r-3", "r-2")], 4),
        ] {
            let b = checked(&lines).unwrap_err();
            assert_eq!(b.line, line, "{b}");
            assert!(b.reason.contains("no statement record earlier"), "{b}");
        }
        // After the session ended.
        let end = r#"{"v":2,"id":"r-9","kind":"session_end","session":"r-0","ts":"t","hash":"h"}"#;
        let b = checked(&[SESSION, PARSE, end, &e2]).unwrap_err();
        assert_eq!(b.line, 4);
        // A completion of nothing, and a second completion of the same record.
        let c = completion("r-1");
        assert_eq!(checked(&[SESSION, &c]).unwrap_err().line, 2);
        assert_eq!(checked(&[SESSION, PARSE, &c, &c]).unwrap_err().line, 4);
        // The same id twice.
        assert_eq!(checked(&[SESSION, PARSE, PARSE]).unwrap_err().line, 3);
    }

    #[test]
    fn lines_that_are_not_records_and_newer_formats_are_reported() {
        assert_eq!(checked(&[SESSION, "nope"]).unwrap_err().line, 2);
        assert_eq!(checked(&[SESSION, "[1]"]).unwrap_err().line, 2);
        let b = checked(&[r#"{"v":3,"kind":"x"}"#]).unwrap_err();
        assert!(b.reason.contains("version 3"), "{b}");
    }

    #[test]
    fn format_1_records_carry_everything_and_are_counted() {
        let v1 = [
            r#"{"id":"a-1","kind":"statement","protocol":"parse","sql":"SELECT 1","prev":"0","hash":"h"}"#,
            r#"{"id":"a-2","kind":"statement","protocol":"execute","sql":"SELECT 1","prev":"h","hash":"h"}"#,
            r#"{"id":"a-3","kind":"completion","statement":"a-2","sqlstate":"00000","prev":"h","hash":"h"}"#,
        ];
        let counts = checked(&v1).unwrap();
        assert_eq!((counts.statements, counts.executions), (2, 1));
    }

    #[test]
    fn a_statement_run_at_once_is_its_own_execution() {
        let at_once = r#"{"v":2,"id":"r-1","kind":"statement","session":"r-0","protocol":"parse","decision":"allow","sql":"SELECT 1","executed":true,"ts":"t","hash":"h"}"#;
        let counts = checked(&[SESSION, at_once, &completion("r-1")]).unwrap();
        assert_eq!(
            (counts.statements, counts.executions, counts.completions),
            (1, 1, 1)
        );
        let counts = checked(&[SESSION, PARSE, &completion("r-1")]).unwrap();
        assert_eq!((counts.statements, counts.executions), (1, 0));
    }

    #[test]
    fn expand_inlines_the_statement_into_each_execution() {
        let (e2, bad) = (execute("r-2", "r-1"), execute("r-3", "r-7"));
        let mut out = Vec::new();
        let (counts, problems) =
            expand(&file(&[SESSION, PARSE, &e2, "torn", &bad])[..], &mut out).unwrap();
        assert_eq!(counts.executions, 2);
        assert_eq!(problems.iter().map(|p| p.line).collect::<Vec<_>>(), [4, 5]);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], SESSION);
        assert_eq!(lines[1], PARSE);
        assert_eq!(
            lines[2],
            r#"{"v":2,"id":"r-2","kind":"execute","of":"r-1","session":"r-0","principal":"uid:1","role":"app","database":"app","statement":"s0","decision":"allow","policies":["p"],"sql":"SELECT 1","statements":[{"command":"select","node":"SelectStmt"}],"ts":"t","hash":"h"}"#
        );
        assert_eq!(lines[3], bad, "a broken reference is written as it is");
    }
}
