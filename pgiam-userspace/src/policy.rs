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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Weak};

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde::Serialize;

use crate::identity::Identity;
use crate::sql::{Access, ClientEncoding, QualifiedName, SettingValue, Statement};

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

/// The answer to one or more asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that decided: for an allow, every permit that applied to some ask; for a
    /// deny, the forbids that applied (empty: no policy permits it).
    pub policies: Vec<String>,
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
        let mut policies = BTreeSet::new();
        for d in decisions {
            if !d.allowed {
                return d;
            }
            policies.extend(d.policies);
        }
        Decision {
            allowed: true,
            policies: policies.into_iter().collect(),
            denied: None,
            reason: None,
        }
    }

    /// A refusal no policy can lift.
    pub fn refuse(what: impl Into<String>, reason: impl Into<String>) -> Decision {
        Decision {
            allowed: false,
            policies: Vec::new(),
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
            reads_clock: text.contains("now"),
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
            .collect();
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

/// The catalog's views of every setting: reading one is `show` of `*`.
const SETTINGS_VIEWS: &[&str] = &["pg_settings", "pg_file_settings"];

/// The catalog's functions that read settings: asked as `show` of what they read (the
/// classifier records it), not as `execute`, so that SHOW and current_setting() are one
/// authorization.
const SETTINGS_FUNCTIONS: &[&str] = &["current_setting", "pg_show_all_settings"];

/// Decisions already made for one principal under one policy, so a statement seen before costs
/// a lookup instead of Cedar evaluations. Bounded; the caller drops it when the policy changes.
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

    /// [`Policy::decide_all`], remembering each ask's answer.
    pub fn decide_all(&mut self, policy: &Policy, principal: &Principal, asks: &[Ask]) -> Decision {
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
            let d = policy.decide(principal, ask);
            if self.decisions.len() >= Self::CAPACITY {
                self.decisions.clear();
            }
            self.decisions.insert(ask.clone(), d.clone());
            d
        }))
    }
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
#[derive(Clone)]
pub struct Principal {
    entity: Entity,
    database: String,
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
        }
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

/// Relations in pg_catalog of every PostgreSQL from 12 on (sorted): catalogs and system views
/// that no supported server lacks. Only names listed here are taken to resolve to pg_catalog
/// alone; a relation a newer server added (or an older one lacks) is still authorized in every
/// schema of the path as well, since on a server without it the path would be searched.
const CATALOG_RELATIONS: &[&str] = &[
    "pg_aggregate",
    "pg_am",
    "pg_amop",
    "pg_amproc",
    "pg_attrdef",
    "pg_attribute",
    "pg_auth_members",
    "pg_authid",
    "pg_available_extension_versions",
    "pg_available_extensions",
    "pg_cast",
    "pg_class",
    "pg_collation",
    "pg_constraint",
    "pg_conversion",
    "pg_cursors",
    "pg_database",
    "pg_db_role_setting",
    "pg_default_acl",
    "pg_depend",
    "pg_description",
    "pg_enum",
    "pg_event_trigger",
    "pg_extension",
    "pg_foreign_data_wrapper",
    "pg_foreign_server",
    "pg_foreign_table",
    "pg_group",
    "pg_index",
    "pg_indexes",
    "pg_inherits",
    "pg_init_privs",
    "pg_language",
    "pg_largeobject",
    "pg_largeobject_metadata",
    "pg_locks",
    "pg_matviews",
    "pg_namespace",
    "pg_opclass",
    "pg_operator",
    "pg_opfamily",
    "pg_partitioned_table",
    "pg_policies",
    "pg_policy",
    "pg_prepared_statements",
    "pg_prepared_xacts",
    "pg_proc",
    "pg_publication",
    "pg_publication_rel",
    "pg_publication_tables",
    "pg_range",
    "pg_replication_origin",
    "pg_replication_slots",
    "pg_rewrite",
    "pg_roles",
    "pg_rules",
    "pg_seclabel",
    "pg_seclabels",
    "pg_sequence",
    "pg_sequences",
    "pg_settings",
    "pg_shadow",
    "pg_shdepend",
    "pg_shdescription",
    "pg_shseclabel",
    "pg_stat_activity",
    "pg_stat_all_indexes",
    "pg_stat_all_tables",
    "pg_stat_database",
    "pg_stat_ssl",
    "pg_stat_user_indexes",
    "pg_stat_user_tables",
    "pg_statio_user_tables",
    "pg_statistic",
    "pg_statistic_ext",
    "pg_statistic_ext_data",
    "pg_stats",
    "pg_subscription",
    "pg_subscription_rel",
    "pg_tables",
    "pg_tablespace",
    "pg_timezone_abbrevs",
    "pg_timezone_names",
    "pg_transform",
    "pg_trigger",
    "pg_ts_config",
    "pg_ts_config_map",
    "pg_ts_dict",
    "pg_ts_parser",
    "pg_ts_template",
    "pg_type",
    "pg_user",
    "pg_user_mapping",
    "pg_user_mappings",
    "pg_views",
];

