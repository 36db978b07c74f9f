//! Who may do what: statements, as [`crate::sql`] classified them, decided by a Cedar policy.
//!
//! The schema below is fixed by pgiam; a policy file is validated against it (strict mode)
//! before it loads, so a typo in an action or attribute name is an error at load, never a
//! silent deny (or allow) at run time. A statement becomes one request per thing it does: per
//! relation and access, per function, and per session-level effect (role change, DO, COPY
//! PROGRAM, server files, SET). It is allowed only if every request is; the first denial names
//! the action and resource, and which policies decided it.
//!
//! Names resolve as PostgreSQL would: a schema-qualified name is itself; an unqualified one is
//! authorized against every schema it could resolve to (`pg_catalog` for functions and `pg_*`
//! relations, `pg_temp` once the session created a temporary table or named it, and every
//! schema any search_path the session asked for names, see [`Resolver`]), so shadowing a name
//! or changing the search_path never widens access.
//!
//! Turning a statement into its requests (the resolver, and the overloads a call may run) is
//! `resolver`; this file holds the schema, the requests and decisions, the policy store and the
//! principal, and the refusals pgiam makes whatever the policy says.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Weak};

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde::Serialize;

use crate::identity::Identity;
use crate::sql::{ClientEncoding, SettingValue, Statement};

mod resolver;

#[cfg(test)]
use resolver::CATALOG_RELATIONS;
pub use resolver::{name_overloads, Resolver};

/// The schema every policy is validated against.
pub const SCHEMA: &str = r#"
namespace PgIam {
  // A client, as pgiam verified it. `name` is the principal of the mapping that matched
  // (e.g. "unit:billing.service"); the rest is what the kernel said about the process.
  entity Principal = {
    name: String,
    role: String,
    database: String,
    uid: Long,
    gid: Long,
    user?: String,
    group?: String,
    unit?: String,
    container?: String,
    cgroup?: String,
    // Only as the kernel recorded it at connect() (intercepted, with BTF).
    exe?: String,
    // A person (`pgiam login`, or an ID token as password), as their issuer verified them.
    issuer?: String,
    subject?: String,
    email?: String,
    groups?: Set<String>,
    amr?: Set<String>,
    acr?: String,
    // Unix seconds; `context.now - principal.auth_time` is how long ago they authenticated.
    auth_time?: Long,
    mfa?: Bool,
  };
  entity Database;
  // Ids: "db.schema" for a schema, "db.schema.name" for a table or function.
  entity Schema in [Database] = { database: String, name: String };
  entity Table in [Schema] = { database: String, schema: String, name: String };
  entity Function in [Schema] = { database: String, schema: String, name: String };

  type Statement = {
    command: String,
    // Unix seconds at the decision.
    now: Long,
    // SET, RESET and set_config(): the parameter changed; SHOW, current_setting() and the
    // pg_settings views: the parameter read ("*": every setting); FunctionCall: the
    // function's oid.
    parameter?: String,
    function_oid?: Long,
    // execute of a user-defined function (the catalog's): the signatures, `name(type, ...)`
    // as psql's \df spells the types, of every function of that name and schema the call may
    // run (pgiam tells overloads apart by argument count only); of a function a user-defined
    // operator or cast runs: the signatures of the functions it is.
    overloads?: Set<String>,
  };

