//! The decision records a gate writes: what a statement or execution record says about the
//! statement it decides (its text and classification, or the statement record holding them),
//! and the completion record of the server's answer.

use serde_json::Value;

use super::{Classified, Gate, StatementRecord};
use crate::audit::Record;
use crate::policy::Decision;

/// Node types whose text may hold a password or a credential.
const SECRET_NODES: &[&str] = &[
    "CreateRoleStmt",
    "AlterRoleStmt",
    "CreateUserMappingStmt",
    "AlterUserMappingStmt",
    "CreateForeignServerStmt",
    "AlterForeignServerStmt",
    "CreateSubscriptionStmt",
    "AlterSubscriptionStmt",
];

/// What a decision record says about the statement it decides.
#[derive(Clone, Copy)]
pub(super) enum About<'a> {
    /// Its text (if there is one) and classification, written out, with the session's who and
    /// where: a statement record, or the record of an execution whose statement record is not
    /// known (fail safe: every record can be read on its own or through the one it names).
    Text(Option<&'a str>, &'a Classified),
    /// The statement record that holds them (a Parse's).
    Of(&'a StatementRecord),
}

impl Gate {
    /// Writes a decision record of `kind` (`statement`, `execute`, `bind`); returns its id.
    /// `extra`: names and the like, each left out when it is null or empty (an unnamed
    /// statement or portal).
    pub(super) fn record(
        &mut self,
        kind: &str,
        protocol: Option<&str>,
        about: About<'_>,
        decision: &Decision,
        extra: &[(&str, Value)],
    ) -> Option<String> {
        let command = match about {
            About::Of(of) => of.command,
            About::Text(_, Ok(list)) => list.first().map_or("empty", |s| s.command),
            About::Text(_, Err(_)) => "unreadable",
        };
        self.count(decision.allowed, command);
        let audit = self.audit.as_ref()?;
        let id = audit.next_id();
        let mut r = crate::audit_fields! {
            "id" => id,
            "kind" => kind,
        };
        match about {
            // Who and where are the statement record's, as are the text and classification.
            About::Of(of) => r.add("of", &*of.id),
            About::Text(..) => {
                r.add("session", &self.info.session_id());
                r.add("principal", &**self.info.facts.principal);
                // The person beside the workload, whichever of them the mapping matched.
                if let Some(p) = &self.info.facts.identity.person {
                    r.add("person", &p.principal());
                }
                r.add("role", &**self.info.facts.role);
                r.add("database", &**self.info.facts.database);
            }
        }
        if let Some(protocol) = protocol {
            r.add("protocol", protocol);
        }
        for (k, v) in extra {
            if !(v.is_null() || v.as_str() == Some("")) {
                r.add(k, v);
            }
        }
        r.add("decision", if decision.allowed { "allow" } else { "deny" });
        // An execution allowed by the policies that allowed its statement says so by omission.
        let same_policies = matches!(about, About::Of(of)
            if decision.allowed && of.policies == decision.policies);
        if !decision.policies.is_empty() && !same_policies {
            r.add("policies", &decision.policies);
        }
        if let Some(d) = &decision.denied {
            r.add("denied", d);
        }
        if let Some(reason) = &decision.reason {
            r.add("reason", reason);
        }
        match about {
            About::Of(_) => {}
            About::Text(text, Ok(list)) => {
                if let Some(text) = text {
                    let secret = list.iter().any(|s| SECRET_NODES.contains(&s.node.as_str()));
                    if secret {
                        let normalized = pg_query::normalize(text);
                        r.add("sql", normalized.as_deref().unwrap_or("<redacted>"));
                    } else {
                        r.add("sql", text);
                    }
                }
                if !list.is_empty() {
                    r.add("statements", &**list);
                }
            }
            About::Text(text, Err(e)) => {
                // A statement that does not parse can still carry a password: its text is not
                // stored.
                if let Some(text) = text {
                    r.add("sql", &format!("<unparsed, {} bytes>", text.len()));
                }
                r.add("error", &e.to_string());
            }
        }
        self.records.push(r);
        Some(id)
    }

    fn count(&self, allowed: bool, command: &'static str) {
        self.info.decided(allowed);
        crate::metrics::get().decided(allowed, command);
    }

    /// An allowed Execute of the unnamed statement through the unnamed portal, in the batch
    /// that parsed it and allowed by the same policies (`pgbench -M extended`, and most
    /// drivers' one-off statements: Parse, Bind, Execute, Sync at once): the statement record,
    /// not written yet, says `"executed": true` and stands for the execution too, whose
    /// completion is its completion. One record and one completion per statement run, as for
    /// a simple Query, instead of two of each. Returns the record's id; `None`: the Parse was
    /// in an earlier batch (its record is written), or this execution is not its first.
    pub(super) fn executed_at_once(
        &mut self,
        of: &StatementRecord,
        expects: &mut [super::Expect],
    ) -> Option<String> {
        let parse = expects.iter_mut().find(|e| {
            e.kind == super::ExpectKind::Parse
                && !e.execution_follows
                && e.record.as_deref() == Some(&*of.id)
        })?;
        let record = self.records.iter_mut().rev().find(|r| r.id_is(&of.id))?;
        record.add("executed", &true);
        parse.execution_follows = true;
        self.count(true, of.command);
        Some(of.id.to_string())
    }
}

/// The completion record of decision record `of`: how its statement ended, each fact once.
/// `sqlstate` only when it failed (success is the rule, and the tag says it); `skipped` when
/// the server skipped it (an earlier message of its pipeline failed); `tag` as the server
/// sent it; `rows` only when the tag does not end with that count (a query string of several
/// statements sums theirs, an empty query has no tag). No id: nothing points to it.
pub fn completion_record(
    of: &str,
    sqlstate: Option<&str>,
    rows: Option<u64>,
    tag: Option<&str>,
    micros: u64,
) -> Record {
    let mut r = crate::audit_fields! {
        "kind" => "completion",
        "of" => of,
    };
    match sqlstate {
        None => r.add("skipped", &true),
        Some("00000") => {}
        Some(code) => r.add("sqlstate", code),
    }
    if let Some(tag) = tag {
        r.add("tag", tag);
    }
    if let Some(n) = rows {
        let said = tag.is_some_and(|t| t.rsplit(' ').next() == Some(n.to_string().as_str()));
        if !said {
            r.add("rows", &n);
        }
    }
    r.add("duration_us", &micros);
    r
}
