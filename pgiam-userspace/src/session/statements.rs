//! Where a client's statement is authorized: every message after login passes [`Gate::check`],
//! which classifies the SQL it carries, asks the policy, writes the decision record and says
//! what may be forwarded. Only an [`Authorized`] lets the client's own bytes through; a refused
//! message is replaced by a sentinel that makes the server fail at exactly that point (so a
//! pipeline, a transaction block and the unnamed statement behave as after a server error),
//! and [`super::responses`] puts pgiam's error in place of the server's.
//!
//! Prepared statements share one namespace, as in PostgreSQL: protocol Parse and SQL PREPARE
//! both add to it, Close and DEALLOCATE remove, EXECUTE and Execute are authorized against the
//! classification stored when the statement was created, with the policy in force now.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};

use crate::audit::{AuditLog, Record, Written};
use crate::policy::{Ask, Decision, DecisionCache, PolicyStore, Principal, Resolver};
use crate::sql::{self, Effect, Statement};
use crate::wire::{FrontendMessage, PgError, Target};

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

/// Text that no PostgreSQL parses: the server answers it with a syntax error (42601), or with
/// 25P02 inside a failed transaction, and does nothing else.
pub const SENTINEL_SQL: &str = "pgiam_refused";

/// The client's message may be forwarded as it is. Only [`Gate::check`] makes one.
#[derive(Debug)]
pub struct Authorized(());

/// What to forward for one client message.
#[derive(Debug)]
pub enum Checked {
    Forward(Authorized),
    /// Forward these bytes instead: the sentinel for a refused message.
    Substitute(Bytes),
}

/// A response the server owes, in the order the requests were forwarded.
#[derive(Debug)]
pub struct Expect {
    pub kind: ExpectKind,
    /// The decision record this response completes.
    pub record: Option<String>,
    /// The statement was refused: the server's error for the sentinel is replaced by this.
    /// (Boxed: rare, and a queue of these is what an idle session keeps.)
    pub refused: Option<Box<PgError>>,
    /// Prepared statements this request creates: (index of the statement in a Query, name,
    /// generation). They are forgotten if the statement fails.
    pub creates: Vec<(usize, Vec<u8>, u64)>,
    pub started: std::time::Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectKind {
    Query,
    FunctionCall,
    Parse,
    Bind,
    Execute,
    Describe,
    Close,
    Sync,
}

impl ExpectKind {
    /// Part of the extended protocol: after an error the server skips these until Sync.
    pub fn is_extended(self) -> bool {
        !matches!(
            self,
            ExpectKind::Query | ExpectKind::FunctionCall | ExpectKind::Sync
        )
    }
}

/// A statement's text and classification, shared by a prepared statement and its portals.
#[derive(Debug, Clone)]
struct Plan {
    sql: Arc<str>,
    statements: Arc<[Statement]>,
}

/// A prepared statement the server may hold.
#[derive(Debug)]
struct Prepared {
    plan: Plan,
    generation: u64,
}

/// Who the session is, for its records.
pub struct SessionInfo {
    pub session_id: Option<String>,
    pub principal_name: String,
    pub role: String,
    pub database: String,
    /// Kept as facts and written out per record: an idle session holds a few hundred bytes,
    /// not the JSON tree.
    pub identity: crate::identity::Identity,
}

pub struct Gate {
    audit: Option<AuditLog>,
    policies: Arc<PolicyStore>,
    policy_generation: u64,
    policy: Arc<crate::policy::Policy>,
    decisions: DecisionCache,
    principal: Arc<Principal>,
    resolver: Resolver,
    gateway: bool,
    info: SessionInfo,
    prepared: HashMap<Vec<u8>, Prepared>,
    /// Portal → the statement it was bound to, as it was at Bind (a portal keeps its plan
    /// when the statement's name is reused); `None`: bound to a statement pgiam did not know.
    portals: HashMap<Vec<u8>, (Vec<u8>, Option<Plan>)>,
    next_generation: u64,
    /// Decision records for the messages checked since the last [`Gate::take_records`].
    records: Vec<Record>,
    /// The most any message checked since then can change when it runs.
    effect: Effect,
}

/// Decision records to write before (or while) the messages they decide are forwarded.
pub struct Records {
    pub records: Vec<Record>,
    /// The most the forwarded messages can change in the database: with [`Effect::None`] the
    /// records need only be on disk before the client sees an answer, not before the server
    /// sees the messages.
    pub effect: Effect,
}

/// A statement's classification, or why there is none.
type Classified = Result<Arc<[Statement]>, sql::SqlError>;

impl Gate {
    pub fn new(
        audit: Option<AuditLog>,
        policies: Arc<PolicyStore>,
        principal: Arc<Principal>,
        resolver: Resolver,
        gateway: bool,
        info: SessionInfo,
    ) -> Gate {
        Gate {
            audit,
            policy_generation: policies.generation(),
            policy: policies.current(),
            policies,
            decisions: DecisionCache::default(),
            principal,
            resolver,
            gateway,
            info,
            prepared: HashMap::new(),
            portals: HashMap::new(),
            next_generation: 0,
            records: Vec::new(),
            effect: Effect::None,
        }
    }