/// How unqualified names resolve in a session, as far as pgiam can know them without asking
/// the server.
///
/// PostgreSQL searches the schemas of the session's current search_path, and clients may
/// change it (at startup, SET, SET LOCAL, RESET, set_config(), a function's SET clause).
/// Rather than follow which value is in force (SET LOCAL ends with its transaction, a rolled
/// back SET is undone, RESET goes back to the startup value, a function's SET clause lasts as
/// long as the call), pgiam keeps every schema that any search_path the session asked for
/// names, a set that only grows, and authorizes an unqualified name against all of them: the
/// order of the path no longer matters, since a name allowed in one schema but forbidden in
/// another is refused.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The session's role, for `$user`.
    role: String,
    /// Every schema named, `$user` replaced by the role, in the order first named. pg_temp is
    /// kept apart (`temp`).
    schemas: Vec<String>,
    /// pg_temp may be searched: the session created a temporary relation or named pg_temp in
    /// a search_path.
    pub temp: bool,
    /// The client chose the search_path at startup: that is a `set` of it, asked with every
    /// statement (`context.command == "startup"`) so that a policy can refuse it.
    pub chosen_at_startup: bool,
    /// A search_path named `$user`, which PostgreSQL reads as the *current* role.
    user_named: bool,
    /// A role change was allowed (a policy permitted `set_role`): the current role, and so
    /// `$user`, may no longer be `role`.
    role_may_differ: bool,
}

impl Resolver {
    /// The most schemas a session's search_paths may name: each is one more request per
    /// unqualified name. A statement that would name more is refused.
    pub const MAX_SCHEMAS: usize = 256;

    /// A session starting with `search_path` (schema names; `$user`: the session's role,
    /// `pg_temp`: the session's temporary schema).
    pub fn new(search_path: &[String], role: &str) -> Resolver {
        let mut r = Resolver {
            role: role.to_owned(),
            schemas: Vec::new(),
            temp: false,
            chosen_at_startup: false,
            user_named: false,
            role_may_differ: false,
        };
        for name in search_path {
            r.add(name);
        }
        r
    }

    /// Every schema an unqualified name may be authorized against (pg_temp and pg_catalog
    /// aside).
    pub fn schemas(&self) -> &[String] {
        &self.schemas
    }

    /// Adds one name of a search_path.
    fn add(&mut self, name: &str) {
        let name = match name {
            // No schema has an empty name.
            "" => return,
            "pg_temp" => {
                self.temp = true;
                return;
            }
            "$user" => {
                self.user_named = true;
                self.role.as_str()
            }
            other => other,
        };
        if !self.schemas.iter().any(|s| s == name) {
            self.schemas.push(name.to_owned());
        }
    }

    /// Would [`Resolver::widen_for`] change anything (or refuse)?
    pub fn would_widen(&self, statement: &Statement) -> bool {
        (statement.role_change && !self.role_may_differ)
            || statement
                .search_path
                .iter()
                .any(|name| match name.as_str() {
                    "" => false,
                    "pg_temp" => !self.temp,
                    "$user" => true,
                    n => !self.schemas.iter().any(|s| s == n),
                })
    }

    /// Searches, from now on, every schema `statement` asks search_path to name: before the
    /// statement itself (and anything after it) is decided, so a SET pipelined ahead of a
    /// statement has widened the set by the time that statement is decided. A statement
    /// whose value pgiam cannot read is [`fixed_refusal`]'s to refuse.
    pub fn widen_for(&mut self, statement: &Statement) -> Result<(), Decision> {
        let names_user = statement.search_path.contains("$user");
        if (statement.role_change && (self.user_named || names_user))
            || (names_user && self.role_may_differ)
        {
            return Err(Decision::refuse(
                "set search_path with $user and a role change",
                "$user in a search_path means the session's current role, and pgiam \
                 authorizes it as the mapped one: a session cannot both name $user in its \
                 search_path and change its role",
            ));
        }
        if statement.role_change {
            self.role_may_differ = true;
        }
        for name in &statement.search_path {
            self.add(name);
        }
        if self.schemas.len() > Self::MAX_SCHEMAS {
            return Err(Decision::refuse(
                "set search_path",
                format!(
                    "a session's search_paths may name at most {} schemas in all; start a new \
                     session",
                    Self::MAX_SCHEMAS
                ),
            ));
        }
        Ok(())
    }

