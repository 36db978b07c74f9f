//! How a statement becomes requests: the names it uses resolved as PostgreSQL would resolve
//! them ([`Resolver`]), every relation, function and session-level effect an [`Ask`], and the
//! overloads a call may run named from the catalog.

use std::collections::BTreeSet;

use super::{Action, Ask, Decision, Resource};
use crate::sql::{Access, QualifiedName, Statement};

/// The catalog's views of every setting: reading one is `show` of `*`.
const SETTINGS_VIEWS: &[&str] = &["pg_settings", "pg_file_settings"];

/// The catalog's functions that read settings: asked as `show` of what they read (the
/// classifier records it), not as `execute`, so that SHOW and current_setting() are one
/// authorization.
const SETTINGS_FUNCTIONS: &[&str] = &["current_setting", "pg_show_all_settings"];

/// Relations in pg_catalog of every PostgreSQL from 12 on (sorted): catalogs and system views
/// that no supported server lacks. Only names listed here are taken to resolve to pg_catalog
/// alone; a relation a newer server added (or an older one lacks) is still authorized in every
/// schema of the path as well, since on a server without it the path would be searched.
pub(super) const CATALOG_RELATIONS: &[&str] = &[
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
///
/// A value (Hash, Eq): sessions that start alike share one ([`internment::ArcIntern`]), and a
/// session that widens its own gets a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    pub(super) fn relation_schemas(&self, name: &QualifiedName) -> Vec<String> {
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
    pub(super) fn function_schemas(&self, name: &QualifiedName) -> Vec<String> {
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