  action connect appliesTo { principal: Principal, resource: Database, context: Statement };
  action select, insert, update, delete, truncate, copy_in, copy_out, lock, ddl
    appliesTo { principal: Principal, resource: [Table, Database], context: Statement };
  action execute appliesTo { principal: Principal, resource: Function, context: Statement };
  action set, show, set_role, listen, notify, "do", copy_program, server_files, function_call
    appliesTo { principal: Principal, resource: Database, context: Statement };
}
"#;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Connect,
    Select,
    Insert,
    Update,
    Delete,
    Truncate,
    CopyIn,
    CopyOut,
    Lock,
    Ddl,
    Execute,
    Set,
    Show,
    SetRole,
    Listen,
    Notify,
    Do,
    CopyProgram,
    ServerFiles,
    FunctionCall,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Select => "select",
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Truncate => "truncate",
            Action::CopyIn => "copy_in",
            Action::CopyOut => "copy_out",
            Action::Lock => "lock",
            Action::Ddl => "ddl",
            Action::Execute => "execute",
            Action::Set => "set",
            Action::Show => "show",
            Action::SetRole => "set_role",
            Action::Listen => "listen",
            Action::Notify => "notify",
            Action::Do => "do",
            Action::CopyProgram => "copy_program",
            Action::ServerFiles => "server_files",
            Action::FunctionCall => "function_call",
        }
    }
}

/// What a request is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    Database,
    Table { schema: String, name: String },
    Function { schema: String, name: String },
}

impl Resource {
    fn describe(&self, database: &str) -> String {
        match self {
            Resource::Database => format!("database {database}"),
            Resource::Table { schema, name } => format!("table {schema}.{name}"),
            Resource::Function { schema, name } => format!("function {schema}.{name}"),
        }
    }
}

/// One question for the policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ask {
    pub action: Action,
    pub resource: Resource,
    pub command: &'static str,
    pub parameter: Option<String>,
    pub function_oid: Option<u32>,
    /// `execute` of a user-defined function: which of its overloads may run (sorted).
    pub overloads: Option<Vec<String>>,
}

impl Ask {
    pub fn on_database(action: Action, command: &'static str) -> Ask {
        Ask {
            action,
            resource: Resource::Database,
            command,
            parameter: None,
            function_oid: None,
            overloads: None,
        }
    }
}

/// The policies behind a decision: sorted, each once, and shared, so that a decision
/// remembered and handed out again is not copied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policies(Arc<[String]>);

impl From<Vec<String>> for Policies {
    fn from(mut names: Vec<String>) -> Policies {
        names.sort_unstable();
        names.dedup();
        Policies(names.into())
    }
}

impl std::ops::Deref for Policies {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl Serialize for Policies {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

/// The answer to one or more asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that decided: for an allow, every permit that applied to some ask; for a
    /// deny, the forbids that applied (empty: no policy permits it).
    pub policies: Policies,
    /// The denied action and resource, for the client's error message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
    /// Why, when it is not a policy's decision (a refusal pgiam makes on its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Decision {
    /// Allowed only if every one is: the first denial, or an allow naming every policy that
    /// permitted some part. Stops at the first denial (later decisions are not made).
    pub fn all(decisions: impl IntoIterator<Item = Decision>) -> Decision {
        // (One decision, the common case, is handed on as it is: no list is built.)
        let mut policies = Policies::default();
        let mut merged: Option<Vec<String>> = None;
        for d in decisions {
            if !d.allowed {
                return d;
            }
            if policies.is_empty() {
                policies = d.policies;
            } else if d.policies != policies {
                merged
                    .get_or_insert_with(|| policies.to_vec())
                    .extend(d.policies.iter().cloned());
            }
        }
        Decision {
            allowed: true,
            policies: merged.map_or(policies, Policies::from),
            denied: None,
            reason: None,
        }
    }

    /// A refusal no policy can lift.
    pub fn refuse(what: impl Into<String>, reason: impl Into<String>) -> Decision {
        Decision {
            allowed: false,
            policies: Policies::default(),
            denied: Some(what.into()),
            reason: Some(reason.into()),
        }
    }
}

/// The policy in force, replaced whole on reload. Sessions notice a new generation and drop
/// their cached decisions (waiting ones are woken to look: `admin::registry`).
pub struct PolicyStore {
    path: std::path::PathBuf,
    generation: std::sync::atomic::AtomicU64,
    current: std::sync::RwLock<std::sync::Arc<Policy>>,
}

impl PolicyStore {
    pub fn load(path: &Path) -> Result<PolicyStore, PolicyError> {
        Ok(PolicyStore::with(path.to_owned(), Policy::load(path)?))
    }