    /// Every schema `name` could be found in, as PostgreSQL searches.
    fn relation_schemas(&self, name: &QualifiedName) -> Vec<String> {
        if let Some(s) = &name.schema {
            return vec![s.clone()];
        }
        let mut out = Vec::with_capacity(self.schemas.len() + 2);
        if self.temp {
            out.push("pg_temp".to_owned());
        }
        // pg_catalog is searched before the path unless the path names it; every relation in
        // it is called pg_* (the server refuses to create others there).
        let catalog_first = !self.schemas.iter().any(|s| s == "pg_catalog");
        if name.name.starts_with("pg_") && catalog_first {
            out.push("pg_catalog".to_owned());
            // A relation every PostgreSQL has in pg_catalog is found there before the path
            // is searched: the path cannot reach one of that name (pg_dump's `FROM pg_settings`
            // then needs no permit on a public.pg_settings that never exists).
            if CATALOG_RELATIONS.binary_search(&name.name.as_str()).is_ok() {
                return out;
            }
        }
        out.extend(self.schemas.iter().cloned());
        out
    }

    /// Functions: pg_catalog always, then the path (never pg_temp: PostgreSQL does not look
    /// functions up there unqualified).
    fn function_schemas(&self, name: &QualifiedName) -> Vec<String> {
        if let Some(s) = &name.schema {
            return vec![s.clone()];
        }
        let mut out = Vec::with_capacity(self.schemas.len() + 1);
        out.push("pg_catalog".to_owned());
        out.extend(self.schemas.iter().filter(|s| *s != "pg_catalog").cloned());
        out
    }

    /// The asks of the functions `statement` runs through user-defined operators and casts,
    /// as the catalog lists them: `execute` on each, as if called by name (with what calling
    /// it by name asks besides: server files, dynamic SQL), with the signatures it may be.
    pub fn catalog_asks(
        &self,
        statement: &Statement,
        catalog: &crate::catalog::Snapshot,
    ) -> Vec<Ask> {
        let command = statement.command;
        let mut asks = Vec::new();
        for c in catalog.functions_behind(statement) {
            let f = c.function;
            let schema = f.schema.clone().unwrap_or_else(|| "pg_catalog".into());
            let (files, dynamic) = crate::sql::function_runs(&f.name);
            if files {
                asks.push(Ask::on_database(Action::ServerFiles, command));
            }
            if dynamic {
                asks.push(Ask::on_database(Action::Do, command));
            }
            asks.push(Ask {
                action: Action::Execute,
                resource: Resource::Function {
                    schema,
                    name: f.name.clone(),
                },
                command,
                parameter: None,
                function_oid: None,
                overloads: Some(c.signatures),
            });
        }
        asks
    }

    /// The asks a statement makes.
    pub fn asks(&self, statement: &Statement) -> Vec<Ask> {
        let command = statement.command;
        let mut asks = Vec::new();
        let mut push = |action, resource| {
            asks.push(Ask {
                action,
                resource,
                command,
                parameter: None,
                function_oid: None,
                overloads: None,
            })
        };
        let mut reads_every_setting = false;
        for rel in &statement.relations {
            let actions: &[Action] = match rel.access {
                Access::Select => &[Action::Select],
                Access::Insert => &[Action::Insert],
                Access::Update => &[Action::Update],
                Access::Delete => &[Action::Delete],
                Access::Merge => &[Action::Insert, Action::Update, Action::Delete],
                Access::Truncate => &[Action::Truncate],
                Access::CopyIn => &[Action::CopyIn],
                Access::CopyOut => &[Action::CopyOut],
                Access::Lock => &[Action::Lock],
                Access::Create | Access::Ddl => &[Action::Ddl],
            };
            for schema in self.relation_schemas(&rel.name) {
                // The catalog's settings views are a read of every setting: `show`, as SHOW
                // ALL is (pg_dump's one-row set_config shape reads only a name, and sets it).
                if schema == "pg_catalog"
                    && SETTINGS_VIEWS.contains(&rel.name.name.as_str())
                    && rel.access == Access::Select
                {
                    reads_every_setting |= !statement.setting_from_pg_settings;
                    continue;
                }
                for &action in actions {
                    push(
                        action,
                        Resource::Table {
                            schema: schema.clone(),
                            name: rel.name.name.clone(),
                        },
                    );
                }
            }
        }
        for f in &statement.functions {
            for schema in self.function_schemas(f) {
                // The catalog's functions that read settings are asked as `show` (below).
                if schema == "pg_catalog" && SETTINGS_FUNCTIONS.contains(&f.name.as_str()) {
                    continue;
                }
                push(
                    Action::Execute,
                    Resource::Function {
                        schema,
                        name: f.name.clone(),
                    },
                );
            }
        }
        // pg_dump's one-row pg_settings shape reads a constant setting only from the
        // catalog's view: a pg_settings found anywhere else could hold any row.
        let settings_elsewhere = statement.setting_from_pg_settings
            && statement.relations.iter().any(|r| {
                r.name.name == "pg_settings" && self.relation_schemas(&r.name) != ["pg_catalog"]
            });
        let flags = [
            (statement.role_change || settings_elsewhere, Action::SetRole),
            (statement.do_block, Action::Do),
            (statement.copy_program, Action::CopyProgram),
            (statement.server_files, Action::ServerFiles),
            (command == "listen", Action::Listen),
            (command == "notify", Action::Notify),
            // A utility statement that names no relation (CREATE FUNCTION, CREATE SCHEMA,
            // ALTER SYSTEM, …) is DDL on the database.
            (
                command == "ddl" && statement.relations.is_empty(),
                Action::Ddl,
            ),
        ];
        for (on, action) in flags {
            if on {
                asks.push(Ask::on_database(action, command));
            }
        }
        for p in &statement.parameters {
            asks.push(Ask {
                parameter: Some(p.clone()),
                ..Ask::on_database(Action::Set, command)
            });
        }
        let every = reads_every_setting.then(|| "*".to_owned());
        for p in statement.shows.iter().cloned().chain(every) {
            asks.push(Ask {
                parameter: Some(p),
                ..Ask::on_database(Action::Show, command)
            });
        }
        if self.chosen_at_startup {
            asks.push(Ask {
                parameter: Some("search_path".into()),
                ..Ask::on_database(Action::Set, "startup")
            });
        }
        asks
    }
}

