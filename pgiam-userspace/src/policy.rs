//! Who may do what: statements, as [`crate::sql`] classified them, decided by a Cedar policy.
//!
//! The schema below is fixed by pgiam; a policy file is validated against it (strict mode)
//! before it loads, so a typo in an action or attribute name is an error at load, never a
//! silent deny (or allow) at run time. A statement becomes one request per thing it does: per
//! relation and access, per function, and per session-level effect (role change, DO, COPY
//! PROGRAM, server files, SET). It is allowed only if every request is; the first denial names
//! the action and resource, and which policies decided it.
//!
//! Names resolve as PostgreSQL would against the search_path pgiam pins: a schema-qualified name
//! is itself; an unqualified one is authorized against every schema it could resolve to
//! (`pg_catalog` first for functions and `pg_*` relations, `pg_temp` once the session created a
//! temporary table, then the pinned path), so shadowing a name never widens access.

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
use crate::sql::{Access, QualifiedName, Statement};

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
    exe?: String,
  };
  entity Database;
  // Ids: "db.schema" for a schema, "db.schema.name" for a table or function.
  entity Schema in [Database] = { database: String, name: String };
  entity Table in [Schema] = { database: String, schema: String, name: String };
  entity Function in [Schema] = { database: String, schema: String, name: String };

  type Statement = {
    command: String,
    // SET, RESET and set_config(): the parameter; FunctionCall: the function's oid.
    parameter?: String,
    function_oid?: Long,
  };

  action connect appliesTo { principal: Principal, resource: Database, context: Statement };
  action select, insert, update, delete, truncate, copy_in, copy_out, lock, ddl
    appliesTo { principal: Principal, resource: [Table, Database], context: Statement };
  action execute appliesTo { principal: Principal, resource: Function, context: Statement };
  action set, set_role, listen, notify, "do", copy_program, server_files, function_call
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
}

impl Ask {
    pub fn on_database(action: Action, command: &'static str) -> Ask {
        Ask {
            action,
            resource: Resource::Database,
            command,
            parameter: None,
            function_oid: None,
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
/// their cached decisions.
pub struct PolicyStore {
    path: std::path::PathBuf,
    generation: std::sync::atomic::AtomicU64,
    current: std::sync::RwLock<std::sync::Arc<Policy>>,
    /// Tells idle sessions that the policy changed, so they can check they may still connect.
    changed: tokio::sync::watch::Sender<u64>,
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
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Replaces the policy in force (as a reload does).
    pub fn replace(&self, policy: Policy) {
        *self.current.write().expect("policy lock") = policy.into();
        let g = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.send_replace(g + 1);
    }

    /// Resolves each time the policy is replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
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
        let mut context = vec![(
            "command".to_owned(),
            RestrictedExpression::new_string(ask.command.to_owned()),
        )];
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

/// Decisions already made for one principal under one policy, so a statement seen before costs
/// a lookup instead of Cedar evaluations. Bounded; the caller drops it when the policy changes.
#[derive(Default)]
pub struct DecisionCache {
    decisions: HashMap<Ask, Decision>,
}

impl DecisionCache {
    const CAPACITY: usize = 4096;

    pub fn clear(&mut self) {
        self.decisions.clear();
    }

    /// [`Policy::decide_all`], remembering each ask's answer.
    pub fn decide_all(&mut self, policy: &Policy, principal: &Principal, asks: &[Ask]) -> Decision {
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
        type Key = (String, String, String, u32, u32, [Option<String>; 6]);
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
        (
            "exe",
            identity.exe.as_ref().map(|e| e.display().to_string()),
        ),
    ]
}

/// Refusals that no policy lifts: they would undo what pgiam guarantees about the session
/// (names resolve against the pinned search_path; in gateway mode, the session stays the
/// mapped role).
pub fn fixed_refusal(s: &Statement, gateway: bool) -> Option<Decision> {
    if s.parameters.contains("standard_conforming_strings") {
        // The server reports a change once it has run it: statements pipelined behind the
        // change would be split by pgiam with the old rules and by the server with the new.
        return Some(Decision::refuse(
            "set standard_conforming_strings",
            "standard_conforming_strings is fixed for the session: pgiam splits statements \
             with the value the session started with",
        ));
    }
    if s.unsafe_encoding {
        return Some(Decision::refuse(
            "set client_encoding",
            "client encodings whose characters can contain ASCII bytes (SJIS, BIG5, GBK, UHC, \
             GB18030, JOHAB) split statements differently on the server",
        ));
    }
    if s.parameters.contains("search_path") {
        return Some(Decision::refuse(
            "set search_path",
            "search_path is pinned by pgiam: names are authorized against it",
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

/// How unqualified names resolve in a session.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The pinned search_path, `$user` already replaced by the session's role.
    pub search_path: Vec<String>,
    /// The session created a temporary relation, so `pg_temp` is searched first.
    pub temp: bool,
}

impl Resolver {
    pub fn new(search_path: &[String], role: &str) -> Resolver {
        Resolver {
            search_path: search_path
                .iter()
                .map(|s| {
                    if s == "$user" {
                        role.to_owned()
                    } else {
                        s.clone()
                    }
                })
                .collect(),
            temp: false,
        }
    }

    /// Every schema `name` could be found in, as PostgreSQL searches.
    fn relation_schemas(&self, name: &QualifiedName) -> Vec<String> {
        if let Some(s) = &name.schema {
            return vec![s.clone()];
        }
        let mut out = Vec::new();
        if self.temp {
            out.push("pg_temp".to_owned());
        }
        // pg_catalog is searched before the path unless the path names it; every relation in
        // it is called pg_*.
        if name.name.starts_with("pg_") {
            out.push("pg_catalog".to_owned());
        }
        out.extend(self.search_path.iter().cloned());
        out.dedup();
        out
    }

    fn function_schemas(&self, name: &QualifiedName) -> Vec<String> {
        if let Some(s) = &name.schema {
            return vec![s.clone()];
        }
        let mut out = vec!["pg_catalog".to_owned()];
        out.extend(
            self.search_path
                .iter()
                .filter(|s| *s != "pg_catalog")
                .cloned(),
        );
        out
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
            })
        };
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
                push(
                    Action::Execute,
                    Resource::Function {
                        schema,
                        name: f.name.clone(),
                    },
                );
            }
        }
        let flags = [
            (statement.role_change, Action::SetRole),
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
        asks
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
        other.exe = Some("/usr/bin/other".into());
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