    /// Takes up a reloaded policy; decisions cached under the old one are dropped. Returns
    /// whether the policy changed.
    pub fn refresh_policy(&mut self) -> bool {
        let g = self.policies.generation();
        if g == self.policy_generation {
            return false;
        }
        self.policy_generation = g;
        self.policy = self.policies.current();
        self.decisions.clear();
        true
    }

    /// May the session still connect under the policy in force? (Checked whenever the policy
    /// is replaced: a session whose access was revoked ends, idle or not.)
    pub fn may_connect(&mut self) -> Decision {
        let ask = Ask::on_database(crate::policy::Action::Connect, "connect");
        self.decide(&[ask])
    }

    pub fn database(&self) -> &str {
        &self.info.database
    }

    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// A prepared statement the server did not create after all.
    pub fn forget_prepared(&mut self, name: &[u8], generation: u64) {
        if self.prepared.get(name).map(|p| p.generation) == Some(generation) {
            self.prepared.remove(name);
        }
    }

    fn decide(&mut self, asks: &[Ask]) -> Decision {
        self.decisions
            .decide_all(&self.policy, &self.principal, asks)
    }

    /// Decides a list of statements (a Query's, or one prepared statement's): allowed only if
    /// every one is.
    fn decide_statements(&mut self, statements: &[Statement]) -> Decision {
        // PREPAREs earlier in the same query string, which an EXECUTE after them runs.
        let mut earlier: HashMap<&str, Arc<[Statement]>> = HashMap::new();
        let mut decisions = Vec::with_capacity(statements.len());
        for s in statements {
            let d = self.decide_statement(s, &earlier);
            let denied = !d.allowed;
            decisions.push(d);
            if denied {
                break;
            }
            if let Some(name) = &s.prepares {
                earlier.insert(name, Arc::from(vec![s.clone()]));
            }
        }
        Decision::all(decisions)
    }

    fn decide_statement(
        &mut self,
        s: &Statement,
        earlier: &HashMap<&str, Arc<[Statement]>>,
    ) -> Decision {
        if let Some(d) = crate::policy::fixed_refusal(s, self.gateway) {
            return d;
        }
        let mut asks = self.resolver.asks(s);
        if let Some(name) = &s.executes {
            let known = earlier
                .get(name.as_str())
                .cloned()
                .or_else(|| Some(self.prepared.get(name.as_bytes())?.plan.statements.clone()));
            let Some(inner) = known else {
                return Decision::refuse(
                    format!("execute {name}"),
                    "no prepared statement of that name is known to pgiam",
                );
            };
            for i in inner.iter() {
                if let Some(d) = crate::policy::fixed_refusal(i, self.gateway) {
                    return d;
                }
                asks.extend(self.resolver.asks(i));
            }
        }
        self.decide(&asks)
    }