    /// A store holding `policy`, not backed by a file (reload fails).
    pub fn fixed(policy: Policy) -> PolicyStore {
        PolicyStore::with(std::path::PathBuf::new(), policy)
    }

    fn with(path: std::path::PathBuf, policy: Policy) -> PolicyStore {
        PolicyStore {
            path,
            generation: 0.into(),
            current: std::sync::RwLock::new(policy.into()),
        }
    }

    /// Replaces the policy in force (as a reload does).
    pub fn replace(&self, policy: Policy) {
        *self.current.write().expect("policy lock") = policy.into();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn current(&self) -> std::sync::Arc<Policy> {
        self.current.read().expect("policy lock").clone()
    }

    /// Reads the file again. On any error the policy in force stays and the error says why.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let policy = Policy::load(&self.path)?;
        let n = policy.len();
        self.replace(policy);
        Ok(n)
    }
}

/// A validated policy set, ready to answer.
pub struct Policy {
    schema: Schema,
    set: PolicySet,
    authorizer: Authorizer,
    ids: Vec<String>,
    /// Some policy may read `context.now` (its text says `now` somewhere): its decisions
    /// are remembered for the second they were made in only.
    reads_clock: bool,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates policy text. Policy ids are the `@id("…")` annotations where given
    /// (Cedar itself ignores them), else `policyN` in file order.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).expect("pgiam's schema is valid");
        let parsed = PolicySet::from_str(text).map_err(|e| format!("{e:?}"))?;
        if parsed.templates().next().is_some() {
            return Err("policy templates are not supported".into());
        }
        let mut set = PolicySet::new();
        let mut ids = Vec::new();
        for (n, p) in parsed.policies().enumerate() {
            let id = p
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("policy{n}"));
            set.add(p.new_id(PolicyId::new(&id)))
                .map_err(|e| format!("policy {id:?}: {e}"))?;
            ids.push(id);
        }
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| format!("{e}")).collect();
            return Err(format!(
                "does not validate against pgiam's schema: {}",
                errors.join("; ")
            ));
        }
        Ok(Policy {
            schema,
            set,
            authorizer: Authorizer::new(),
            ids,
            // (Cedar unescapes `\u{..}` in a string, so `context["n\u{6f}w"]` reads it too
            // without the word appearing: any escape counts.)
            reads_clock: text.contains("now") || text.contains("\\u"),
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Answers one ask for `principal`.
    pub fn decide(&self, principal: &Principal, ask: &Ask) -> Decision {
        match self.try_decide(principal, ask) {
            Ok(d) => d,
            // An ask pgiam cannot express is its own bug; it is refused, never allowed.
            Err(e) => Decision::refuse(
                format!(
                    "{} on {}",
                    ask.action.name(),
                    ask.resource.describe(&principal.database)
                ),
                format!("policy request failed: {e}"),
            ),
        }
    }

    fn try_decide(&self, principal: &Principal, ask: &Ask) -> Result<Decision, String> {
        let db = &principal.database;
        let resource_entities = resource_entities(db, &ask.resource)?;
        let resource = resource_entities[0].uid();
        let mut context = vec![
            (
                "command".to_owned(),
                RestrictedExpression::new_string(ask.command.to_owned()),
            ),
            (
                "now".to_owned(),
                RestrictedExpression::new_long(crate::people::now_secs()),
            ),
        ];
        if let Some(p) = &ask.parameter {
            context.push((
                "parameter".to_owned(),
                RestrictedExpression::new_string(p.clone()),
            ));
        }
        if let Some(oid) = ask.function_oid {
            context.push((
                "function_oid".to_owned(),
                RestrictedExpression::new_long(oid.into()),
            ));
        }
        if let Some(overloads) = &ask.overloads {
            context.push((
                "overloads".to_owned(),
                RestrictedExpression::new_set(
                    overloads
                        .iter()
                        .map(|o| RestrictedExpression::new_string(o.clone())),
                ),
            ));
        }
        let context = Context::from_pairs(context).map_err(|e| e.to_string())?;
        let request = Request::new(
            principal.entity.uid(),
            uid("Action", ask.action.name()),
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| e.to_string())?;
        let entities = Entities::from_entities(
            std::iter::once(principal.entity.clone()).chain(resource_entities),
            Some(&self.schema),
        )
        .map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        if let Some(e) = response.diagnostics().errors().next() {
            // A policy that errors is skipped by Cedar; pgiam refuses instead (fail closed).
            return Err(format!("policy evaluation error: {e}"));
        }
        let policies = response
            .diagnostics()
            .reason()
            .map(PolicyId::to_string)
            .collect::<Vec<_>>()
            .into();
        let allowed = response.decision() == cedar_policy::Decision::Allow;
        Ok(Decision {
            allowed,
            policies,
            denied: (!allowed)
                .then(|| format!("{} on {}", ask.action.name(), ask.resource.describe(db))),
            reason: None,
        })
    }

    /// Answers every ask; allowed only if all are.
    pub fn decide_all(&self, principal: &Principal, asks: &[Ask]) -> Decision {
        Decision::all(asks.iter().map(|ask| self.decide(principal, ask)))
    }
}

/// Decisions already made for one principal under one policy, so a statement seen before costs
/// a lookup instead of Cedar evaluations. Bounded; the caller drops it when the policy changes.
/// One per session (no lock); what it has not seen is asked of the decisions its principal's
/// sessions share ([`Principal::decide`]).
#[derive(Default)]
pub struct DecisionCache {
    decisions: HashMap<Ask, Decision>,
    /// The second the decisions were made in, when the policy reads the clock.
    second: i64,
}

impl DecisionCache {
    const CAPACITY: usize = 4096;

    pub fn clear(&mut self) {
        self.decisions.clear();
    }

    /// [`Policy::decide_all`], remembering each ask's answer. `generation`: the policy store's
    /// generation `policy` was taken at (or a later one's: see [`Principal::decide`]).
    pub fn decide_all(
        &mut self,
        policy: &Policy,
        generation: u64,
        principal: &Principal,
        asks: &[Ask],
    ) -> Decision {
        if policy.reads_clock {
            let now = crate::people::now_secs();
            if now != self.second {
                self.decisions.clear();
                self.second = now;
            }
        }
        Decision::all(asks.iter().map(|ask| {
            if let Some(d) = self.decisions.get(ask) {
                return d.clone();
            }
            let d = principal.decide(policy, generation, ask);
            self.remember(ask, &d);
            d
        }))
    }

    fn remember(&mut self, ask: &Ask, d: &Decision) {
        if self.decisions.len() >= Self::CAPACITY {
            self.decisions.clear();
        }
        self.decisions.insert(ask.clone(), d.clone());
    }
}

/// The decisions every session of one principal shares, under one policy generation.
#[derive(Default)]
struct SharedDecisions {
    generation: u64,
    cache: DecisionCache,
}

fn uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(&format!("PgIam::{kind}")).expect("valid type name"),
        EntityId::new(id),
    )
}

