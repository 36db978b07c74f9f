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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};

use crate::audit::{AuditLog, Record};
use crate::policy::{
    Ask, Decision, DecisionCache, PolicyStore, Principal, Resolver, SessionSettings,
};
use crate::sql::{self, ClientEncoding, Effect, SettingValue, Statement};
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

/// `pg_catalog.set_config(text, text, boolean)`: its oid is fixed in every PostgreSQL release.
const SET_CONFIG_OID: u32 = 2078;

/// The name a refused named Parse is sent under (the client's name must not be created, nor
/// an existing statement of that name dropped).
const SENTINEL_NAME: &str = "pgiam_refused";

/// What the server answers a sentinel with: its parse analysis casts the literal, and no text
/// that says "refused" is an integer. (Inside a failed transaction it is 25P02 instead, which
/// the client sees as the server would have said it about the statement.)
pub const SENTINEL_SQLSTATE: &str = "22P02";

/// The statement that stands in for a refused one. It fails in parse analysis, so it fails at
/// exactly the point the refused message would have run, in every protocol route, and does
/// nothing else; its type is schema-qualified so that no search_path can change what it casts
/// to. The server's log then reads `invalid input syntax for type integer: "pgiam: statement
/// refused by policy, audit record …"` with this text as the STATEMENT: a DBA sees pgiam's
/// refusal and the record to look up, not a syntax error.
fn sentinel_sql(record: Option<&str>) -> String {
    match record {
        Some(id) => format!(
            "SELECT 'pgiam: statement refused by policy, audit record {id}'::pg_catalog.int4"
        ),
        None => "SELECT 'pgiam: statement refused by policy'::pg_catalog.int4".into(),
    }
}

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
    /// A Parse pgiam sends itself, of what the client last parsed as its unnamed statement,
    /// onto a backend that may hold another's (transaction pooling): its ParseComplete is
    /// not the client's; an error is (it is why the client's message fails).
    Reparse,
    /// A Close pgiam sends itself, of what a backend holds under a name the session is about
    /// to use for its own statement: its CloseComplete is not the client's.
    Preclose,
    /// The client ended a COPY FROM STDIN (CopyDone or CopyFail). The server owes nothing for
    /// it; it marks where a copy-in ends, because the server ignores every Sync (and Flush) the
    /// client sends while it is in copy-in mode (drivers send Bind, Execute, Sync before they
    /// know the statement is a COPY).
    CopyEnd,
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
    /// As pgiam read it: transcoded to UTF-8 from the client's encoding.
    sql: Arc<str>,
    statements: Arc<[Statement]>,
    /// The parameter types its Parse declared (0: left to the server).
    param_types: Arc<[u32]>,
    /// The statement record that holds exactly this text and classification (a Parse's), which
    /// the records of its executions point to; `None`: they carry both themselves.
    record: Option<StatementRecord>,
}

/// A statement record the records of executions point to.
#[derive(Debug, Clone)]
struct StatementRecord {
    id: Arc<str>,
    /// Its first statement's command, for the executions' metrics.
    command: &'static str,
    /// The policies that allowed it: an execution allowed by the same ones does not repeat them.
    policies: Arc<[String]>,
}

/// The client encodings a session's statements may be read in.
#[derive(Debug, Clone, Copy)]
struct Encodings {
    /// What the server reported at login: RESET returns to it.
    login: ClientEncoding,
    /// What pgiam last learned: from a statement it decided (which may not have run yet, or
    /// may be rolled back) or from the server's report. Statement text is transcoded from
    /// it; that only changes what non-ASCII characters read as, never where statements,
    /// strings or names end (every such encoding is ASCII-safe).
    current: ClientEncoding,
    /// The first encoding other than UTF8 the session used; once set, never cleared.
    non_utf8: Option<ClientEncoding>,
}

impl Encodings {
    fn saw(&mut self, e: ClientEncoding) {
        if e != ClientEncoding::Utf8 && self.non_utf8.is_none() {
            self.non_utf8 = Some(e);
        }
    }
}

/// A prepared statement the server may hold.
#[derive(Debug)]
struct Prepared {
    plan: Plan,
    generation: u64,
}

/// Who the session is, for its records: its entry among the live sessions (one copy of its
/// identity), whose counters the gate keeps.
pub type SessionInfo = Arc<crate::admin::registry::Live>;

/// What a decision record says about the statement it decides.
#[derive(Clone, Copy)]
enum About<'a> {
    /// Its text (if there is one) and classification, written out, with the session's who and
    /// where: a statement record, or the record of an execution whose statement record is not
    /// known (fail safe: every record can be read on its own or through the one it names).
    Text(Option<&'a str>, &'a Classified),
    /// The statement record that holds them (a Parse's).
    Of(&'a StatementRecord),
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
    /// How many of `records` decide a message that changes something by itself (not only by
    /// committing): the prefix a COMMIT that follows them in the batch must not overtake.
    must_sync: usize,
    /// standard_conforming_strings at login (the value the first message is checked with).
    scs_at_login: Option<bool>,
    encodings: Encodings,
    /// A statement forwarded may have left state in the backend that outlives its
    /// transaction (see [`Statement::session_state`]): the session's later transactions need
    /// that backend. (Prepared statements follow the session: see `carried`.)
    holds_session_state: bool,
}

/// Decision records to write before (or while) the messages they decide are forwarded.
pub struct Records {
    pub records: Vec<Record>,
    /// The most the forwarded messages can change in the database: with [`Effect::None`] the
    /// records need only be on disk before the client sees an answer, not before the server
    /// sees the messages.
    pub effect: Effect,
    /// The leading records that decide messages changing something by themselves: with
    /// [`Effect::Commits`], only these (and everything before the batch) must be on disk
    /// before the COMMIT is forwarded, not the COMMIT's own record.
    pub must_sync: usize,
}

/// A statement's classification, or why there is none.
type Classified = Result<Arc<[Statement]>, sql::SqlError>;

impl Gate {
    /// `decided_under`: the policy generation the session's connect decision was made under.
    pub fn new(
        audit: Option<AuditLog>,
        policies: Arc<PolicyStore>,
        decided_under: u64,
        principal: Arc<Principal>,
        resolver: Resolver,
        gateway: bool,
        info: SessionInfo,
    ) -> Gate {
        Gate {
            audit,
            policy_generation: decided_under,
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
            must_sync: 0,
            scs_at_login: None,
            encodings: Encodings {
                login: ClientEncoding::Utf8,
                current: ClientEncoding::Utf8,
                non_utf8: None,
            },
            holds_session_state: false,
        }
    }

    /// Whether a statement forwarded may have left state in the backend that its later
    /// transactions need (once set, for the rest of the session).
    pub fn holds_session_state(&self) -> bool {
        self.holds_session_state
    }

