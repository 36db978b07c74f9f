//! Every statement a session sends, written to the audit log before it is forwarded.
//!
//! A simple Query is recorded with its classification; the extended protocol's Parse likewise,
//! and each Execute with the SQL of the statement its portal was bound to (prepared statements
//! run many times and each run is recorded). FunctionCall is recorded by function oid. Text of
//! statements that can carry secrets (CREATE/ALTER ROLE … PASSWORD, user mappings, servers) is
//! stored normalized, with constants replaced by placeholders.
//!
//! No policy decides yet (issue: statement authorization): each record says `"policy": "none"`.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::audit::{AuditError, AuditLog};
use crate::sql;
use crate::wire::{FrontendMessage, Target};

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

pub struct StatementLog {
    audit: AuditLog,
    session_id: String,
    principal: String,
    role: String,
    database: String,
    /// Protocol-level prepared statements: name → SQL (the unnamed one is "").
    prepared: HashMap<Vec<u8>, Arc<str>>,
    /// Portals: name → the prepared statement they were bound to.
    portals: HashMap<Vec<u8>, Vec<u8>>,
}

impl StatementLog {
    pub fn new(
        audit: AuditLog,
        session_id: String,
        principal: String,
        role: String,
        database: String,
    ) -> StatementLog {
        StatementLog {
            audit,
            session_id,
            principal,
            role,
            database,
            prepared: HashMap::new(),
            portals: HashMap::new(),
        }
    }

    fn base(&self, protocol: &str) -> Map<String, Value> {
        crate::audit_fields! {
            "id" => self.audit.next_id(),
            "kind" => "statement",
            "session" => self.session_id,
            "principal" => self.principal,
            "role" => self.role,
            "database" => self.database,
            "protocol" => protocol,
            "policy" => "none",
        }
    }

    /// Classifies `text` and returns (what to store as the text, the classification).
    /// `standard_conforming_strings` decides where string literals, and so statements, end.
    fn describe(&self, text: &[u8], standard_conforming_strings: bool) -> (Value, Value) {
        let text = String::from_utf8_lossy(text);
        match sql::classify(&text, standard_conforming_strings) {
            Ok(statements) => {
                let secret = statements
                    .iter()
                    .any(|s| SECRET_NODES.contains(&s.node.as_str()));
                let stored = if secret {
                    pg_query::normalize(&text).unwrap_or_else(|_| "<redacted>".into())
                } else {
                    text.into_owned()
                };
                (Value::String(stored), json!(statements))
            }
            // The server will refuse it too; its text is not stored, since a mistyped statement
            // can still carry a password.
            Err(e) => (
                Value::String(format!("<unparsed, {} bytes>", text.len())),
                json!({ "error": e.to_string() }),
            ),
        }
    }

    /// Notes one validated message about to be forwarded; statements add a record to
    /// `records`, which [`StatementLog::commit`] writes before the messages are forwarded.
    pub fn observe(
        &mut self,
        message: &FrontendMessage<'_>,
        standard_conforming_strings: bool,
        records: &mut Vec<Map<String, Value>>,
    ) {
        match *message {
            FrontendMessage::Query { sql } => {
                let (text, statements) = self.describe(sql, standard_conforming_strings);
                let mut r = self.base("simple");
                r.insert("sql".into(), text);
                r.insert("statements".into(), statements);
                records.push(r);
            }
            FrontendMessage::Parse { name, sql, .. } => {
                let (text, statements) = self.describe(sql, standard_conforming_strings);
                let mut r = self.base("parse");
                r.insert("statement".into(), json!(String::from_utf8_lossy(name)));
                r.insert("sql".into(), text.clone());
                r.insert("statements".into(), statements);
                records.push(r);
                let stored: Arc<str> = text.as_str().unwrap_or_default().into();
                self.prepared.insert(name.to_vec(), stored);
            }
            FrontendMessage::Bind {
                portal, statement, ..
            } => {
                self.portals.insert(portal.to_vec(), statement.to_vec());
            }
            FrontendMessage::Execute { portal, .. } => {
                let statement = self.portals.get(portal).cloned().unwrap_or_default();
                let mut r = self.base("execute");
                r.insert("portal".into(), json!(String::from_utf8_lossy(portal)));
                r.insert(
                    "statement".into(),
                    json!(String::from_utf8_lossy(&statement)),
                );
                if let Some(sql) = self.prepared.get(&statement) {
                    r.insert("sql".into(), json!(sql.as_ref()));
                }
                records.push(r);
            }
            FrontendMessage::Close { target, name } => match target {
                Target::Statement => {
                    self.prepared.remove(name);
                }
                Target::Portal => {
                    self.portals.remove(name);
                }
            },
            FrontendMessage::FunctionCall { function_oid, .. } => {
                let mut r = self.base("function_call");
                r.insert("function_oid".into(), json!(function_oid));
                records.push(r);
            }
            _ => {}
        }
    }

    /// Writes `records` and returns once all are written (and synced, with durability
    /// `always`). One wait covers the batch: the writer keeps order and acknowledges the last
    /// record only once everything before it is written too.
    pub async fn commit(&self, mut records: Vec<Map<String, Value>>) -> Result<(), AuditError> {
        let Some(last) = records.pop() else {
            return Ok(());
        };
        for r in records {
            self.audit.record_later(r);
        }
        self.audit.record(last).await
    }
}