fn string_attrs(pairs: &[(&str, &str)]) -> HashMap<String, RestrictedExpression> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                RestrictedExpression::new_string((*v).to_owned()),
            )
        })
        .collect()
}

/// The resource and its ancestors (schema, database), resource first.
fn resource_entities(db: &str, resource: &Resource) -> Result<Vec<Entity>, String> {
    let database = Entity::new_no_attrs(uid("Database", db), HashSet::new());
    let schema_entity = |schema: &str| {
        Entity::new(
            uid("Schema", &format!("{db}.{schema}")),
            string_attrs(&[("database", db), ("name", schema)]),
            HashSet::from([database.uid()]),
        )
        .map_err(|e| e.to_string())
    };
    Ok(match resource {
        Resource::Database => vec![database],
        Resource::Table { schema, name } | Resource::Function { schema, name } => {
            let kind = if matches!(resource, Resource::Table { .. }) {
                "Table"
            } else {
                "Function"
            };
            let s = schema_entity(schema)?;
            let r = Entity::new(
                uid(kind, &format!("{db}.{schema}.{name}")),
                string_attrs(&[("database", db), ("schema", schema), ("name", name)]),
                HashSet::from([s.uid()]),
            )
            .map_err(|e| e.to_string())?;
            vec![r, s, database]
        }
    })
}

