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

use bytes::Bytes;
use internment::ArcIntern;
use serde_json::{json, Value};

use crate::audit::{AuditLog, Record};
use crate::policy::{
    Ask, Decision, DecisionCache, PolicyStore, Principal, Resolver, SessionSettings,
};
use crate::sql::{self, ClientEncoding, Effect, SettingValue, Statement};
use crate::wire::{FrontendMessage, PgError, Target};

mod frames;
mod named;
mod records;
mod sentinel;
use frames::{parse_param_types, BindParameters};
use named::Named;
pub use records::completion_record;
use records::About;
pub use sentinel::SENTINEL_SQLSTATE;
use sentinel::{sentinel_parse, sentinel_query, SENTINEL_NAME};

/// `pg_catalog.set_config(text, text, boolean)`: its oid is fixed in every PostgreSQL release.
const SET_CONFIG_OID: u32 = 2078;

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
    /// The record's execution is a later request of the same batch (an unnamed statement run
    /// at once through the unnamed portal): this request's success writes no completion, the
    /// execution's does; its failure is the record's completion.
    pub execution_follows: bool,
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
    policies: crate::policy::Policies,
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

pub struct Gate {
    audit: Option<AuditLog>,
    policies: Arc<PolicyStore>,
    policy_generation: u64,
    policy: Arc<crate::policy::Policy>,
    decisions: DecisionCache,
    principal: Arc<Principal>,
    /// Shared by the sessions that start alike, until one widens its own.
    resolver: ArcIntern<Resolver>,
    gateway: bool,
    info: SessionInfo,
    prepared: Named<Prepared>,
    /// Portal → the statement it was bound to, as it was at Bind (a portal keeps its plan
    /// when the statement's name is reused); `None`: bound to a statement pgiam did not know.
    portals: Named<(Vec<u8>, Option<Plan>)>,
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
    /// The server's catalog as last read (which functions user-defined operators and casts
    /// run), or why it could not be read; `None` until the session is given one.
    catalog: Option<crate::catalog::cache::Read>,
    /// A statement forwarded may have changed the catalog ([`crate::catalog::may_change`]).
    catalog_changed: bool,
    /// The person the principal carries now, and how many renewals of logged-in persons had
    /// happened when it was last looked up (see [`Gate::follow_person`]).
    person: Option<Arc<crate::people::Person>>,
    renewals_seen: u64,
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
            resolver: ArcIntern::new(resolver),
            gateway,
            prepared: Named::default(),
            portals: Named::default(),
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
            catalog: None,
            catalog_changed: false,
            person: info.facts.identity.person.clone(),
            renewals_seen: 0,
            info,
        }
    }

    /// Follows the session's person to their login's latest version: a new `pgiam login` of
    /// the same person (say, with a second factor) or a refresh applies to the session's next
    /// statements — the step-up a policy such as "DDL only with MFA in the last 15 minutes"
    /// asks for. (Only when some login changed since the last look: an atomic read otherwise.)
    ///
    /// Returns whether the person changed: the caller asks again whether the session may
    /// connect, for a renewed login can carry less than the one before it (a group the issuer
    /// took away) and the session must not go on with what the old one was allowed.
    pub fn follow_person(&mut self, people: &crate::people::People) -> bool {
        if !self.carries_a_login() || people.renewals() == self.renewals_seen {
            return false;
        }
        self.renewals_seen = people.renewals();
        let Some(person) = &self.person else {
            return false;
        };
        let facts = &self.info.facts;
        let Some(cgroup) = facts.identity.cgroup.as_deref() else {
            return false;
        };
        let Some(now) = people.renewed_person(facts.identity.uid, cgroup, person) else {
            return false;
        };
        tracing::info!(session = %facts.id, person = %now.principal(), mfa = now.mfa, "the session follows its person's renewed login");
        let identity = crate::people::with_person(&facts.identity, now.clone());
        self.principal =
            Principal::shared(&facts.principal, &facts.role, &facts.database, &identity);
        self.person = Some(now);
        self.decisions.clear();
        true
    }

    /// Whether the session carries a logged-in person (one who logged in with a token as
    /// password is never renewed), whose login a renewal may have changed.
    pub fn carries_a_login(&self) -> bool {
        self.person
            .as_ref()
            .is_some_and(|p| p.via == crate::people::Via::Login)
    }

    /// The catalog to decide the next messages with.
    pub fn use_catalog(&mut self, catalog: crate::catalog::cache::Read) {
        self.catalog = Some(catalog);
    }

    /// Whether a statement forwarded may have changed the catalog, and its transaction may
    /// not be over yet.
    pub fn catalog_changing(&self) -> bool {
        self.catalog_changed
    }

    /// The transaction of what changed the catalog is over.
    pub fn catalog_settled(&mut self) {
        self.catalog_changed = false;
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

    /// Whether a policy newer than the session's is in force (what [`Gate::refresh_policy`]
    /// would take up), without taking it.
    pub fn policy_replaced(&self) -> bool {
        self.policies.generation() != self.policy_generation
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
            .decide_all(&self.policy, self.policy_generation, &self.principal, asks)
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
        let mut before: Option<ArcIntern<Resolver>> = None;
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
        before: &mut Option<ArcIntern<Resolver>>,
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
                if let Err(d) = self.change_resolver(|r| r.widen_for(t)) {
                    return d;
                }
            }
        }
        let mut asks: Vec<Ask> = Vec::new();
        // What its operators and casts run, and which overloads its calls may run, as the
        // catalog says; without the catalog, a statement that needs it is refused.
        for t in all() {
            let from = asks.len();
            asks.extend(self.resolver.asks(t));
            if !crate::catalog::consulted_by(t) {
                continue;
            }
            let why = match &self.catalog {
                Some(Ok(catalog)) => {
                    crate::policy::name_overloads(t, catalog, &mut asks[from..]);
                    asks.extend(self.resolver.catalog_asks(t, catalog));
                    continue;
                }
                Some(Err(why)) => why.as_ref(),
                None => "not read yet",
            };
            return Decision::refuse(
                "operators and casts",
                format!(
                    "pgiam cannot read the server's catalog to see which functions the \
                     statement's operators and casts run: {why}"
                ),
            );
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

    /// Changes the session's resolver: a copy of its own (the one it had may be shared).
    fn change_resolver<T>(&mut self, change: impl FnOnce(&mut Resolver) -> T) -> T {
        let mut r = (*self.resolver).clone();
        let outcome = change(&mut r);
        self.resolver = ArcIntern::new(r);
        outcome
    }

    /// Effects on pgiam's view of the session of statements that will run.
    fn apply_effects(
        &mut self,
        statements: &[Statement],
        text: &str,
        creates: &mut Vec<(usize, Vec<u8>, u64)>,
    ) {
        for (i, s) in statements.iter().enumerate() {
            if s.temp && !self.resolver.temp {
                self.change_resolver(|r| r.temp = true);
            }
            self.holds_session_state |= s.session_state;
            self.catalog_changed |= crate::catalog::may_change(s);
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
                // Too deep for the parser's stack: PostgreSQL's code for it, not a syntax error.
                let code = if said.contains("stack depth limit exceeded")
                    || said.contains("nested too deeply")
                {
                    "54001"
                } else {
                    "42601"
                };
                (
                    Decision::refuse("parse", format!("cannot parse the statement: {said}")),
                    code,
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
                execution_follows: false,
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
                            policies: decision.policies.clone(),
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
        let unnamed = portal.is_empty() && matches!(&bound, Some((name, _)) if name.is_empty());
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
                    policies: Default::default(),
                    denied: None,
                    reason: Some("fetch from a cursor authorized when it was opened".into()),
                },
                None,
                Ok(Arc::from(Vec::new())),
                Value::Null,
            ),
        };
        let at_once = match &of {
            Some(of) if unnamed && decision.allowed && of.policies == decision.policies => {
                self.executed_at_once(of, expects)
            }
            _ => None,
        };
        let id = match &of {
            _ if at_once.is_some() => at_once,
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
            execution_follows: false,
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

/// Where the parser stopped in text that does not parse, for the client to point at.
fn syntax_error_position(classified: &Classified) -> Option<u32> {
    match classified {
        Err(sql::SqlError::Syntax { position, .. }) => *position,
        Err(sql::SqlError::Encoding(_)) | Ok(_) => None,
    }
}

#[cfg(test)]
mod tests;