/// Names, in each of `asks` that executes a function `statement` calls by name, the
/// user-defined overloads the call may run, as the catalog lists them (by the argument
/// counts the statement calls it with).
pub fn name_overloads(statement: &Statement, catalog: &crate::catalog::Snapshot, asks: &mut [Ask]) {
    for ask in asks.iter_mut().filter(|a| a.overloads.is_none()) {
        let (Action::Execute, Resource::Function { schema, name }) = (ask.action, &ask.resource)
        else {
            continue;
        };
        let arities: BTreeSet<usize> = statement
            .function_arities
            .iter()
            .filter(|(f, _)| f.name == *name && f.schema.as_ref().is_none_or(|s| s == schema))
            .flat_map(|(_, n)| n.iter().copied())
            .collect();
        // (Every call records its count; none recorded, every overload.)
        let arities = (!arities.is_empty()).then_some(&arities);
        ask.overloads = catalog.overloads(schema, name, arities);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Source;

    fn principal() -> Principal {
        let mut id = Identity::from_kernel_facts(Source::UnixPeerCred, 1000, 1000, None);
        id.unit = Some("billing.service".into());
        Principal::new("unit:billing.service", "billing", "app", &id)
    }

    #[test]
    fn sessions_with_the_same_facts_share_one_principal() {
        let mut id = Identity::from_kernel_facts(Source::UnixPeerCred, 4242, 4242, None);
        id.unit = Some("pool.service".into());
        let a = Principal::shared("unit:pool.service", "pool", "app", &id);
        let b = Principal::shared("unit:pool.service", "pool", "app", &id);
        assert!(Arc::ptr_eq(&a, &b));
        // Any fact a policy can read makes another principal.
        let mut other = id.clone();
        other.exe = Some(crate::identity::Executable::Recorded(
            "/usr/bin/other".into(),
        ));
        let c = Principal::shared("unit:pool.service", "pool", "app", &other);
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(!Arc::ptr_eq(
            &a,
            &Principal::shared("unit:pool.service", "pool", "db2", &id)
        ));
        assert_eq!(
            a.entity,
            Principal::new("unit:pool.service", "pool", "app", &id).entity
        );
    }

    const POLICY: &str = r#"
        @id("read-public")
        permit(principal, action == PgIam::Action::"select", resource in PgIam::Schema::"app.public");
        @id("builtins")
        permit(principal, action == PgIam::Action::"execute", resource);
        @id("no-secrets")
        forbid(principal, action, resource == PgIam::Table::"app.public.secret");
        @id("no-file-functions")
        forbid(principal, action == PgIam::Action::"execute", resource)
          when { resource.name like "pg_read*" };
        @id("billing-writes")
        permit(principal, action in [PgIam::Action::"insert", PgIam::Action::"update"],
               resource == PgIam::Table::"app.public.invoices")
          when { principal has unit && principal.unit == "billing.service" };
    "#;

    fn decide(sql: &str) -> Decision {
        let policy = Policy::parse(POLICY).unwrap();
        let r = Resolver::new(&["public".into()], "billing");
        let stmts = crate::sql::classify(sql, true).unwrap();
        let asks: Vec<Ask> = stmts.iter().flat_map(|s| r.asks(s)).collect();
        policy.decide_all(&principal(), &asks)
    }

    #[test]
    fn decisions_name_their_policies() {
        let d = decide("SELECT lower(name) FROM accounts");
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policies, ["builtins", "read-public"]);
        let d = decide("SELECT * FROM Secret");
        assert!(!d.allowed);
        assert_eq!(d.policies, ["no-secrets"]);
        assert_eq!(d.denied.as_deref(), Some("select on table public.secret"));
        let d = decide("DELETE FROM accounts");
        assert!(!d.allowed);
        assert!(d.policies.is_empty(), "denied by default");
        assert!(decide("INSERT INTO invoices SELECT * FROM accounts").allowed);
        assert!(!decide("INSERT INTO invoices SELECT * FROM secret").allowed);
        assert!(!decide("SELECT pg_read_file('/etc/passwd')").allowed);
        assert!(!decide("SET ROLE postgres").allowed);
        assert!(!decide("DO $$ BEGIN END $$").allowed);
        assert!(!decide("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'").allowed);
        // Another schema, qualified, is not public.
        assert!(!decide("SELECT * FROM other.accounts").allowed);
    }

    #[test]
    fn unqualified_names_are_checked_in_every_schema_they_could_mean() {
        // pg_settings would be pg_catalog.pg_settings, which read-public does not cover.
        assert!(!decide("SELECT * FROM pg_settings").allowed);
        let mut r = Resolver::new(&["$user".into(), "public".into()], "billing");
        let q = QualifiedName {
            schema: None,
            name: "t".into(),
        };
        assert_eq!(r.relation_schemas(&q), ["billing", "public"]);
        r.temp = true;
        assert_eq!(r.relation_schemas(&q), ["pg_temp", "billing", "public"]);
        assert_eq!(r.function_schemas(&q), ["pg_catalog", "billing", "public"]);
    }

    fn widen(r: &mut Resolver, sql: &str) -> Result<(), Decision> {
        for s in crate::sql::classify(sql, true).unwrap() {
            if let Some(d) = fixed_refusal(&s, false) {
                return Err(d);
            }
            r.widen_for(&s)?;
        }
        Ok(())
    }

    #[test]
    fn pg_dumps_pg_settings_row_is_a_setting_only_from_the_catalogs_view() {
        let sql = "SELECT set_config(name, 'view', false) FROM pg_settings \
                   WHERE name = 'restrict_nonsystem_relation_kind'";
        let s = crate::sql::classify(sql, true).unwrap().remove(0);
        let set_role = |r: &Resolver| r.asks(&s).iter().any(|a| a.action == Action::SetRole);
        let mut r = Resolver::new(&["public".into()], "u");
        assert!(!set_role(&r), "the catalog's view: the setting named");
        // A temporary pg_settings, or a path that puts pg_catalog after another schema,
        // could hold any row: then it is what a setting that is not a constant is.
        r.temp = true;
        assert!(set_role(&r));
        let r = Resolver::new(&["public".into(), "pg_catalog".into()], "u");
        assert!(set_role(&r));
    }

    #[test]
    fn a_relation_every_server_has_in_pg_catalog_is_found_only_there() {
        assert!(
            CATALOG_RELATIONS.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats"
        );
        let name = |n: &str| QualifiedName {
            schema: None,
            name: n.into(),
        };
        let mut r = Resolver::new(&["public".into(), "app".into()], "u");
        assert_eq!(r.relation_schemas(&name("pg_settings")), ["pg_catalog"]);
        // A pg_* name not in every server's catalog may be found on the path.
        assert_eq!(
            r.relation_schemas(&name("pg_stat_io")),
            ["pg_catalog", "public", "app"]
        );
        // A temporary relation shadows the catalog; a path that names pg_catalog puts it in
        // its place, after the schemas before it.
        r.temp = true;
        assert_eq!(
            r.relation_schemas(&name("pg_settings")),
            ["pg_temp", "pg_catalog"]
        );
        let r = Resolver::new(&["public".into(), "pg_catalog".into()], "u");
        assert_eq!(
            r.relation_schemas(&name("pg_settings")),
            ["public", "pg_catalog"]
        );
    }

    #[test]
    fn every_schema_any_search_path_named_is_searched_and_the_set_only_grows() {
        let mut r = Resolver::new(&["public".into()], "billing");
        let t = QualifiedName {
            schema: None,
            name: "t".into(),
        };
        for sql in [
            r#"SET search_path = other, "$user", public"#,
            "RESET search_path",
            "SET search_path TO DEFAULT",
            "SELECT set_config('search_path', 'PG_TEMP, Public', true)",
            "SET LOCAL search_path = ''",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = fn_path AS 'select 1'",
        ] {
            widen(&mut r, sql).unwrap();
        }
        assert_eq!(
            r.relation_schemas(&t),
            ["pg_temp", "public", "billing", "other", "fn_path"]
        );
        // Functions are never looked up in pg_temp unqualified.
        assert_eq!(
            r.function_schemas(&t),
            ["pg_catalog", "public", "billing", "other", "fn_path"]
        );
        let pg_class = QualifiedName {
            schema: None,
            name: "pg_class".into(),
        };
        assert_eq!(
            r.relation_schemas(&pg_class)[..2],
            ["pg_temp", "pg_catalog"]
        );
        // Named pg_catalog is searched for every relation, where it stands in the set.
        widen(&mut r, "SET search_path = pg_catalog").unwrap();
        assert_eq!(
            r.relation_schemas(&pg_class),
            [
                "pg_temp",
                "public",
                "billing",
                "other",
                "fn_path",
                "pg_catalog"
            ]
        );
        assert!(r.relation_schemas(&t).contains(&"pg_catalog".to_owned()));
        assert_eq!(
            r.function_schemas(&t),
            ["pg_catalog", "public", "billing", "other", "fn_path"]
        );
        // A qualified name is only itself.
        let q = QualifiedName {
            schema: Some("x".into()),
            name: "t".into(),
        };
        assert_eq!(r.relation_schemas(&q), ["x"]);
    }

    /// The decision on a query string, every statement's asks together.
    fn decide_sql(policy: &Policy, r: &Resolver, sql: &str) -> Decision {
        let asks: Vec<Ask> = crate::sql::classify(sql, true)
            .unwrap()
            .iter()
            .flat_map(|s| r.asks(s))
            .collect();
        policy.decide_all(&principal(), &asks)
    }

    #[test]
    fn reading_a_setting_is_one_action_however_it_is_read() {
        // POLICY permits every function and reading public tables, nothing of settings.
        let r = Resolver::new(&["public".into()], "billing");
        let decide = |policy: &Policy, sql: &str| decide_sql(policy, &r, sql);
        let none = Policy::parse(POLICY).unwrap();
        for sql in [
            "SHOW app.secret",
            "SHOW ALL",
            "SELECT current_setting('app.secret')",
            "SELECT pg_catalog.current_setting('app.secret', true)",
            "SELECT setting FROM pg_settings WHERE name = 'app.secret'",
            "SELECT * FROM pg_catalog.pg_file_settings",
            "SELECT * FROM pg_show_all_settings()",
        ] {
            let d = decide(&none, sql);
            assert!(!d.allowed, "{sql}");
            assert_eq!(d.denied.as_deref(), Some("show on database app"), "{sql}");
        }
        let work_mem = Policy::parse(&format!(
            "{POLICY}\npermit(principal, action == PgIam::Action::\"show\", resource) \
             when {{ context has parameter && context.parameter == \"work_mem\" }};"
        ))
        .unwrap();
        for sql in [
            "SHOW work_mem",
            "SHOW Work_Mem",
            "SELECT current_setting('work_mem')",
        ] {
            assert!(decide(&work_mem, sql).allowed, "{sql}");
        }
        for sql in [
            "SHOW ALL",
            "SELECT current_setting(name) FROM t",
            "SHOW app.secret",
        ] {
            assert!(!decide(&work_mem, sql).allowed, "{sql}");
        }
        // A function of that name elsewhere is a function like any other.
        let d = decide(&none, "SELECT public.current_setting('x')");
        assert_eq!(d.denied.as_deref(), Some("show on database app"));
    }

    #[test]
    fn a_locking_read_asks_lock_on_what_it_reads() {
        let policy = Policy::parse(POLICY).unwrap();
        let r = Resolver::new(&["public".into()], "billing");
        for sql in [
            "SELECT * FROM accounts FOR UPDATE",
            "SELECT * FROM accounts FOR NO KEY UPDATE OF accounts NOWAIT",
            "SELECT * FROM accounts a FOR SHARE OF a SKIP LOCKED",
            "SELECT * FROM accounts FOR KEY SHARE",
            "SELECT * FROM (SELECT * FROM accounts FOR UPDATE) s",
            "WITH x AS (SELECT * FROM accounts FOR UPDATE) SELECT * FROM x",
        ] {
            let s = &crate::sql::classify(sql, true).unwrap()[0];
            let d = policy.decide_all(&principal(), &r.asks(s));
            assert!(!d.allowed, "{sql}");
            assert_eq!(
                d.denied.as_deref(),
                Some("lock on table public.accounts"),
                "{sql}"
            );
        }
        let s = &crate::sql::classify("SELECT * FROM accounts", true).unwrap()[0];
        assert!(policy.decide_all(&principal(), &r.asks(s)).allowed);
    }

    #[test]
    fn a_name_forbidden_in_any_schema_a_search_path_named_is_refused() {
        let policy = Policy::parse(&format!(
            "{POLICY}\n@id(\"settings\") permit(principal, action == PgIam::Action::\"set\", resource);"
        ))
        .unwrap();
        let mut r = Resolver::new(&["public".into()], "billing");
        let decide = |r: &Resolver, sql: &str| decide_sql(&policy, r, sql);
        assert!(decide(&r, "SELECT * FROM accounts").allowed);
        widen(&mut r, "SET search_path = other").unwrap();
        let d = decide(&r, "SELECT * FROM accounts");
        assert!(!d.allowed);
        assert_eq!(d.denied.as_deref(), Some("select on table other.accounts"));
        // Qualified, the allowed table is still allowed.
        assert!(decide(&r, "SELECT * FROM public.accounts").allowed);
        // A policy can refuse the change itself.
        let no_set = Policy::parse(&format!(
            "{POLICY}\nforbid(principal, action == PgIam::Action::\"set\", resource) \
             when {{ context has parameter && context.parameter == \"search_path\" }};"
        ))
        .unwrap();
        let s = &crate::sql::classify("SET search_path = public", true).unwrap()[0];
        assert!(!no_set.decide_all(&principal(), &r.asks(s)).allowed);
        // So can it a choice made at startup: asked with every statement.
        let mut chosen = Resolver::new(&["public".into()], "billing");
        chosen.chosen_at_startup = true;
        let s = &crate::sql::classify("SELECT * FROM accounts", true).unwrap()[0];
        assert!(policy.decide_all(&principal(), &chosen.asks(s)).allowed);
        let d = no_set.decide_all(&principal(), &chosen.asks(s));
        assert_eq!(d.denied.as_deref(), Some("set on database app"));
    }

    #[test]
    fn dollar_user_and_a_role_change_never_meet() {
        // $user named, then a role change; a role change, then $user named; both at once.
        let mut r = Resolver::new(&["$user".into(), "public".into()], "billing");
        assert_eq!(r.schemas(), ["billing", "public"]);
        assert!(widen(&mut r, "SET ROLE admin").is_err());
        let mut r = Resolver::new(&["public".into()], "billing");
        widen(&mut r, "SET ROLE admin").unwrap();
        assert!(widen(&mut r, r#"SET search_path = "$user""#).is_err());
        assert!(widen(&mut r, "SELECT set_config('search_path', '$user', false)").is_err());
        widen(&mut r, "SET search_path = other").unwrap();
        let mut r = Resolver::new(&["public".into()], "billing");
        assert!(widen(&mut r, r#"SET ROLE admin; SET search_path = "$user""#).is_err());
        let s = &crate::sql::classify(r#"SET search_path = "$user""#, true).unwrap()[0];
        assert!(Resolver::new(&[], "b").would_widen(s));
    }

    #[test]
    fn search_paths_pgiam_cannot_read_or_bound_are_refused_by_any_policy() {
        let mut r = Resolver::new(&["public".into()], "billing");
        for sql in [
            "SELECT set_config('search_path', $1, false)",
            "SELECT set_config('search_path', lower('X'), false)",
            "SELECT set_config(lower('SEARCH_PATH'), lower('x'), false)",
        ] {
            let d = widen(&mut r, sql).unwrap_err();
            assert_eq!(d.denied.as_deref(), Some("set search_path"), "{sql}");
            assert!(d.policies.is_empty());
        }
        assert_eq!(r.schemas(), ["public"]);
        // pg_dump's first statement names nothing.
        widen(
            &mut r,
            "SELECT pg_catalog.set_config('search_path', '', false)",
        )
        .unwrap();
        assert_eq!(r.schemas(), ["public"]);
        let many: Vec<String> = (0..Resolver::MAX_SCHEMAS)
            .map(|i| format!("s{i}"))
            .collect();
        let d = widen(&mut r, &format!("SET search_path = {}", many.join(", "))).unwrap_err();
        assert!(d.reason.unwrap().contains("at most"));
    }

    fn refused_in(sql: &str, session: &SessionSettings) -> Option<String> {
        crate::sql::classify(sql, session.standard_conforming_strings)
            .unwrap()
            .iter()
            .find_map(|s| fixed_refusal_in(s, false, session))
            .map(|d| format!("{}: {}", d.denied.unwrap(), d.reason.unwrap()))
    }

    #[test]
    fn standard_conforming_strings_may_be_set_to_the_value_in_force_only() {
        for at in [true, false] {
            let session = SessionSettings {
                standard_conforming_strings: at,
                standard_conforming_strings_at_login: at,
                ..SessionSettings::default()
            };
            let same = if at { "on" } else { "off" };
            let other = if at { "off" } else { "on" };
            for sql in [
                format!("SET standard_conforming_strings = {same}"),
                format!(
                    "SET LOCAL standard_conforming_strings TO '{}'",
                    same.to_uppercase()
                ),
                format!("SET standard_conforming_strings = {}", u8::from(at)),
                format!(
                    "SET standard_conforming_strings = {}",
                    if at { "yes" } else { "no" }
                ),
                format!(
                    "SET standard_conforming_strings = {}",
                    if at { "t" } else { "f" }
                ),
                format!("SELECT set_config('standard_conforming_strings', '{same}', false)"),
                "RESET standard_conforming_strings".into(),
                "SET standard_conforming_strings TO DEFAULT".into(),
                "RESET ALL".into(),
                "SELECT set_config('standard_conforming_strings', NULL, false)".into(),
                format!("ALTER ROLE r SET standard_conforming_strings = {same}"),
                format!(
                    "CREATE FUNCTION f() RETURNS int LANGUAGE sql \
                     SET standard_conforming_strings = {same} AS 'select 1'"
                ),
                // Not a boolean, so not standard_conforming_strings if the setting is it.
                "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings".into(),
            ] {
                assert_eq!(refused_in(&sql, &session), None, "{sql} (at {same})");
            }
            for sql in [
                format!("SET standard_conforming_strings = {other}"),
                format!("SET LOCAL standard_conforming_strings = {other}"),
                format!("SELECT set_config('standard_conforming_strings', '{other}', true)"),
                format!("ALTER SYSTEM SET standard_conforming_strings = {same}"),
                format!("SELECT set_config(name, '{other}', false) FROM pg_settings"),
                "SET standard_conforming_strings = o".into(),
                "SET standard_conforming_strings = 'maybe'".into(),
                "SELECT set_config('standard_conforming_strings', lower('ON'), false)".into(),
                // No Bind to read it at.
                "SELECT set_config('standard_conforming_strings', $1, false)".into(),
            ] {
                let why = refused_in(&sql, &session).unwrap_or_else(|| panic!("{sql}"));
                assert!(
                    why.contains(&format!("fixed for the session at {same}")),
                    "{sql}: {why}"
                );
            }
        }
        // A value changed by a route pgiam did not see: RESET would change it back.
        let drifted = SessionSettings {
            standard_conforming_strings: false,
            standard_conforming_strings_at_login: true,
            ..SessionSettings::default()
        };
        assert!(refused_in("RESET standard_conforming_strings", &drifted).is_some());
        assert!(refused_in("SET standard_conforming_strings = off", &drifted).is_none());
        // A Parse leaves a bound parameter to its Bind.
        let parse = SessionSettings {
            parameters_at_bind: true,
            ..SessionSettings::default()
        };
        assert!(refused_in(
            "SELECT set_config('standard_conforming_strings', $1, false)",
            &parse
        )
        .is_none());
    }

    #[test]
    fn client_encodings_must_be_ascii_safe_and_constant() {
        let session = SessionSettings::default();
        for sql in [
            "SET client_encoding = 'UTF8'",
            "SET client_encoding = 'LATIN1'",
            "SET NAMES 'latin-9'",
            "SET LOCAL client_encoding = euc_jp",
            "SET client_encoding TO DEFAULT",
            "RESET client_encoding",
            "SELECT set_config('client_encoding', 'EUC_KR', false)",
            "SELECT set_config('client_encoding', NULL, false)",
            "ALTER ROLE r SET client_encoding = 'WIN1251'",
            "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings",
        ] {
            assert_eq!(refused_in(sql, &session), None, "{sql}");
        }
        for (sql, why) in [
            ("SET client_encoding = 'SJIS'", "can contain ASCII bytes"),
            (
                "SET client_encoding TO 'Shift_JIS'",
                "can contain ASCII bytes",
            ),
            ("SET NAMES 'big5'", "can contain ASCII bytes"),
            ("SET LOCAL client_encoding = gbk", "can contain ASCII bytes"),
            (
                "SELECT set_config('client_encoding', 'GB18030', false)",
                "can contain ASCII bytes",
            ),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'UHC' \
                 AS 'select 1'",
                "can contain ASCII bytes",
            ),
            (
                "SELECT set_config(name, 'JOHAB', false) FROM pg_settings",
                "can contain ASCII bytes",
            ),
            ("SET client_encoding = 'klingon'", "not an encoding name"),
            (
                "SELECT set_config('client_encoding', lower('SJIS'), false)",
                "must be a constant",
            ),
            (
                "SELECT set_config('client_encoding', $1, false)",
                "must be a constant",
            ),
        ] {
            let got = refused_in(sql, &session).unwrap_or_else(|| panic!("{sql}"));
            assert!(got.contains(why), "{sql}: {got}");
        }
    }

    #[test]
    fn names_outside_ascii_are_refused_once_an_encoding_other_than_utf8_was_used() {
        let sql = r#"SELECT * FROM "é" WHERE v = 'ü' -- ß"#;
        assert_eq!(refused_in(sql, &SessionSettings::default()), None);
        let latin1 = SessionSettings {
            non_utf8_encoding: Some(ClientEncoding::Latin1),
            ..SessionSettings::default()
        };
        let why = refused_in(sql, &latin1).unwrap();
        assert!(why.contains("client_encoding LATIN1"), "{why}");
        assert_eq!(
            refused_in("SELECT * FROM t WHERE v = 'ü' -- ß", &latin1),
            None
        );
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        let e = Policy::parse("permit(principal, action == PgIam::Action::\"selekt\", resource);")
            .err()
            .unwrap();
        assert!(e.contains("selekt"), "{e}");
        let e = Policy::parse("permit(principal, action, resource) when { principal.nope == 1 };")
            .err()
            .unwrap();
        assert!(e.contains("nope"), "{e}");
        assert!(Policy::parse("permit(principal, action, resource").is_err());
        assert!(Policy::parse("@id(\"a\") permit(principal, action, resource);\n@id(\"a\") permit(principal, action, resource);").is_err());
        assert_eq!(Policy::parse("").unwrap().len(), 0);
    }
}