/// The client as the policy sees it.
pub struct Principal {
    entity: Entity,
    database: String,
    /// What the policy answered this principal, for all its sessions (see [`Principal::shared`]):
    /// a new session of a service that connects per request, or of a pool, asks Cedar nothing
    /// its predecessors were answered.
    decided: std::sync::Mutex<SharedDecisions>,
}

impl Principal {
    pub fn new(name: &str, role: &str, database: &str, identity: &Identity) -> Principal {
        let mut attrs = string_attrs(&[("name", name), ("role", role), ("database", database)]);
        attrs.insert(
            "uid".into(),
            RestrictedExpression::new_long(identity.uid.into()),
        );
        attrs.insert(
            "gid".into(),
            RestrictedExpression::new_long(identity.gid.into()),
        );
        for (k, v) in optional_facts(identity) {
            if let Some(v) = v {
                attrs.insert(k.into(), RestrictedExpression::new_string(v));
            }
        }
        if let Some(p) = &identity.person {
            let strings = |v: &[String]| {
                RestrictedExpression::new_set(
                    v.iter()
                        .map(|s| RestrictedExpression::new_string(s.clone())),
                )
            };
            attrs.insert(
                "issuer".into(),
                RestrictedExpression::new_string(p.issuer.clone()),
            );
            attrs.insert(
                "subject".into(),
                RestrictedExpression::new_string(p.subject.clone()),
            );
            if let Some(e) = &p.email {
                attrs.insert("email".into(), RestrictedExpression::new_string(e.clone()));
            }
            attrs.insert("groups".into(), strings(&p.groups));
            attrs.insert("amr".into(), strings(&p.amr));
            if let Some(a) = &p.acr {
                attrs.insert("acr".into(), RestrictedExpression::new_string(a.clone()));
            }
            if let Some(t) = p.auth_time {
                attrs.insert("auth_time".into(), RestrictedExpression::new_long(t));
            }
            attrs.insert("mfa".into(), RestrictedExpression::new_bool(p.mfa));
        }
        let entity = Entity::new(uid("Principal", name), attrs, HashSet::new())
            .expect("string and long attributes always evaluate");
        Principal {
            entity,
            database: database.to_owned(),
            decided: Default::default(),
        }
    }

    /// `policy`'s answer to `ask`, remembered for every session of this principal.
    /// `generation` labels `policy`: the store's generation read before the policy was taken,
    /// so a policy is never older than its label (a reload replaces the policy, then counts),
    /// and an answer is never kept under a generation newer than the policy that gave it.
    /// Answers under an older generation than the one kept are made, not kept; under a newer
    /// one, they replace what was kept. A policy that reads the clock is asked each time (the
    /// session's own cache keeps its answers for the second).
    pub fn decide(&self, policy: &Policy, generation: u64, ask: &Ask) -> Decision {
        if policy.reads_clock {
            return policy.decide(self, ask);
        }
        {
            let mut shared = self.decided.lock().unwrap_or_else(|e| e.into_inner());
            if shared.generation < generation {
                shared.cache.clear();
                shared.generation = generation;
            }
            if shared.generation == generation {
                if let Some(d) = shared.cache.decisions.get(ask) {
                    return d.clone();
                }
            }
        }
        // Cedar runs outside the lock: the principal's other sessions are not held up by it.
        let d = policy.decide(self, ask);
        let mut shared = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        if shared.generation == generation {
            shared.cache.remember(ask, &d);
        }
        d
    }