    /// Adds a prepared statement the server is about to create; `index` is its statement's
    /// place in a Query. A named statement that exists is not replaced: the server refuses to
    /// create it again (42P05) and keeps the old one. The unnamed one is always replaced.
    fn prepare(
        &mut self,
        name: &[u8],
        plan: impl FnOnce() -> Plan,
        index: usize,
        creates: &mut Vec<(usize, Vec<u8>, u64)>,
    ) {
        if !name.is_empty() && self.prepared.contains_key(name) {
            return;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        self.prepared.insert(
            name.to_vec(),
            Prepared {
                plan: plan(),
                generation,
            },
        );
        creates.push((index, name.to_vec(), generation));
    }

    /// Effects on pgiam's view of the session of statements that will run.
    fn apply_effects(
        &mut self,
        statements: &[Statement],
        text: &str,
        creates: &mut Vec<(usize, Vec<u8>, u64)>,
    ) {
        for (i, s) in statements.iter().enumerate() {
            if s.temp {
                self.resolver.temp = true;
            }
            if let Some(name) = &s.prepares {
                let plan = || Plan {
                    sql: text.into(),
                    statements: Arc::from(vec![s.clone()]),
                };
                self.prepare(name.as_bytes(), plan, i, creates);
            }
            match s.deallocates.as_deref() {
                Some("") => self.prepared.retain(|n, _| n.is_empty()),
                Some(n) => {
                    self.prepared.remove(n.as_bytes());
                }
                None => {}
            }
            if s.node == "DiscardStmt" && s.role_change {
                // DISCARD ALL: every prepared statement goes, and temporary tables with it.
                self.prepared.clear();
                self.portals.clear();
            }
        }
    }

    fn classify(sql: &[u8], scs: bool) -> Classified {
        match std::str::from_utf8(sql) {
            Ok(text) => sql::classify_cached(text, scs),
            Err(_) => Err(sql::SqlError::Syntax(
                "statement text is not valid UTF-8".into(),
            )),
        }
    }

    /// Writes the decision record; returns its id.
    fn record(
        &mut self,
        protocol: &str,
        text: Option<&str>,
        statements: &Classified,
        decision: &Decision,
        extra: &[(&str, Value)],
    ) -> Option<String> {
        let audit = self.audit.as_ref()?;
        let id = audit.next_id();
        let mut r = crate::audit_fields! {
            "id" => id,
            "kind" => "statement",
            "session" => self.info.session_id,
            "principal" => self.info.principal_name,
            "role" => self.info.role,
            "database" => self.info.database,
            "identity" => self.info.identity,
            "protocol" => protocol,
            "decision" => if decision.allowed { "allow" } else { "deny" },
            "policies" => decision.policies,
        };
        if let Some(d) = &decision.denied {
            r.add("denied", d);
        }
        if let Some(reason) = &decision.reason {
            r.add("reason", reason);
        }
        for (k, v) in extra {
            r.add(k, v);
        }
        match statements {
            Ok(list) => {
                if let Some(text) = text {
                    let secret = list.iter().any(|s| SECRET_NODES.contains(&s.node.as_str()));
                    if secret {
                        let normalized = pg_query::normalize(text);
                        r.add("sql", normalized.as_deref().unwrap_or("<redacted>"));
                    } else {
                        r.add("sql", text);
                    }
                }
                r.add("statements", &**list);
            }
            Err(e) => {
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

    /// The decision for a classification, or the refusal for text that does not parse.
    fn decide_classified(&mut self, statements: &Classified) -> (Decision, &'static str) {
        match statements {
            Ok(list) => {
                let list = list.clone();
                (self.decide_statements(&list), "42501")
            }
            Err(e) => (
                Decision::refuse("parse", format!("pgiam cannot parse the statement: {e}")),
                "42601",
            ),
        }
    }

    /// Checks one client message; `expects` receives the response the server will owe for it.
    pub fn check(
        &mut self,
        message: &FrontendMessage<'_>,
        standard_conforming_strings: bool,
        expects: &mut Vec<Expect>,
    ) -> Checked {
        let started = std::time::Instant::now();
        let mut expect = |kind, record: Option<String>, refused: Option<PgError>, creates| {
            expects.push(Expect {
                kind,
                record,
                refused: refused.map(Box::new),
                creates,
                started,
            })
        };
        match *message {
            FrontendMessage::Query { sql } => {
                let classified = Self::classify(sql, standard_conforming_strings);
                let (decision, code) = self.decide_classified(&classified);
                let text = String::from_utf8_lossy(sql);
                let id = self.record("simple", Some(&text), &classified, &decision, &[]);
                if !decision.allowed {
                    let e = refusal(code, &decision, id.as_deref());
                    expect(ExpectKind::Query, id, Some(e), Vec::new());
                    return Checked::Substitute(sentinel_query());
                }
                let mut creates = Vec::new();
                if let Ok(list) = &classified {
                    self.apply_effects(list, &text, &mut creates);
                    self.effect = self.effect.max(effect(list));
                }
                expect(ExpectKind::Query, id, None, creates);
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Parse { name, sql, .. } => {
                let classified = Self::classify(sql, standard_conforming_strings);
                let (decision, code) = self.decide_classified(&classified);
                let text = String::from_utf8_lossy(sql);
                let statement = json!(String::from_utf8_lossy(name));
                let id = self.record(
                    "parse",
                    Some(&text),
                    &classified,
                    &decision,
                    &[("statement", statement)],
                );
                if !decision.allowed {
                    // A failed Parse of the unnamed statement drops the old one, as here.
                    if name.is_empty() {
                        self.prepared.remove(name);
                    }
                    let e = refusal(code, &decision, id.as_deref());
                    expect(ExpectKind::Parse, id, Some(e), Vec::new());
                    // A failed named Parse leaves the namespace as it was, whatever the name.
                    let target = if name.is_empty() { "" } else { SENTINEL_SQL };
                    return Checked::Substitute(sentinel_parse(target));
                }
                let mut creates = Vec::new();
                if let Ok(list) = classified {
                    self.effect = self.effect.max(effect(&list));
                    let plan = || Plan {
                        sql: text.into(),
                        statements: list,
                    };
                    self.prepare(name, plan, 0, &mut creates);
                }
                expect(ExpectKind::Parse, id, None, creates);
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Bind {
                portal, statement, ..
            } => {
                let bound = self.prepared.get(statement).map(|p| p.plan.clone());
                self.portals
                    .insert(portal.to_vec(), (statement.to_vec(), bound));
                expect(ExpectKind::Bind, None, None, Vec::new());
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Execute { portal, .. } => self.check_execute(portal, expects, started),
            FrontendMessage::Describe { .. } => {
                expect(ExpectKind::Describe, None, None, Vec::new());
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Close { target, name } => {
                match target {
                    Target::Statement => {
                        self.prepared.remove(name);
                    }
                    Target::Portal => {
                        self.portals.remove(name);
                    }
                }
                expect(ExpectKind::Close, None, None, Vec::new());
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Sync => {
                expect(ExpectKind::Sync, None, None, Vec::new());
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::FunctionCall { function_oid, .. } => {
                let ask = Ask {
                    function_oid: Some(function_oid),
                    ..Ask::on_database(crate::policy::Action::FunctionCall, "function_call")
                };
                // The function is known only by its oid: in gateway mode it could be
                // set_config('role', …), so no policy can allow it there.
                let decision = if self.gateway {
                    Decision::refuse(
                        "function call in gateway mode",
                        "in gateway mode FunctionCall messages are refused",
                    )
                } else {
                    self.decide(&[ask])
                };
                let id = self.record(
                    "function_call",
                    None,
                    &Ok(Arc::from(Vec::new())),
                    &decision,
                    &[("function_oid", json!(function_oid))],
                );
                if !decision.allowed {
                    let e = refusal("42501", &decision, id.as_deref());
                    expect(ExpectKind::FunctionCall, id, Some(e), Vec::new());
                    return Checked::Substitute(sentinel_query());
                }
                self.effect = Effect::Immediate;
                expect(ExpectKind::FunctionCall, id, None, Vec::new());
                Checked::Forward(Authorized(()))
            }
            // Flush and COPY data: no response of their own, nothing to decide (the COPY
            // statement was).
            _ => Checked::Forward(Authorized(())),
        }
    }

    fn check_execute(
        &mut self,
        portal: &[u8],
        expects: &mut Vec<Expect>,
        started: std::time::Instant,
    ) -> Checked {
        let portal_name = json!(String::from_utf8_lossy(portal));
        let bound = self.portals.get(portal).cloned();
        let (decision, text, classified, statement) = match bound {
            Some((name, Some(p))) => {
                let classified: Classified = Ok(p.statements.clone());
                let text = p.sql.clone();
                let (d, _) = self.decide_classified(&classified);
                (
                    d,
                    Some(text),
                    classified,
                    json!(String::from_utf8_lossy(&name)),
                )
            }
            // Bound to a statement pgiam does not know: nothing to authorize it against.
            Some((name, None)) => (
                Decision::refuse(
                    "execute of an unknown prepared statement",
                    "the portal is bound to a statement pgiam has no classification for",
                ),
                None,
                Ok(Arc::from(Vec::new())),
                json!(String::from_utf8_lossy(&name)),
            ),
            // Never bound here: a cursor opened by DECLARE or by a function, whose query was
            // authorized when it was opened. If no such portal exists the server says so.
            None => (
                Decision {
                    allowed: true,
                    policies: Vec::new(),
                    denied: None,
                    reason: Some("fetch from a cursor authorized when it was opened".into()),
                },
                None,
                Ok(Arc::from(Vec::new())),
                Value::Null,
            ),
        };
        let id = self.record(
            "execute",
            text.as_deref(),
            &classified,
            &decision,
            &[("portal", portal_name), ("statement", statement)],
        );
        let mut creates = Vec::new();
        if decision.allowed {
            match (&classified, &text) {
                (Ok(list), Some(text)) => {
                    self.apply_effects(list, text, &mut creates);
                    self.effect = self.effect.max(effect(list));
                }
                // A cursor's query is not known here.
                _ => self.effect = Effect::Immediate,
            }
        }
        let refused =
            (!decision.allowed).then(|| Box::new(refusal("42501", &decision, id.as_deref())));
        let substitute = refused.is_some();
        expects.push(Expect {
            kind: ExpectKind::Execute,
            record: id,
            refused,
            creates,
            started,
        });
        if substitute {
            // A Parse that fails before it creates anything: the pipeline errors right here.
            Checked::Substitute(sentinel_parse(SENTINEL_SQL))
        } else {
            Checked::Forward(Authorized(()))
        }
    }

    /// The decision records of the messages checked so far, and what those messages can
    /// change.
    pub fn take_records(&mut self) -> Records {
        Records {
            records: std::mem::take(&mut self.records),
            effect: std::mem::replace(&mut self.effect, Effect::None),
        }
    }

    /// Hands `records` to the audit writer; the receiver reports once all are written (and
    /// synced, with durability `always`). One acknowledgement covers the batch: the writer
    /// keeps order and acknowledges the last record only once everything before it is written
    /// too. `None`: nothing to wait for.
    pub fn submit(audit: Option<&AuditLog>, mut records: Vec<Record>) -> Option<Written> {
        let (Some(audit), Some(last)) = (audit, records.pop()) else {
            return None;
        };
        for r in records {
            audit.record_later(r);
        }
        Some(audit.record_acked(last))
    }
}

/// The effect of the statements one message runs.
fn effect(statements: &[Statement]) -> Effect {
    statements
        .iter()
        .map(|s| s.effect)
        .max()
        .unwrap_or(Effect::None)
}

/// The error a client sees for a refused statement: the action and resource, and the audit
/// record in the hint; never the policy's text.
fn refusal(code: &'static str, decision: &Decision, record: Option<&str>) -> PgError {
    let what = decision.denied.as_deref().unwrap_or("statement");
    let mut e = PgError::error(code, format!("pgiam: permission denied: {what}"));
    if let Some(reason) = &decision.reason {
        e = e.with_detail(reason.clone());
    }
    match record {
        Some(id) => e.with_audit_id(id),
        None => e,
    }
}

fn sentinel_query() -> Bytes {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::query(SENTINEL_SQL, &mut b).expect("no NUL");
    b.freeze()
}

fn sentinel_parse(name: &str) -> Bytes {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::parse(name, SENTINEL_SQL, std::iter::empty(), &mut b)
        .expect("no NUL");
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    const ITEMS: &str = r#"permit(principal, action == PgIam::Action::"select",
        resource == PgIam::Table::"app.public.items");"#;

    fn gate(policy: &str) -> (Gate, Arc<PolicyStore>) {
        let store = Arc::new(PolicyStore::fixed(Policy::parse(policy).unwrap()));
        let identity = crate::identity::Identity::for_principal("uid", "1000").unwrap();
        let gate = Gate::new(
            None,
            store.clone(),
            Principal::shared("uid:1000", "app", "app", &identity),
            Resolver::new(&["public".into()], "app"),
            false,
            SessionInfo {
                session_id: None,
                principal_name: "uid:1000".into(),
                role: "app".into(),
                database: "app".into(),
                identity: identity.clone(),
            },
        );
        (gate, store)
    }

    fn forwarded(gate: &mut Gate, m: FrontendMessage<'_>) -> bool {
        let mut expects = Vec::new();
        let c = gate.check(&m, true, &mut expects);
        assert_eq!(expects.len(), 1, "{m:?}");
        assert_eq!(
            expects[0].refused.is_some(),
            matches!(c, Checked::Substitute(_)),
            "a substitute always comes with the refusal that replaces its error"
        );
        matches!(c, Checked::Forward(_))
    }

    fn query(sql: &str) -> FrontendMessage<'_> {
        FrontendMessage::Query {
            sql: sql.as_bytes(),
        }
    }

    #[test]
    fn prepared_statements_share_one_namespace_and_portals_keep_their_plan() {
        let (mut g, store) = gate(ITEMS);
        assert!(forwarded(
            &mut g,
            query("PREPARE p AS SELECT * FROM items; EXECUTE p")
        ));
        assert!(forwarded(&mut g, query("EXECUTE p")));
        assert!(!forwarded(&mut g, query("EXECUTE nope")));
        // Protocol Parse of the unnamed statement, bound, then the name reused: the portal
        // runs what was bound.
        let parse = |sql: &'static str| FrontendMessage::Parse {
            name: b"",
            sql: sql.as_bytes(),
            param_types: 0,
        };
        assert!(forwarded(&mut g, parse("SELECT * FROM items")));
        assert!(forwarded(
            &mut g,
            FrontendMessage::Bind {
                portal: b"c",
                statement: b"",
                params: 0
            }
        ));
        assert!(!forwarded(&mut g, parse("SELECT * FROM secret")));
        let execute = || FrontendMessage::Execute {
            portal: b"c",
            max_rows: 0,
        };
        assert!(forwarded(&mut g, execute()));
        // Revoked: the next Execute of the same portal is refused.
        store.replace(Policy::parse("").unwrap());
        g.refresh_policy();
        assert!(!forwarded(&mut g, execute()));
        // SQL EXECUTE of the protocol's statement is checked against the policy now too.
        assert!(!forwarded(&mut g, query("EXECUTE p")));
    }

    #[test]
    fn a_prepared_statement_the_server_did_not_create_is_forgotten() {
        let (mut g, _) = gate(ITEMS);
        let mut expects = Vec::new();
        let m = query("PREPARE q AS SELECT * FROM items");
        assert!(matches!(
            g.check(&m, true, &mut expects),
            Checked::Forward(_)
        ));
        let (_, name, generation) = expects[0].creates[0].clone();
        assert!(forwarded(&mut g, query("EXECUTE q")));
        g.forget_prepared(&name, generation);
        assert!(!forwarded(&mut g, query("EXECUTE q")));
    }
}