    /// The client_encoding the server reported at login (`None`: it reported none, and
    /// statements are read as if it could be any ASCII-safe encoding). A session that logs
    /// in later (deferred) is told again.
    pub fn login_client_encoding(&mut self, value: Option<&str>) {
        let e = value
            .and_then(ClientEncoding::from_name)
            .unwrap_or(ClientEncoding::Unknown);
        self.encodings.login = e;
        self.encodings.current = e;
        self.encodings.saw(e);
    }

    /// The server reported client_encoding (ParameterStatus): it is in force from now on.
    pub fn client_encoding_reported(&mut self, value: &str) {
        let e = ClientEncoding::from_name(value).unwrap_or(ClientEncoding::Unknown);
        self.encodings.current = e;
        self.encodings.saw(e);
    }

    /// What statements are decided with now.
    fn settings(&self, scs: bool, parameters_at_bind: bool) -> SessionSettings {
        SessionSettings {
            standard_conforming_strings: scs,
            standard_conforming_strings_at_login: self.scs_at_login.unwrap_or(scs),
            non_utf8_encoding: self.encodings.non_utf8,
            parameters_at_bind,
        }
    }

    /// Follows the client_encoding a statement that will run asks for: from the moment it is
    /// decided, like search_path (the server may run it before pgiam sees its answer).
    fn learn_encoding(&mut self, s: &Statement) {
        for v in &s.client_encoding {
            match v {
                SettingValue::Value(n) => {
                    if let Some(e) = ClientEncoding::from_name(n) {
                        self.encodings.current = e;
                        self.encodings.saw(e);
                    }
                }
                // In force later, or for some calls, or if the setting is this one.
                SettingValue::Stored(n) | SettingValue::IfThisSetting(n) => {
                    if let Some(e) = ClientEncoding::from_name(n) {
                        self.encodings.saw(e);
                    }
                }
                SettingValue::Default => self.encodings.current = self.encodings.login,
                SettingValue::Current | SettingValue::Parameter(_) | SettingValue::Unknown => {}
            }
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
        &self.info.facts.database
    }

    pub fn info(&self) -> &crate::admin::registry::Live {
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
    ///
    /// The schemas a statement asks search_path to name are searched from that statement on
    /// (it included, and the rest of the list, and every later message): the server may run
    /// it before pgiam sees its answer, so the set widens when the statement is decided, not
    /// when the server acknowledges it, and it never shrinks (a rolled back SET, SET LOCAL,
    /// RESET, an error). Only a refused list, which the server never runs, leaves it as it was.
    /// The client encodings a statement asks for are followed the same way.
    ///
    /// `scs`: standard_conforming_strings in force; `parameters_at_bind`: a Parse, whose
    /// set_config() values from bound parameters are decided at Bind.
    fn decide_statements(
        &mut self,
        statements: &[Statement],
        scs: bool,
        parameters_at_bind: bool,
    ) -> Decision {
        // PREPAREs earlier in the same query string, which an EXECUTE after them runs.
        let mut earlier: HashMap<&str, Arc<[Statement]>> = HashMap::new();
        // The resolver as it was before this list widened it.
        let mut before: Option<Resolver> = None;
        let mut decisions = Vec::with_capacity(statements.len());
        for s in statements {
            let settings = self.settings(scs, parameters_at_bind);
            let d = self.decide_statement(s, &earlier, &mut before, &settings);
            let denied = !d.allowed;
            decisions.push(d);
            if denied {
                break;
            }
            if let Some(name) = &s.prepares {
                earlier.insert(name, Arc::from(vec![s.clone()]));
            }
        }
        let decision = Decision::all(decisions);
        if let (false, Some(r)) = (decision.allowed, before) {
            self.resolver = r;
        }
        decision
    }

    fn decide_statement(
        &mut self,
        s: &Statement,
        earlier: &HashMap<&str, Arc<[Statement]>>,
        before: &mut Option<Resolver>,
        settings: &SessionSettings,
    ) -> Decision {
        if let Some(d) = crate::policy::fixed_refusal_in(s, self.gateway, settings) {
            return d;
        }
        let inner = match &s.executes {
            None => None,
            Some(name) => {
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
                // What EXECUTE runs has no bound parameters: its values are SQL expressions.
                let settings = SessionSettings {
                    parameters_at_bind: false,
                    ..*settings
                };
                for i in inner.iter() {
                    if let Some(d) = crate::policy::fixed_refusal_in(i, self.gateway, &settings) {
                        return d;
                    }
                }
                Some(inner)
            }
        };
        let all = || std::iter::once(s).chain(inner.iter().flat_map(|i| i.iter()));
        for t in all() {
            self.learn_encoding(t);
        }
        for t in all() {
            if self.resolver.would_widen(t) {
                before.get_or_insert_with(|| self.resolver.clone());
                if let Err(d) = self.resolver.widen_for(t) {
                    return d;
                }
            }
        }
        let asks: Vec<Ask> = all().flat_map(|t| self.resolver.asks(t)).collect();
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
            self.holds_session_state |= s.session_state;
            if let Some(name) = &s.prepares {
                // Its record is the whole query string's: its executions carry their own text.
                let plan = || Plan {
                    sql: text.into(),
                    statements: Arc::from(vec![s.clone()]),
                    param_types: Arc::from(Vec::new()),
                    record: None,
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

    /// Reads statement text as the server will: transcoded from the client's encoding to
    /// UTF-8 (the client's own bytes are what is forwarded), split with the string rules in
    /// force. Returns the classification and the text as read, for the record.
    fn read<'a>(&self, sql: &'a [u8], scs: bool) -> (Classified, Cow<'a, str>) {
        let e = self.encodings.current;
        let text = match std::str::from_utf8(sql) {
            Ok(text) if e == ClientEncoding::Utf8 => Some(Cow::Borrowed(text)),
            // A session that only ever spoke UTF-8: the server refuses such text too.
            Err(_) if e == ClientEncoding::Utf8 && self.encodings.non_utf8.is_none() => None,
            _ => e.decode(sql),
        };
        match text {
            Some(text) => (sql::classify_cached(&text, scs), text),
            None => {
                let message = if e == ClientEncoding::Utf8 {
                    "statement text is not valid UTF-8".to_owned()
                } else {
                    format!(
                        "statement text in client_encoding {} cannot be read",
                        e.name()
                    )
                };
                (
                    Err(sql::SqlError::Encoding(message)),
                    String::from_utf8_lossy(sql),
                )
            }
        }
    }

    /// Writes a decision record of `kind` (`statement`, `execute`, `bind`); returns its id.
    /// `extra`: names and the like, each left out when it is null or empty (an unnamed
    /// statement or portal).
    fn record(
        &mut self,
        kind: &str,
        protocol: Option<&str>,
        about: About<'_>,
        decision: &Decision,
        extra: &[(&str, Value)],
    ) -> Option<String> {
        self.info.decided(decision.allowed);
        let command = match about {
            About::Of(of) => of.command,
            About::Text(_, Ok(list)) => list.first().map_or("empty", |s| s.command),
            About::Text(_, Err(_)) => "unreadable",
        };
        crate::metrics::get().decided(decision.allowed, command);
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
                r.add("principal", &self.info.facts.principal);
                r.add("role", &self.info.facts.role);
                r.add("database", &self.info.facts.database);
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
            if decision.allowed && *of.policies == decision.policies[..]);
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

    /// The decision for a classification, or the refusal for text that does not parse.
    fn decide_classified(
        &mut self,
        statements: &Classified,
        scs: bool,
        parameters_at_bind: bool,
    ) -> (Decision, &'static str) {
        match statements {
            Ok(list) => {
                let list = list.clone();
                (
                    self.decide_statements(&list, scs, parameters_at_bind),
                    "42501",
                )
            }
            // As the server reports it: bytes that are not characters, then syntax.
            Err(sql::SqlError::Encoding(message)) => (
                Decision::refuse("parse", format!("cannot read the statement: {message}")),
                "22021",
            ),
            Err(sql::SqlError::Syntax { message, .. }) => {
                // The parser's own words, as the server would say them.
                let said = message
                    .strip_prefix("Invalid statement: ")
                    .unwrap_or(message);
                (
                    Decision::refuse("parse", format!("cannot parse the statement: {said}")),
                    "42601",
                )
            }
        }
    }

    /// Protocol names (statements, portals) the server may read in another encoding than
    /// pgiam did: refused once the session has used one other than UTF8, as names in
    /// statements are.
    fn foreign_names(&self, names: &[&[u8]]) -> Option<Decision> {
        let e = self.encodings.non_utf8?;
        let name = names.iter().find(|n| !n.is_ascii())?;
        Some(Decision::refuse(
            format!("name {:?}", String::from_utf8_lossy(name)),
            format!(
                "the session has used client_encoding {}: pgiam cannot be sure which \
                 encoding the server reads a name in, so prepared statement and portal names \
                 must be ASCII",
                e.name()
            ),
        ))
    }

    /// A plan whose set_config() values are bound parameters, with the values `frame` (the
    /// Bind message) binds, if they may be set.
    fn bind_plan(&mut self, plan: &Plan, frame: &[u8], scs: bool) -> Result<Plan, Decision> {
        let unreadable = |why: String| Decision::refuse("set_config() with a bound parameter", why);
        let values = BindParameters::read(frame)
            .ok_or_else(|| unreadable("the Bind message cannot be read".into()))?;
        let statements = plan
            .statements
            .iter()
            .map(|s| s.bind(|n| values.text(n, &plan.param_types)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        let settings = self.settings(scs, false);
        for s in &statements {
            if let Some(d) = crate::policy::fixed_refusal_in(s, self.gateway, &settings) {
                return Err(d);
            }
        }
        for s in &statements {
            self.learn_encoding(s);
        }
        // Bound values make it another classification than its Parse record's.
        Ok(Plan {
            sql: plan.sql.clone(),
            statements: statements.into(),
            param_types: plan.param_types.clone(),
            record: None,
        })
    }

    /// Checks one client message (`frame`: its bytes, header included); `expects` receives
    /// the response the server will owe for it.
    pub fn check(
        &mut self,
        message: &FrontendMessage<'_>,
        frame: &[u8],
        standard_conforming_strings: bool,
        expects: &mut Vec<Expect>,
    ) -> Checked {
        let started = std::time::Instant::now();
        let scs = standard_conforming_strings;
        // The first message is checked with the value the server reported at login.
        self.scs_at_login.get_or_insert(scs);
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
                let (classified, text) = self.read(sql, scs);
                let (decision, code) = self.decide_classified(&classified, scs, false);
                let id = self.record(
                    "statement",
                    Some("simple"),
                    About::Text(Some(&text), &classified),
                    &decision,
                    &[],
                );
                if !decision.allowed {
                    let e = refusal(code, &decision, id.as_deref())
                        .with_position(syntax_error_position(&classified));
                    let sentinel = sentinel_query(id.as_deref());
                    expect(ExpectKind::Query, id, Some(e), Vec::new());
                    return Checked::Substitute(sentinel);
                }
                let mut creates = Vec::new();
                if let Ok(list) = &classified {
                    self.apply_effects(list, &text, &mut creates);
                    self.affects(effect(list), list);
                }
                expect(ExpectKind::Query, id, None, creates);
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Parse { name, sql, .. } => {
                let (classified, text) = self.read(sql, scs);
                let (decision, code) = match self.foreign_names(&[name]) {
                    Some(d) => (d, "42501"),
                    None => self.decide_classified(&classified, scs, true),
                };
                let statement = json!(String::from_utf8_lossy(name));
                let id = self.record(
                    "statement",
                    Some("parse"),
                    About::Text(Some(&text), &classified),
                    &decision,
                    &[("statement", statement)],
                );
                if !decision.allowed {
                    // A failed Parse of the unnamed statement drops the old one, as here.
                    if name.is_empty() {
                        self.prepared.remove(name);
                    }
                    let e = refusal(code, &decision, id.as_deref())
                        .with_position(syntax_error_position(&classified));
                    // A failed named Parse leaves the namespace as it was, whatever the name.
                    let target = if name.is_empty() { "" } else { SENTINEL_NAME };
                    let sentinel = sentinel_parse(target, id.as_deref());
                    expect(ExpectKind::Parse, id, Some(e), Vec::new());
                    return Checked::Substitute(sentinel);
                }
                let mut creates = Vec::new();
                if let Ok(list) = classified {
                    self.affects(effect(&list), &list);
                    let command = list.first().map_or("empty", |s| s.command);
                    let plan = || Plan {
                        sql: text.into(),
                        statements: list,
                        param_types: parse_param_types(frame).unwrap_or_default().into(),
                        record: id.as_deref().map(|id| StatementRecord {
                            id: id.into(),
                            command,
                            policies: decision.policies.clone().into(),
                        }),
                    };
                    self.prepare(name, plan, 0, &mut creates);
                }
                expect(ExpectKind::Parse, id, None, creates);
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Bind {
                portal, statement, ..
            } => {
                let plan = self.prepared.get(statement).map(|p| p.plan.clone());
                // set_config() of client_encoding or standard_conforming_strings with a bound
                // parameter is decided here, with the value.
                let (bound, refused) = match (self.foreign_names(&[portal, statement]), plan) {
                    (Some(d), plan) => (plan, Some(d)),
                    (None, Some(plan)) if plan.statements.iter().any(Statement::needs_bind) => {
                        match self.bind_plan(&plan, frame, scs) {
                            Ok(bound) => (Some(bound), None),
                            Err(d) => (Some(plan), Some(d)),
                        }
                    }
                    (None, plan) => (plan, None),
                };
                if let Some(decision) = refused {
                    let (text, classified, of): (Option<Arc<str>>, Classified, _) = match bound {
                        Some(p) => (Some(p.sql), Ok(p.statements), p.record),
                        None => (None, Ok(Arc::from(Vec::new())), None),
                    };
                    let portal = ("portal", json!(String::from_utf8_lossy(portal)));
                    let id = match &of {
                        Some(of) => self.record("bind", None, About::Of(of), &decision, &[portal]),
                        None => self.record(
                            "bind",
                            None,
                            About::Text(text.as_deref(), &classified),
                            &decision,
                            &[
                                portal,
                                ("statement", json!(String::from_utf8_lossy(statement))),
                            ],
                        ),
                    };
                    let e = refusal("42501", &decision, id.as_deref());
                    // A Parse that fails: the pipeline errors right here, no portal is made.
                    let sentinel = sentinel_parse(SENTINEL_NAME, id.as_deref());
                    expect(ExpectKind::Bind, id, Some(e), Vec::new());
                    return Checked::Substitute(sentinel);
                }
                self.portals
                    .insert(portal.to_vec(), (statement.to_vec(), bound));
                expect(ExpectKind::Bind, None, None, Vec::new());
                Checked::Forward(Authorized(()))
            }
            FrontendMessage::Execute { portal, .. } => {
                self.check_execute(portal, scs, expects, started)
            }
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
            FrontendMessage::CopyDone | FrontendMessage::CopyFail { .. } => {
                expect(ExpectKind::CopyEnd, None, None, Vec::new());
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
                } else if function_oid == SET_CONFIG_OID {
                    // Its arguments are values pgiam does not read: it could set search_path
                    // to schemas names would then not be authorized against.
                    Decision::refuse(
                        "function call of set_config",
                        "set_config() through a FunctionCall message is refused: pgiam cannot \
                         see which setting it changes; use SELECT set_config(…)",
                    )
                } else {
                    self.decide(&[ask])
                };
                let id = self.record(
                    "statement",
                    Some("function_call"),
                    About::Text(None, &Ok(Arc::from(Vec::new()))),
                    &decision,
                    &[("function_oid", json!(function_oid))],
                );
                if !decision.allowed {
                    let e = refusal("42501", &decision, id.as_deref());
                    let sentinel = sentinel_query(id.as_deref());
                    expect(ExpectKind::FunctionCall, id, Some(e), Vec::new());
                    return Checked::Substitute(sentinel);
                }
                self.affects(Effect::Immediate, &[]);
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
        scs: bool,
        expects: &mut Vec<Expect>,
        started: std::time::Instant,
    ) -> Checked {
        let portal_name = json!(String::from_utf8_lossy(portal));
        let bound = self.portals.get(portal).cloned();
        // The statement record of what the portal runs: the execute record points to it.
        let of = match &bound {
            Some((_, Some(p))) => p.record.clone(),
            _ => None,
        };
        let (decision, text, classified, statement) = match bound {
            _ if self.foreign_names(&[portal]).is_some() => (
                self.foreign_names(&[portal]).expect("just seen"),
                None,
                Ok(Arc::from(Vec::new())),
                Value::Null,
            ),
            Some((name, Some(p))) => {
                let classified: Classified = Ok(p.statements.clone());
                let text = p.sql.clone();
                let (d, _) = self.decide_classified(&classified, scs, false);
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
        let id = match &of {
            Some(of) => self.record(
                "execute",
                None,
                About::Of(of),
                &decision,
                &[("portal", portal_name)],
            ),
            None => self.record(
                "execute",
                None,
                About::Text(text.as_deref(), &classified),
                &decision,
                &[("portal", portal_name), ("statement", statement)],
            ),
        };
        let mut creates = Vec::new();
        if decision.allowed {
            match (&classified, &text) {
                (Ok(list), Some(text)) => {
                    self.apply_effects(list, text, &mut creates);
                    self.affects(effect(list), list);
                }
                // A cursor's query is not known here.
                _ => self.affects(Effect::Immediate, &[]),
            }
        }
        let refused =
            (!decision.allowed).then(|| Box::new(refusal("42501", &decision, id.as_deref())));
        let substitute = refused
            .is_some()
            .then(|| sentinel_parse(SENTINEL_NAME, id.as_deref()));
        expects.push(Expect {
            kind: ExpectKind::Execute,
            record: id,
            refused,
            creates,
            started,
        });
        match substitute {
            // A Parse that fails before it creates anything: the pipeline errors right here.
            Some(sentinel) => Checked::Substitute(sentinel),
            None => Checked::Forward(Authorized(())),
        }
    }

    /// Notes what the message whose record was pushed last can change (`effect`, of its
    /// `statements`).
    fn affects(&mut self, effect: Effect, statements: &[Statement]) {
        self.effect = self.effect.max(effect);
        // A message ending in COMMIT can change rows itself before it commits them.
        let changes = effect == Effect::Immediate
            || statements
                .iter()
                .any(|s| matches!(s.effect, Effect::Transactional | Effect::Immediate));
        if changes {
            self.must_sync = self.records.len();
        }
    }

    /// The decision records of the messages checked so far, and what those messages can
    /// change.
    pub fn take_records(&mut self) -> Records {
        Records {
            records: std::mem::take(&mut self.records),
            effect: std::mem::replace(&mut self.effect, Effect::None),
            must_sync: std::mem::take(&mut self.must_sync),
        }
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
    let e = match (code, &decision.reason) {
        // Text pgiam cannot read or parse is answered as the server answers it: what is
        // wrong with it, not a permission.
        (c, Some(reason)) if c != "42501" => PgError::error(code, format!("pgiam: {reason}")),
        (_, reason) => {
            let e = PgError::error(code, format!("pgiam: permission denied: {what}"));
            match reason {
                Some(reason) => e.with_detail(reason.clone()),
                None => e,
            }
        }
    };
    match record {
        Some(id) => e.with_audit_id(id),
        None => e,
    }
}

/// The parameters of a Bind message, read from its bytes (header included; wire.rs has
/// checked its framing).
struct BindParameters<'a> {
    formats: Vec<u16>,
    /// `None`: SQL NULL.
    values: Vec<Option<&'a [u8]>>,
}

/// Reads the frame's fields in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = self.take(end)?;
        self.take(1)?;
        Some(s)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

impl<'a> BindParameters<'a> {
    fn read(frame: &'a [u8]) -> Option<BindParameters<'a>> {
        let mut f = Fields(frame);
        (f.take(5)?.first() == Some(&b'B')).then_some(())?;
        f.cstr()?;
        f.cstr()?;
        let formats = (0..f.u16()?).map(|_| f.u16()).collect::<Option<Vec<_>>>()?;
        let values = (0..f.u16()?)
            .map(|_| match f.i32()? {
                -1 => Some(None),
                n => f.take(usize::try_from(n).ok()?).map(Some),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(BindParameters { formats, values })
    }

    /// Parameter `$n`'s value as set_config() would take it, if pgiam can read it: a text
    /// value (text or binary format, the same bytes for text; of a type left to the server,
    /// which infers text, or declared text or varchar), ASCII like every encoding name and
    /// boolean. `Ok(None)`: NULL.
    fn text(&self, n: u32, declared: &[u32]) -> Result<Option<String>, String> {
        const TEXT: u32 = 25;
        const VARCHAR: u32 = 1043;
        let i = (n as usize)
            .checked_sub(1)
            .ok_or_else(|| format!("there is no parameter ${n}"))?;
        let value = *self
            .values
            .get(i)
            .ok_or_else(|| format!("the Bind message binds no parameter ${n}"))?;
        let format = match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => self.formats.get(i).copied().unwrap_or(u16::MAX),
        };
        let oid = declared.get(i).copied().unwrap_or(0);
        if !matches!(oid, 0 | TEXT | VARCHAR) || format > 1 {
            return Err(format!(
                "parameter ${n} (type oid {oid}, format {format}) is not text pgiam can read"
            ));
        }
        match value {
            None => Ok(None),
            Some(v) if v.is_ascii() => Ok(Some(String::from_utf8_lossy(v).into_owned())),
            Some(_) => Err(format!("parameter ${n} is not ASCII")),
        }
    }
}

/// The parameter types a Parse message declares (`frame`: its bytes, header included).
fn parse_param_types(frame: &[u8]) -> Option<Vec<u32>> {
    let mut f = Fields(frame);
    (f.take(5)?.first() == Some(&b'P')).then_some(())?;
    f.cstr()?;
    f.cstr()?;
    (0..f.u16()?).map(|_| f.i32().map(|t| t as u32)).collect()
}

/// Where the parser stopped in text that does not parse, for the client to point at.
fn syntax_error_position(classified: &Classified) -> Option<u32> {
    match classified {
        Err(sql::SqlError::Syntax { position, .. }) => *position,
        Err(sql::SqlError::Encoding(_)) | Ok(_) => None,
    }
}

fn sentinel_query(record: Option<&str>) -> Bytes {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::query(&sentinel_sql(record), &mut b).expect("no NUL");
    b.freeze()
}

fn sentinel_parse(name: &str, record: Option<&str>) -> Bytes {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::parse(
        name,
        &sentinel_sql(record),
        std::iter::empty(),
        &mut b,
    )
    .expect("no NUL");
    b.freeze()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    const ITEMS: &str = r#"permit(principal, action == PgIam::Action::"select",
        resource == PgIam::Table::"app.public.items");"#;

    fn test_info(session: Option<&str>, identity: &crate::identity::Identity) -> SessionInfo {
        crate::admin::registry::Live::new(
            crate::admin::registry::Facts {
                id: session.unwrap_or("local-0").into(),
                audited: session.is_some(),
                principal: "uid:1000".into(),
                role: "app".into(),
                database: "app".into(),
                identity: identity.clone(),
                upstream: "127.0.0.1:5432".into(),
                peer: "test".into(),
                tls: false,
                pool: crate::config::PoolMode::None,
            },
            crate::admin::registry::State::Idle,
        )
    }

    fn gate(policy: &str) -> (Gate, Arc<PolicyStore>) {
        let store = Arc::new(PolicyStore::fixed(Policy::parse(policy).unwrap()));
        let identity = crate::identity::Identity::for_principal("uid", "1000").unwrap();
        let gate = Gate::new(
            None,
            store.clone(),
            store.generation(),
            Principal::shared("uid:1000", "app", "app", &identity),
            Resolver::new(&["public".into()], "app"),
            false,
            test_info(None, &identity),
        );
        (gate, store)
    }

    fn forwarded(gate: &mut Gate, m: FrontendMessage<'_>) -> bool {
        let mut expects = Vec::new();
        let c = gate.check(&m, &[], true, &mut expects);
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

    /// items in the starting path (public) may be read; other.items may not; any setting may
    /// be changed, and every function called.
    const PATHS: &str = r#"permit(principal, action == PgIam::Action::"select",
        resource == PgIam::Table::"app.public.items");
        permit(principal, action == PgIam::Action::"set", resource);
        permit(principal, action == PgIam::Action::"execute", resource);
        permit(principal, action == PgIam::Action::"function_call", resource);"#;

    fn parse<'a>(sql: &'a str) -> FrontendMessage<'a> {
        FrontendMessage::Parse {
            name: b"",
            sql: sql.as_bytes(),
            param_types: 0,
        }
    }

    fn bind() -> FrontendMessage<'static> {
        FrontendMessage::Bind {
            portal: b"",
            statement: b"",
            params: 0,
        }
    }

    fn execute() -> FrontendMessage<'static> {
        FrontendMessage::Execute {
            portal: b"",
            max_rows: 0,
        }
    }

    #[test]
    fn the_starting_path_and_changes_back_to_it_are_allowed() {
        let (mut g, _) = gate(PATHS);
        for sql in [
            "SELECT * FROM items",
            "SET search_path = public",
            "SET search_path TO public; SELECT * FROM items",
            "RESET search_path",
            "SET search_path TO DEFAULT",
            "SELECT pg_catalog.set_config('search_path', '', false)",
            "SELECT * FROM items",
            "SELECT * FROM public.items",
        ] {
            assert!(forwarded(&mut g, query(sql)), "{sql}");
        }
    }

    #[test]
    fn a_search_path_set_ahead_of_a_statement_is_searched_when_it_is_decided() {
        // In one query string.
        let (mut g, _) = gate(PATHS);
        assert!(!forwarded(
            &mut g,
            query("SET search_path = other; SELECT * FROM items")
        ));
        // A refused string runs nothing, so it widens nothing.
        assert!(forwarded(&mut g, query("SELECT * FROM items")));
        // In an extended-protocol pipeline: decided at Execute, before the server answers.
        assert!(forwarded(&mut g, parse("SET search_path = other")));
        assert!(forwarded(&mut g, bind()));
        assert!(forwarded(&mut g, execute()));
        assert!(!forwarded(&mut g, parse("SELECT * FROM items")));
        // Qualified, the allowed table still is.
        assert!(forwarded(&mut g, query("SELECT * FROM public.items")));
        // Parsed before the SET ran, executed after: decided again at Execute.
        let (mut g, _) = gate(PATHS);
        assert!(forwarded(
            &mut g,
            FrontendMessage::Parse {
                name: b"s",
                sql: b"SELECT * FROM items",
                param_types: 0
            }
        ));
        assert!(forwarded(&mut g, query("SET LOCAL search_path = other")));
        assert!(forwarded(
            &mut g,
            FrontendMessage::Bind {
                portal: b"",
                statement: b"s",
                params: 0
            }
        ));
        assert!(!forwarded(&mut g, execute()));
    }

    #[test]
    fn the_set_of_schemas_never_shrinks() {
        for steps in [
            &["BEGIN", "SET search_path = other", "ROLLBACK"][..],
            &["BEGIN", "SET LOCAL search_path = other", "COMMIT"],
            &["SET search_path = other", "RESET search_path"],
            &["SET search_path = other", "RESET ALL"],
            &["SELECT set_config('search_path', 'other', true)"],
            // Wherever the value sits: a prepared statement, a cursor, a function's SET
            // clause (which lasts only for its calls, but is asked for all the same).
            &["PREPARE p AS SELECT set_config('search_path', 'other', false)"],
            &[
                "BEGIN",
                "DECLARE c CURSOR FOR SELECT set_config('search_path', 'other', false)",
            ],
            &["EXPLAIN SELECT set_config('search_path', 'other', false)"],
        ] {
            let (mut g, _) = gate(PATHS);
            for sql in steps {
                assert!(forwarded(&mut g, query(sql)), "{sql}");
            }
            assert!(
                !forwarded(&mut g, query("SELECT * FROM items")),
                "{steps:?}"
            );
        }
    }

    #[test]
    fn search_paths_pgiam_cannot_read_are_refused_on_every_route() {
        let everything = "permit(principal, action, resource);";
        let (mut g, _) = gate(everything);
        assert!(!forwarded(
            &mut g,
            parse("SELECT set_config('search_path', $1, false)")
        ));
        assert!(!forwarded(
            &mut g,
            query("SELECT set_config('search_path', current_setting('x'), false)")
        ));
        assert!(!forwarded(
            &mut g,
            FrontendMessage::FunctionCall {
                function_oid: SET_CONFIG_OID,
                args: 3,
            }
        ));
        assert!(forwarded(
            &mut g,
            query("SELECT set_config('search_path', 'a, \"B\"', false)")
        ));
    }

    /// Checks a message given as its bytes, as the session does.
    fn sent(gate: &mut Gate, frame: &[u8], scs: bool) -> bool {
        let m = crate::wire::decode_frontend(frame[0], &frame[5..]).unwrap();
        let mut expects = Vec::new();
        let c = gate.check(&m, frame, scs, &mut expects);
        assert_eq!(expects.len(), 1, "{m:?}");
        assert_eq!(
            expects[0].refused.is_some(),
            matches!(c, Checked::Substitute(_))
        );
        matches!(c, Checked::Forward(_))
    }

    fn raw_query(sql: &[u8]) -> Vec<u8> {
        let mut b = vec![b'Q'];
        b.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
        b.extend_from_slice(sql);
        b.push(0);
        b
    }

    fn parse_frame(name: &str, sql: &str, types: &[u32]) -> BytesMut {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::parse(name, sql, types.iter().copied(), &mut b)
            .unwrap();
        b
    }

    /// A Bind of `values` (`None`: NULL) in one format for all.
    fn bind_frame(portal: &str, statement: &str, format: i16, values: &[Option<&str>]) -> BytesMut {
        use postgres_protocol::IsNull;
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::bind(
            portal,
            statement,
            [format],
            values.iter(),
            |v, buf| match v {
                Some(v) => {
                    buf.extend_from_slice(v.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            [0i16],
            &mut b,
        )
        .map_err(|_| "bind")
        .unwrap();
        b
    }

    fn execute_frame(portal: &str) -> BytesMut {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::execute(portal, 0, &mut b).unwrap();
        b
    }

    const EVERYTHING: &str = "permit(principal, action, resource);";

    /// A gate whose session logged in with this client_encoding.
    fn gate_in(policy: &str, encoding: Option<&str>) -> Gate {
        let (mut g, _) = gate(policy);
        g.login_client_encoding(encoding);
        g
    }

    #[test]
    fn standard_conforming_strings_may_be_set_to_the_value_it_is_fixed_at() {
        for fixed in [true, false] {
            let (mut g, _) = gate(EVERYTHING);
            let (same, other) = if fixed { ("on", "off") } else { ("off", "on") };
            for sql in [
                format!("SET standard_conforming_strings = {same}"),
                "RESET standard_conforming_strings".to_owned(),
                format!("SET standard_conforming_strings TO {same}; SELECT 1"),
            ] {
                assert!(sent(&mut g, &raw_query(sql.as_bytes()), fixed), "{sql}");
            }
            let sql = format!("SET standard_conforming_strings = {other}");
            assert!(!sent(&mut g, &raw_query(sql.as_bytes()), fixed), "{sql}");
        }
        // RESET goes back to the value at login, which is what the first message is checked
        // with: once the server reports another (a route pgiam did not see), RESET changes it.
        let (mut g, _) = gate(EVERYTHING);
        assert!(sent(&mut g, &raw_query(b"SELECT 1"), true));
        assert!(!sent(
            &mut g,
            &raw_query(b"RESET standard_conforming_strings"),
            false
        ));
        assert!(sent(
            &mut g,
            &raw_query(b"SET standard_conforming_strings = off"),
            false
        ));
    }

    #[test]
    fn statements_in_an_ascii_safe_encoding_are_read_transcoded() {
        let (mut g, _) = gate(EVERYTHING);
        // A session that only spoke UTF-8 refuses text that is not.
        assert!(!sent(&mut g, &raw_query(b"SELECT '\xa4'"), true));
        let mut g = gate_in(EVERYTHING, Some("LATIN9"));
        assert!(sent(&mut g, &raw_query(b"SELECT '\xa4' FROM items"), true));
        let frame = parse_frame("s", "SELECT 1", &[]);
        let mut latin9 = frame.to_vec();
        // The same Parse with LATIN9 text: 'ä€' (0xE4 0xA4).
        latin9.truncate(5);
        latin9.extend_from_slice(b"s\0SELECT '\xe4\xa4' FROM items\0\0\0");
        let len = (latin9.len() as i32 - 1).to_be_bytes();
        latin9[1..5].copy_from_slice(&len);
        assert!(sent(&mut g, &latin9, true));
        assert_eq!(
            &*g.prepared[&b"s"[..]].plan.sql,
            "SELECT 'ä€' FROM items",
            "recorded as read"
        );
        // A name that is not ASCII is refused, whatever its bytes.
        assert!(!sent(&mut g, &raw_query(b"SELECT * FROM \"\xe4\""), true));
        assert!(!sent(
            &mut g,
            &raw_query("SELECT * FROM \"ä\"".as_bytes()),
            true
        ));
        // EUC_JP: 'さ' is 0xA4 0xB5.
        let mut g = gate_in(EVERYTHING, Some("EUC_JP"));
        assert!(sent(
            &mut g,
            &raw_query(b"SELECT '\xa4\xb5' FROM items"),
            true
        ));
        assert!(!sent(
            &mut g,
            &raw_query(b"SELECT * FROM \"\xa4\xb5\""),
            true
        ));
        // SJIS is never read.
        let mut g = gate_in(EVERYTHING, Some("SJIS"));
        assert!(!sent(&mut g, &raw_query(b"SELECT 1"), true));
    }

    #[test]
    fn once_an_encoding_other_than_utf8_is_used_names_must_be_ascii() {
        let named = "SELECT * FROM \"é\"".as_bytes();
        for steps in [
            &["SET client_encoding = 'LATIN1'"][..],
            &["BEGIN", "SET LOCAL client_encoding = 'LATIN1'", "ROLLBACK"],
            &["SET client_encoding = 'LATIN1'", "RESET client_encoding"],
            &["SELECT set_config('client_encoding', 'EUC_JP', false)"],
            &[
                "SET client_encoding = 'SQL_ASCII'",
                "SET client_encoding = 'UTF8'",
            ],
            &[
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'LATIN1' \
               AS 'select 1'",
            ],
        ] {
            let (mut g, _) = gate(EVERYTHING);
            assert!(sent(&mut g, &raw_query(named), true), "UTF-8 only");
            for sql in steps {
                assert!(sent(&mut g, &raw_query(sql.as_bytes()), true), "{sql}");
            }
            assert!(!sent(&mut g, &raw_query(named), true), "{steps:?}");
            // String literals and comments may hold anything.
            assert!(sent(&mut g, &raw_query("SELECT 'é' -- ü".as_bytes()), true));
        }
        // Pipelined ahead: in the same query string, and in an extended-protocol pipeline
        // (decided before the server has answered the SET).
        let (mut g, _) = gate(EVERYTHING);
        assert!(!sent(
            &mut g,
            &raw_query("SET client_encoding = 'LATIN1'; SELECT * FROM \"é\"".as_bytes()),
            true
        ));
        let (mut g, _) = gate(EVERYTHING);
        assert!(sent(
            &mut g,
            &parse_frame("", "SET client_encoding = 'LATIN1'", &[]),
            true
        ));
        assert!(sent(&mut g, &bind_frame("", "", 0, &[]), true));
        assert!(sent(&mut g, &execute_frame(""), true));
        assert!(!sent(
            &mut g,
            &parse_frame("", "SELECT * FROM \"é\"", &[]),
            true
        ));
        // Reported by the server (a route pgiam did not see).
        let (mut g, _) = gate(EVERYTHING);
        g.client_encoding_reported("WIN1251");
        assert!(!sent(&mut g, &raw_query(named), true));
        // Protocol names too.
        assert!(!sent(&mut g, &parse_frame("é", "SELECT 1", &[]), true));
        assert!(sent(&mut g, &parse_frame("s", "SELECT 1", &[]), true));
        assert!(!sent(&mut g, &bind_frame("é", "s", 0, &[]), true));
        assert!(!sent(&mut g, &execute_frame("é"), true));
    }

    #[test]
    fn set_config_of_a_bound_parameter_is_decided_at_bind() {
        let (mut g, _) = gate(EVERYTHING);
        let enc = parse_frame("e", "SELECT set_config('client_encoding', $1, false)", &[]);
        assert!(sent(&mut g, &enc, true), "decided at Bind");
        let scs = parse_frame(
            "c",
            "SELECT set_config('standard_conforming_strings', $1, false)",
            &[],
        );
        assert!(sent(&mut g, &scs, true));
        for (statement, value, format, allowed) in [
            ("e", Some("UTF8"), 0, true),
            ("e", Some("utf-8"), 1, true),
            ("e", None, 0, true),
            ("e", Some("SJIS"), 0, false),
            ("e", Some("Shift_JIS"), 1, false),
            ("e", Some("klingon"), 0, false),
            ("c", Some("on"), 0, true),
            ("c", Some("ON"), 1, true),
            ("c", None, 0, true),
            ("c", Some("off"), 0, false),
            ("c", Some("0"), 1, false),
        ] {
            let b = bind_frame("p", statement, format, &[value]);
            assert_eq!(
                sent(&mut g, &b, true),
                allowed,
                "{statement} {value:?} {format}"
            );
            if allowed {
                assert!(sent(&mut g, &execute_frame("p"), true));
            }
        }
        // Bound to a non-UTF-8 encoding: names must be ASCII from then on.
        assert!(sent(
            &mut g,
            &raw_query("SELECT * FROM \"é\"".as_bytes()),
            true
        ));
        assert!(sent(
            &mut g,
            &bind_frame("p", "e", 0, &[Some("LATIN1")]),
            true
        ));
        assert!(!sent(
            &mut g,
            &raw_query("SELECT * FROM \"é\"".as_bytes()),
            true
        ));
        // A declared type pgiam does not read as text.
        let typed = parse_frame(
            "t",
            "SELECT set_config('client_encoding', $1, false)",
            &[23],
        );
        assert!(sent(&mut g, &typed, true));
        assert!(!sent(
            &mut g,
            &bind_frame("p", "t", 0, &[Some("UTF8")]),
            true
        ));
        // A parameter the Bind does not bind.
        assert!(!sent(&mut g, &bind_frame("p", "e", 0, &[]), true));
        // SQL EXECUTE of it has no Bind to read the value at.
        assert!(!sent(&mut g, &raw_query(b"EXECUTE e('UTF8')"), true));
        // Nor does a Parse that is executed without the statement's own Bind.
        assert!(!sent(
            &mut g,
            &raw_query(b"PREPARE q(text) AS SELECT set_config('client_encoding', $1, false)"),
            true
        ));
    }

    #[test]
    fn a_prepared_statement_the_server_did_not_create_is_forgotten() {
        let (mut g, _) = gate(ITEMS);
        let mut expects = Vec::new();
        let m = query("PREPARE q AS SELECT * FROM items");
        assert!(matches!(
            g.check(&m, &[], true, &mut expects),
            Checked::Forward(_)
        ));
        let (_, name, generation) = expects[0].creates[0].clone();
        assert!(forwarded(&mut g, query("EXECUTE q")));
        g.forget_prepared(&name, generation);
        assert!(!forwarded(&mut g, query("EXECUTE q")));
    }

    /// A gate whose records go to an audit file; returns what the file holds after each step.
    struct Audited {
        gate: Gate,
        store: Arc<PolicyStore>,
        log: AuditLog,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    /// An audit log in a directory of its own, written only when flushed.
    fn buffered_log() -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(
            &path,
            crate::audit::Durability::Buffered,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        (dir, path, log)
    }

    impl Audited {
        fn new(policy: &str) -> Audited {
            let (dir, path, log) = buffered_log();
            let (gate, store) = gate(policy);
            let info = test_info(Some("s-0"), &gate.info.facts.identity);
            let gate = Gate::new(
                Some(log.clone()),
                store.clone(),
                store.generation(),
                gate.principal,
                gate.resolver,
                false,
                info,
            );
            Audited {
                gate,
                store,
                log,
                path,
                _dir: dir,
            }
        }

        /// Checks `m` and returns the records it wrote.
        fn check(&mut self, m: FrontendMessage<'_>) -> Vec<Value> {
            let before = self.lines().len();
            forwarded(&mut self.gate, m);
            let records = self.gate.take_records().records;
            self.log.append(records).unwrap();
            let _ = self.log.flush();
            self.lines().split_off(before)
        }

        fn lines(&self) -> Vec<Value> {
            std::fs::read_to_string(&self.path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    /// The record's fields, in order.
    fn keys(r: &Value) -> String {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.join(" ")
    }

    #[test]
    fn an_execution_points_to_its_statement_record_and_says_its_own_decision() {
        let mut a = Audited::new(ITEMS);
        let parse = FrontendMessage::Parse {
            name: b"s",
            sql: b"SELECT * FROM items",
            param_types: 0,
        };
        let bind = FrontendMessage::Bind {
            portal: b"",
            statement: b"s",
            params: 0,
        };
        let [p] = &a.check(parse)[..] else { panic!() };
        assert_eq!(
            keys(p),
            "v id kind session principal role database protocol statement decision policies \
             sql statements ts hash"
        );
        assert_eq!(
            (&p["v"], &p["kind"], &p["statement"]),
            (&json!(2), &json!("statement"), &json!("s"))
        );
        assert_eq!(
            p["statements"],
            json!([{"command": "select", "node": "SelectStmt",
                    "relations": [{"name": "items", "access": "select"}]}])
        );
        assert!(a.check(bind).is_empty(), "an allowed Bind decides nothing");
        let [e] = &a.check(execute())[..] else {
            panic!()
        };
        // Allowed by the policies that allowed its statement: they are not repeated.
        assert_eq!(keys(e), "v id kind of decision ts hash");
        assert_eq!((&e["kind"], &e["of"]), (&json!("execute"), &p["id"]));
        // Allowed by another policy now (reloaded): the execution names it.
        a.store
            .replace(Policy::parse(&format!("@id(\"other\")\n{ITEMS}")).unwrap());
        a.gate.refresh_policy();
        let [o] = &a.check(execute())[..] else {
            panic!()
        };
        assert_eq!(keys(o), "v id kind of decision policies ts hash");
        assert_eq!(o["policies"], json!(["other"]));
        // Revoked: the next Execute of the same portal is a deny that points to it too.
        a.store.replace(Policy::parse("").unwrap());
        a.gate.refresh_policy();
        let [d] = &a.check(execute())[..] else {
            panic!()
        };
        assert_eq!((&d["of"], &d["decision"]), (&p["id"], &json!("deny")));
        assert_eq!(d["denied"], "select on table public.items");
        assert!(d.get("policies").is_none() && d.get("sql").is_none(), "{d}");
    }

    #[test]
    fn executions_whose_statement_record_is_not_known_carry_their_own_text() {
        let mut a = Audited::new(EVERYTHING);
        // Prepared by SQL PREPARE: its record is the whole query string's.
        a.check(query("PREPARE q AS SELECT 1; SELECT 2"));
        a.check(FrontendMessage::Bind {
            portal: b"p",
            statement: b"q",
            params: 0,
        });
        let [e] = &a.check(FrontendMessage::Execute {
            portal: b"p",
            max_rows: 0,
        })[..] else {
            panic!()
        };
        assert!(e.get("of").is_none(), "{e}");
        assert_eq!(
            (&e["kind"], &e["session"]),
            (&json!("execute"), &json!("s-0"))
        );
        assert_eq!((&e["portal"], &e["statement"]), (&json!("p"), &json!("q")));
        assert_eq!(e["sql"], "PREPARE q AS SELECT 1; SELECT 2");
        assert_eq!(e["statements"][0]["prepares"], "q");
        // A cursor's portal, never bound: nothing to point to, and the session is named.
        let [c] = &a.check(FrontendMessage::Execute {
            portal: b"c",
            max_rows: 10,
        })[..] else {
            panic!()
        };
        assert_eq!(
            keys(c),
            "v id kind session principal role database portal decision reason ts hash"
        );
    }

    #[test]
    fn completions_say_each_fact_once() {
        let (_dir, path, log) = buffered_log();
        log.append(vec![
            completion_record("r-1", Some("00000"), Some(1), Some("SELECT 1"), 7),
            completion_record("r-2", Some("00000"), Some(3), Some("INSERT 0 2"), 7),
            completion_record("r-3", Some("42501"), None, None, 7),
            completion_record("r-4", None, None, None, 7),
            completion_record("r-5", Some("00000"), Some(0), None, 7),
        ])
        .unwrap();
        let _ = log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let bodies: Vec<&str> = text
            .lines()
            .map(|l| &l[..l.find(",\"ts\":").unwrap()])
            .collect();
        assert_eq!(
            bodies,
            [
                r#"{"v":2,"kind":"completion","of":"r-1","tag":"SELECT 1","duration_us":7"#,
                // A query string of several statements: the tag is the last one's.
                r#"{"v":2,"kind":"completion","of":"r-2","tag":"INSERT 0 2","rows":3,"duration_us":7"#,
                r#"{"v":2,"kind":"completion","of":"r-3","sqlstate":"42501","duration_us":7"#,
                r#"{"v":2,"kind":"completion","of":"r-4","skipped":true,"duration_us":7"#,
                // An empty query: no tag.
                r#"{"v":2,"kind":"completion","of":"r-5","rows":0,"duration_us":7"#,
            ]
        );
    }
}