    /// The principal for these facts, shared by every open session with the same ones: a
    /// pool of connections from one service holds one entity, not one each.
    pub fn shared(name: &str, role: &str, database: &str, identity: &Identity) -> Arc<Principal> {
        type Key = (
            String,
            String,
            String,
            u32,
            u32,
            [Option<String>; 6],
            Option<Arc<crate::people::Person>>,
        );
        /// Live principals, and the map's size after the last sweep of dead entries.
        type Live = (HashMap<Key, Weak<Principal>>, usize);
        static LIVE: std::sync::LazyLock<std::sync::Mutex<Live>> =
            std::sync::LazyLock::new(Default::default);
        let key: Key = (
            name.to_owned(),
            role.to_owned(),
            database.to_owned(),
            identity.uid,
            identity.gid,
            optional_facts(identity).map(|(_, v)| v),
            identity.person.clone(),
        );
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = live.0.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        let p = Arc::new(Principal::new(name, role, database, identity));
        let (map, pruned_at) = &mut *live;
        map.insert(key, Arc::downgrade(&p));
        // Entries of ended sessions go once the map has doubled since the last sweep.
        if map.len() > 2 * *pruned_at + 64 {
            map.retain(|_, w| w.strong_count() > 0);
            *pruned_at = map.len();
        }
        p
    }
}

/// The identity's optional string attributes, by name: every fact besides uid and gid a policy
/// can read (and so everything two sessions must share to share a principal).
fn optional_facts(identity: &Identity) -> [(&'static str, Option<String>); 6] {
    [
        ("user", identity.user.clone()),
        ("group", identity.group.clone()),
        ("unit", identity.unit.clone()),
        ("container", identity.container.clone()),
        ("cgroup", identity.cgroup.clone()),
        // Only what the kernel recorded: /proc's word after connect() can be borrowed.
        (
            "exe",
            identity
                .exe
                .as_ref()
                .and_then(crate::identity::Executable::credential)
                .map(|e| e.display().to_string()),
        ),
    ]
}

/// What a session's statements are read with, beyond the statement itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    /// standard_conforming_strings as the server last reported it: the value statements are
    /// split with.
    pub standard_conforming_strings: bool,
    /// Its value at login, which RESET returns to.
    pub standard_conforming_strings_at_login: bool,
    /// The first client encoding other than UTF8 the session asked for, started with or was
    /// reported: from then on the server may read a statement in an encoding other than the
    /// one pgiam read it in.
    pub non_utf8_encoding: Option<ClientEncoding>,
    /// set_config() values from bound parameters are decided later, at Bind (a Parse).
    pub parameters_at_bind: bool,
}

impl Default for SessionSettings {
    /// A session that started with standard_conforming_strings on and speaks UTF-8.
    fn default() -> Self {
        SessionSettings {
            standard_conforming_strings: true,
            standard_conforming_strings_at_login: true,
            non_utf8_encoding: None,
            parameters_at_bind: false,
        }
    }
}

/// [`fixed_refusal_in`] for a session with [`SessionSettings::default`].
pub fn fixed_refusal(s: &Statement, gateway: bool) -> Option<Decision> {
    fixed_refusal_in(s, gateway, &SessionSettings::default())
}

fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

/// Refusals that no policy lifts: they would undo what pgiam guarantees about the session
/// (statements split and names read as the server splits and reads them; names are
/// authorized against every schema the session's search_path can name; in gateway mode, the
/// session stays the mapped role).
pub fn fixed_refusal_in(
    s: &Statement,
    gateway: bool,
    session: &SessionSettings,
) -> Option<Decision> {
    if s.search_path_unknown {
        // Names after it would be authorized against schemas pgiam cannot know.
        return Some(Decision::refuse(
            "set search_path",
            "pgiam authorizes names against every schema a session's search_path names, so \
             the value must be a constant in the statement (not a parameter or an \
             expression), a list PostgreSQL reads as pgiam does, and set_config()'s setting \
             name a constant",
        ));
    }
    let scs = session.standard_conforming_strings;
    let later =
        |v: &SettingValue| matches!(v, SettingValue::Parameter(_)) && session.parameters_at_bind;
    let keeps_scs = |v: &SettingValue| match v {
        SettingValue::Value(v) | SettingValue::Stored(v) => crate::sql::parse_bool(v) == Some(scs),
        SettingValue::IfThisSetting(v) => crate::sql::parse_bool(v) != Some(!scs),
        SettingValue::Default => scs == session.standard_conforming_strings_at_login,
        SettingValue::Current => true,
        v => later(v),
    };
    if !s.standard_conforming_strings.iter().all(keeps_scs) {
        // The server reports a change once it has run it: statements pipelined behind the
        // change would be split by pgiam with the old rules and by the server with the new.
        return Some(Decision::refuse(
            "set standard_conforming_strings",
            format!(
                "standard_conforming_strings is fixed for the session at {}: pgiam splits \
                 statements with that value, so it may only be set to it (as a constant, or a \
                 parameter bound in the extended protocol)",
                on_off(scs)
            ),
        ));
    }
    for v in &s.client_encoding {
        let named = match v {
            SettingValue::Value(n) | SettingValue::Stored(n) => {
                ClientEncoding::from_name(n).ok_or(n)
            }
            SettingValue::IfThisSetting(n) => match ClientEncoding::from_name(n) {
                Some(e) => Ok(e),
                // Not an encoding: the server would reject it as one.
                None => continue,
            },
            SettingValue::Default | SettingValue::Current => continue,
            v if later(v) => continue,
            _ => {
                return Some(Decision::refuse(
                    "set client_encoding",
                    "pgiam reads statements in the client's encoding, so a client_encoding \
                     value must be a constant in the statement, or a parameter bound in the \
                     extended protocol",
                ))
            }
        };
        match named {
            Err(name) => {
                return Some(Decision::refuse(
                    "set client_encoding",
                    format!("{name:?} is not an encoding name pgiam knows"),
                ))
            }
            Ok(e) if !e.is_ascii_safe() => {
                return Some(Decision::refuse(
                    "set client_encoding",
                    "client encodings whose characters can contain ASCII bytes (SJIS, BIG5, \
                     GBK, UHC, GB18030, JOHAB) split statements differently on the server",
                ))
            }
            Ok(_) => {}
        }
    }
    if let (Some(e), Some(name)) = (session.non_utf8_encoding, s.non_ascii_name()) {
        // The server reads the name in the encoding in force when it gets the statement,
        // which a SET ahead of it (or a rolled back one) may have changed from the one
        // pgiam read it in: the same bytes can be another name.
        return Some(Decision::refuse(
            format!("name {name:?}"),
            format!(
                "the session has used client_encoding {}: pgiam cannot be sure which \
                 encoding the server reads a statement in, so names it authorizes must be \
                 ASCII (string literals and comments may hold anything)",
                e.name()
            ),
        ));
    }
    let escape = s.role_change
        || s.do_block
        || matches!(s.node.as_str(), "CreateFunctionStmt" | "AlterFunctionStmt");
    if gateway && escape {
        return Some(Decision::refuse(
            format!("{} in gateway mode", s.command),
            "in gateway mode no statement may change the role or run server-side code that \
             could",
        ));
    }
    None
}

#[cfg(test)]
mod tests;
