//! The walk over one statement's parse tree that fills in its classification: the relations
//! it reads and writes (CTEs in scope told apart), the functions it calls, the settings it
//! sets and reads, what it prepares, and what outlives its transaction.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::*;

/// Types whose input looks a name up in a catalog table (`'t'::regclass`), and the table.
const NAME_LOOKUP_TYPES: &[(&str, &str)] = &[
    ("regclass", "pg_class"),
    ("regtype", "pg_type"),
    ("regproc", "pg_proc"),
    ("regprocedure", "pg_proc"),
    ("regoper", "pg_operator"),
    ("regoperator", "pg_operator"),
    ("regnamespace", "pg_namespace"),
    ("regrole", "pg_authid"),
    ("regcollation", "pg_collation"),
    ("regconfig", "pg_ts_config"),
    ("regdictionary", "pg_ts_dict"),
];

/// Built-in functions that answer from the catalog about an object the statement names by a
/// string or an OID (whether it exists, its definition, privileges, size, comment): the
/// catalog tables they read. (The sequence functions are relations of their own, above.)
const NAME_LOOKUP_FUNCTIONS: &[(&str, &[&str])] = &[
    ("to_regclass", &["pg_class"]),
    ("to_regtype", &["pg_type"]),
    ("to_regtypemod", &["pg_type"]),
    ("to_regproc", &["pg_proc"]),
    ("to_regprocedure", &["pg_proc"]),
    ("to_regoper", &["pg_operator"]),
    ("to_regoperator", &["pg_operator"]),
    ("to_regnamespace", &["pg_namespace"]),
    ("to_regrole", &["pg_authid"]),
    ("to_regcollation", &["pg_collation"]),
    ("has_table_privilege", &["pg_class"]),
    ("has_any_column_privilege", &["pg_class"]),
    ("has_column_privilege", &["pg_class", "pg_attribute"]),
    ("has_sequence_privilege", &["pg_class"]),
    ("has_function_privilege", &["pg_proc"]),
    ("has_schema_privilege", &["pg_namespace"]),
    ("has_database_privilege", &["pg_database"]),
    ("has_type_privilege", &["pg_type"]),
    ("has_tablespace_privilege", &["pg_tablespace"]),
    ("has_language_privilege", &["pg_language"]),
    (
        "has_foreign_data_wrapper_privilege",
        &["pg_foreign_data_wrapper"],
    ),
    ("has_server_privilege", &["pg_foreign_server"]),
    ("has_parameter_privilege", &["pg_parameter_acl"]),
    ("pg_has_role", &["pg_authid"]),
    ("pg_get_viewdef", &["pg_class", "pg_rewrite"]),
    ("pg_get_ruledef", &["pg_rewrite"]),
    ("pg_get_indexdef", &["pg_index"]),
    ("pg_get_constraintdef", &["pg_constraint"]),
    ("pg_get_triggerdef", &["pg_trigger"]),
    ("pg_get_functiondef", &["pg_proc"]),
    ("pg_get_function_arguments", &["pg_proc"]),
    ("pg_get_function_identity_arguments", &["pg_proc"]),
    ("pg_get_function_result", &["pg_proc"]),
    ("pg_get_serial_sequence", &["pg_class", "pg_depend"]),
    ("pg_get_statisticsobjdef", &["pg_statistic_ext"]),
    ("pg_get_partkeydef", &["pg_partitioned_table"]),
    ("pg_get_partition_constraintdef", &["pg_class"]),
    ("obj_description", &["pg_description"]),
    ("col_description", &["pg_description"]),
    ("shobj_description", &["pg_shdescription"]),
    ("pg_relation_size", &["pg_class"]),
    ("pg_table_size", &["pg_class"]),
    ("pg_indexes_size", &["pg_class"]),
    ("pg_total_relation_size", &["pg_class"]),
    ("pg_relation_filenode", &["pg_class"]),
    ("pg_relation_filepath", &["pg_class"]),
];

/// SubLinkType's ANY_SUBLINK (`x IN (SELECT …)`, `x op ANY (SELECT …)`) in the protobuf enum.
const ANY_SUBLINK: i64 = 3;

pub(super) struct Walker<'a> {
    pub(super) out: &'a mut Statement,
    /// CTE names visible at this point, innermost last.
    pub(super) scopes: Vec<BTreeSet<String>>,
    /// Where a SET at this point takes effect.
    pub(super) set_context: SetContext,
    /// `$n` at this point is the Bind message's parameter n.
    pub(super) bound_parameters: bool,
    /// The statement is the one-row pg_settings shape: the setting its `name` column holds.
    pub(super) settings_row: Option<String>,
    /// Inside a SELECT with a locking clause (FOR UPDATE, FOR SHARE, …): what it reads, it
    /// also locks. (Every relation of that SELECT, sub-queries included, whatever `OF` names:
    /// more than the server locks, never less.)
    pub(super) locking: bool,
    /// The `'s'::regclass` casts that name a built-in sequence function's sequence (by their
    /// node's address, only compared): the sequence is asked for itself, not as a lookup.
    pub(super) sequence_names: Vec<*const Value>,
}

impl Walker<'_> {
    fn is_cte(&self, name: &QualifiedName) -> bool {
        name.schema.is_none() && self.scopes.iter().any(|s| s.contains(&name.name))
    }

    fn relation(&mut self, m: &Map<String, Value>, access: Access) {
        self.note_temp(m);
        let name = name_of(m);
        if access == Access::Select && self.is_cte(&name) {
            return;
        }
        if access == Access::Select && self.locking {
            self.out.relations.insert(Relation {
                name: name.clone(),
                access: Access::Lock,
            });
        }
        self.out.relations.insert(Relation { name, access });
    }

    fn note_temp(&mut self, m: &Map<String, Value>) {
        if m.get("relpersistence").and_then(Value::as_str) == Some("t")
            || m.get("schemaname").and_then(Value::as_str) == Some("pg_temp")
        {
            self.out.temp = true;
            self.out.session_state = true;
        }
    }

    /// A bare RangeVar field that is a statement's target.
    fn target(&mut self, body: &Value, field: &str, access: Access) {
        if let Some(m) = body.get(field).and_then(Value::as_object) {
            if is_range_var(m) {
                self.note_temp(m);
                // A target always names a table: CTEs cannot be written to.
                self.out.relations.insert(Relation {
                    name: name_of(m),
                    access,
                });
                // Its alias and the like hold nothing more to find.
            }
        }
    }

    fn visit(&mut self, v: &Value, access: Access) {
        match v {
            Value::Array(items) => {
                for i in items {
                    self.visit(i, access);
                }
            }
            Value::Object(m) => {
                if let Some((node, body)) = tagged(v) {
                    return self.visit_node(node, body, access);
                }
                if is_range_var(m) {
                    return self.relation(m, access);
                }
                if is_func_call(m) {
                    self.func_call(m);
                }
                for (k, child) in m {
                    match k.as_str() {
                        // SELECT … INTO t, CREATE TABLE t AS: t is created.
                        "into_clause" | "into" => {
                            self.target(child, "rel", Access::Create);
                            self.visit_except(child, &["rel"], access);
                        }
                        // ALTER ROLE/DATABASE/SYSTEM … SET: a VariableSetStmt held as a bare
                        // field, not as a Node (a role's default role or search_path).
                        "setstmt" if child.is_object() => {
                            self.visit_node("VariableSetStmt", child, access)
                        }
                        _ => self.visit(child, access),
                    }
                }
            }
            _ => {}
        }
    }

    /// Visits an object's fields except `skip`.
    fn visit_except(&mut self, body: &Value, skip: &[&str], access: Access) {
        if let Some(m) = body.as_object() {
            for (k, child) in m {
                if !skip.contains(&k.as_str()) {
                    match k.as_str() {
                        "into_clause" | "into" => {
                            self.target(child, "rel", Access::Create);
                            self.visit_except(child, &["rel"], access);
                        }
                        _ => self.visit(child, access),
                    }
                }
            }
        }
    }

    pub(super) fn visit_node(&mut self, node: &str, body: &Value, access: Access) {
        let outer = (self.set_context, self.bound_parameters);
        match node {
            "AlterSystemStmt" => self.set_context = SetContext::System,
            "AlterRoleSetStmt"
            | "AlterDatabaseSetStmt"
            | "CreateFunctionStmt"
            | "AlterFunctionStmt" => self.set_context = SetContext::Stored,
            _ => {}
        }
        if node.ends_with("Stmt") && !BOUND_PARAMETER_STATEMENTS.contains(&node) {
            self.bound_parameters = false;
        }
        self.visit_node_in_context(node, body, access);
        (self.set_context, self.bound_parameters) = outer;
    }

    fn visit_node_in_context(&mut self, node: &str, body: &Value, access: Access) {
        if self.set_context == SetContext::Session
            && session_state::node_outlives_transaction(node, body)
        {
            self.out.session_state = true;
        }
        // Statements with a WITH clause: its CTEs are in scope for the rest of the statement.
        let pushed = self.with_clause(body);
        match node {
            "SelectStmt" => {
                let outer = self.locking;
                self.locking |= has_key(body, "locking_clause");
                // `FOR UPDATE OF a` names what FROM already has (often by its alias): nothing
                // to read there, and everything read is locked anyway.
                self.visit_except(body, &["with_clause", "locking_clause"], Access::Select);
                self.locking = outer;
            }
            "VariableShowStmt" => {
                if let Some(name) = body.get("name").and_then(Value::as_str) {
                    let name = name.to_ascii_lowercase();
                    self.out
                        .shows
                        .insert(if name == "all" { "*".into() } else { name });
                }
            }
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                let write = match node {
                    "InsertStmt" => Access::Insert,
                    "UpdateStmt" => Access::Update,
                    "DeleteStmt" => Access::Delete,
                    _ => Access::Merge,
                };
                self.target(body, "relation", write);
                self.visit_except(body, &["relation", "with_clause"], Access::Select);
            }
            "CopyStmt" => {
                let from = body
                    .get("is_from")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.target(
                    body,
                    "relation",
                    if from {
                        Access::CopyIn
                    } else {
                        Access::CopyOut
                    },
                );
                if body.get("is_program").and_then(Value::as_bool) == Some(true) {
                    self.out.copy_program = true;
                } else if body
                    .get("filename")
                    .and_then(Value::as_str)
                    .is_some_and(|f| !f.is_empty())
                {
                    self.out.server_files = true;
                }
                self.visit_except(body, &["relation"], Access::Select);
            }
            "TruncateStmt" => self.visit(body, Access::Truncate),
            "DoStmt" => {
                self.out.do_block = true;
                self.visit(body, access);
            }
            "VariableSetStmt" => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or("");
                // RESET ALL leaves role and session_authorization alone (GUC_NO_RESET_ALL), so
                // it changes no identity. VAR_RESET_ALL is 6 in the protobuf enum.
                let name = name.to_ascii_lowercase();
                if ROLE_SETTINGS.contains(&name.as_str()) {
                    self.out.role_change = true;
                }
                // VariableSetKind: VAR_SET_VALUE 1, VAR_SET_DEFAULT 2, VAR_SET_CURRENT 3,
                // VAR_RESET 5, VAR_RESET_ALL 6.
                let kind = body.get("kind").and_then(Value::as_i64).unwrap_or(0);
                let followed = name == "client_encoding" || name == "standard_conforming_strings";
                if followed || (name.is_empty() && kind == 6) {
                    let values = match kind {
                        2 | 5 | 6 => vec![SettingValue::Default],
                        3 => vec![SettingValue::Current],
                        1 => body
                            .get("args")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .map(|a| self.set_value(&name, a))
                            .collect(),
                        _ => vec![SettingValue::Unknown],
                    };
                    if name != "standard_conforming_strings" {
                        self.out.client_encoding.extend(values.iter().cloned());
                    }
                    if name != "client_encoding" {
                        self.out.standard_conforming_strings.extend(values);
                    }
                }
                if name == "search_path" {
                    // RESET, SET … TO DEFAULT and FROM CURRENT have no arguments: they name
                    // nothing new.
                    let args = body.get("args").and_then(Value::as_array);
                    for a in args.into_iter().flatten() {
                        match set_argument_schema(a) {
                            Some(schema) => {
                                self.out.search_path.insert(schema);
                            }
                            None => self.out.search_path_unknown = true,
                        }
                    }
                }
                if !name.is_empty() {
                    self.out.parameters.insert(name);
                }
                self.visit(body, access);
            }
            // DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT. DISCARD_ALL is 1 in the
            // protobuf enum (after UNDEFINED).
            "DiscardStmt" => {
                if body.get("target").and_then(Value::as_i64) == Some(1) {
                    self.out.role_change = true;
                    // It runs RESET ALL.
                    self.out.client_encoding.push(SettingValue::Default);
                    self.out
                        .standard_conforming_strings
                        .push(SettingValue::Default);
                }
            }
            "PrepareStmt" => {
                self.out.prepares = body.get("name").and_then(Value::as_str).map(str::to_owned);
                self.visit(body, Access::Select);
            }
            "DeallocateStmt" => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or("");
                let all = body.get("isall").and_then(Value::as_bool) == Some(true);
                self.out.deallocates = Some(if all { "" } else { name }.to_owned());
            }
            "ExecuteStmt" => {
                self.out.executes = body.get("name").and_then(Value::as_str).map(str::to_owned);
                self.visit(body, access);
            }
            "ViewStmt" => {
                self.target(body, "view", Access::Ddl);
                self.visit_except(body, &["view"], Access::Select);
            }
            // The statement inside runs (or is planned) as itself.
            "ExplainStmt" | "DeclareCursorStmt" | "CreateTableAsStmt" => {
                self.visit(body, Access::Select)
            }
            "RangeVar" => {
                if let Some(m) = body.as_object() {
                    self.relation(m, access);
                }
            }
            "AExpr" => {
                self.operator_expression(body);
                self.visit(body, access);
            }
            // `x op ANY (SELECT …)`, `x IN (SELECT …)` (its operator is `=`).
            "SubLink" => {
                match body.get("oper_name").and_then(Value::as_array) {
                    Some(name) if !name.is_empty() => self.operator(name),
                    _ if body.get("sub_link_type").and_then(Value::as_i64) == Some(ANY_SUBLINK) => {
                        self.implied_operators(&["="])
                    }
                    _ => {}
                }
                self.visit(body, access);
            }
            // `ORDER BY x USING op`.
            "SortBy" => {
                if let Some(name) = body.get("use_op").and_then(Value::as_array) {
                    self.operator(name);
                }
                self.visit(body, access);
            }
            // `CASE x WHEN v …` compares with `=`.
            "CaseExpr" => {
                if body.get("arg").is_some_and(|a| !a.is_null()) {
                    self.implied_operators(&["="]);
                }
                self.visit(body, access);
            }
            "TypeCast" => {
                let names = body
                    .get("type_name")
                    .and_then(|t| t.get("names"))
                    .and_then(Value::as_array);
                if let Some(last) = names.and_then(|n| n.last()).and_then(string_of) {
                    // `'t'::regclass` looks a name up in the catalog: a read of it.
                    let sequence = self.sequence_names.contains(&(body as *const Value));
                    match NAME_LOOKUP_TYPES.iter().find(|(t, _)| *t == last) {
                        Some((_, table)) if !sequence => self.catalog_read(table),
                        _ => {}
                    }
                    self.out.casts.insert(last.to_owned());
                }
                self.visit(body, access);
            }
            _ => self.visit(body, access),
        }
        if pushed {
            self.scopes.pop();
        }
    }

    /// Visits the CTEs of `body`'s WITH clause with the scoping PostgreSQL applies, and leaves
    /// all their names in scope (the caller pops) for the rest of the statement.
    fn with_clause(&mut self, body: &Value) -> bool {
        let Some(with) = body.get("with_clause").filter(|w| !w.is_null()) else {
            return false;
        };
        let recursive = with.get("recursive").and_then(Value::as_bool) == Some(true);
        let ctes: Vec<(String, &Value)> = with
            .get("ctes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let (_, cte) = tagged(c.get("node").unwrap_or(c))?;
                let name = cte.get("ctename")?.as_str()?.to_owned();
                Some((name, cte))
            })
            .collect();
        let all: BTreeSet<String> = ctes.iter().map(|(n, _)| n.clone()).collect();
        for (i, (_, cte)) in ctes.iter().enumerate() {
            // Without RECURSIVE a CTE sees only the CTEs before it: inside its own body its
            // own name is the *table* of that name (WITH secret AS (SELECT * FROM secret)).
            let visible = if recursive {
                all.clone()
            } else {
                ctes[..i].iter().map(|(n, _)| n.clone()).collect()
            };
            self.scopes.push(visible);
            if let Some(q) = cte.get("ctequery") {
                self.visit(q, Access::Select);
            }
            self.scopes.pop();
        }
        self.scopes.push(all);
        true
    }

    /// A constant argument of `SET name`, where it takes effect.
    fn set_value(&self, name: &str, arg: &Value) -> SettingValue {
        match (set_argument_text(arg), self.set_context) {
            (None, _) => SettingValue::Unknown,
            (Some(_), SetContext::System) if name != "client_encoding" => SettingValue::Unknown,
            (Some(v), SetContext::Session) => SettingValue::Value(v),
            (Some(v), _) => SettingValue::Stored(v),
        }
    }

    /// set_config()'s value argument.
    fn set_config_value(&self, arg: Option<&Value>) -> SettingValue {
        let Some(arg) = arg else {
            return SettingValue::Unknown;
        };
        if null_constant(arg) {
            return SettingValue::Default;
        }
        if let Some(v) = string_constant(arg) {
            return SettingValue::Value(v.to_owned());
        }
        match param_ref(arg) {
            Some(n) if self.bound_parameters => SettingValue::Parameter(n),
            _ => SettingValue::Unknown,
        }
    }

    /// An operator named by a list of String nodes (`["="]`, `["s", "==="]`).
    fn operator(&mut self, name: &[Value]) {
        let parts: Vec<&str> = name.iter().filter_map(string_of).collect();
        if let Some((&op, schema)) = parts.split_last() {
            self.out.operators.insert(QualifiedName {
                schema: schema.last().map(|s| (*s).to_owned()),
                name: op.to_owned(),
            });
        }
    }

    /// A read of the catalog table that answers a lookup by name (or OID) the statement
    /// makes through a cast or a function: asked as `select` on it, as reading the table
    /// itself would be.
    fn catalog_read(&mut self, table: &str) {
        self.out.relations.insert(Relation {
            name: QualifiedName {
                schema: Some("pg_catalog".into()),
                name: table.to_owned(),
            },
            access: Access::Select,
        });
    }

    fn implied_operators(&mut self, ops: &[&str]) {
        for op in ops {
            self.out.operators.insert(QualifiedName {
                schema: None,
                name: (*op).to_owned(),
            });
        }
    }

    /// An A_Expr's operator: the one it names, or for BETWEEN the comparisons it stands for.
    fn operator_expression(&mut self, body: &Value) {
        let Some(name) = body.get("name").and_then(Value::as_array) else {
            return;
        };
        // A_Expr_Kind: AEXPR_BETWEEN 11 … AEXPR_NOT_BETWEEN_SYM 14 carry the keyword as name.
        match body.get("kind").and_then(Value::as_i64) {
            Some(11..=14) => self.implied_operators(&["<", "<=", ">", ">="]),
            _ => self.operator(name),
        }
    }

    fn func_call(&mut self, m: &Map<String, Value>) {
        let parts: Vec<&str> = m
            .get("funcname")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(string_of)
            .collect();
        let Some((&name, schema)) = parts.split_last() else {
            return;
        };
        let lower = name.to_ascii_lowercase();
        let builtin = schema.is_empty() || schema == ["pg_catalog"];
        let args = m
            .get("args")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        if session_state::call_outlives_transaction(&lower, builtin, args) {
            self.out.session_state = true;
        }
        if builtin {
            if let Some((_, tables)) = NAME_LOOKUP_FUNCTIONS.iter().find(|(f, _)| *f == lower) {
                for table in *tables {
                    self.catalog_read(table);
                }
            }
        }
        if FILE_FUNCTIONS.contains(&lower.as_str()) {
            self.out.server_files = true;
        }
        if DYNAMIC_SQL_FUNCTIONS.contains(&lower.as_str()) {
            self.out.do_block = true;
        }
        // The built-in sequence functions (the name resolves to pg_catalog's first): the
        // sequence is a relation the statement touches, as if the query named it. One the
        // parse tree cannot name is decided at run time, as dynamic SQL is.
        if let Some((_, access)) = SEQUENCE_FUNCTIONS
            .iter()
            .find(|(n, _)| builtin && *n == lower)
        {
            let first = m
                .get("args")
                .and_then(Value::as_array)
                .and_then(|a| a.first());
            match first.and_then(relation_named_by) {
                Some(name) => {
                    let node = first.map(|f| f.get("node").unwrap_or(f));
                    if let Some((_, cast)) = node.and_then(tagged).filter(|(n, _)| *n == "TypeCast")
                    {
                        self.sequence_names.push(cast as *const Value);
                    }
                    self.out.relations.insert(Relation {
                        name,
                        access: *access,
                    });
                }
                None => self.out.do_block = true,
            }
        }
        if lower == "current_setting" {
            let first = m
                .get("args")
                .and_then(Value::as_array)
                .and_then(|a| a.first());
            let name = first.and_then(string_constant).map(str::to_ascii_lowercase);
            self.out.shows.insert(name.unwrap_or_else(|| "*".into()));
        }
        if lower == "pg_show_all_settings" {
            self.out.shows.insert("*".into());
        }
        if lower == "set_config" {
            // set_config('role', …) changes the role; a name that is not a constant might.
            let first = m
                .get("args")
                .and_then(Value::as_array)
                .and_then(|a| a.first());
            let args = m.get("args").and_then(Value::as_array);
            let constant = first.and_then(string_constant).map(str::to_ascii_lowercase);
            // pg_dump's one-row pg_settings shape: the `name` column is that row's constant.
            let constant = match (constant, &self.settings_row) {
                (None, Some(setting)) if first.is_some_and(is_name_column) => {
                    self.out.setting_from_pg_settings = true;
                    Some(setting.clone())
                }
                (constant, _) => constant,
            };
            match constant {
                Some(setting) if !ROLE_SETTINGS.contains(&setting.as_str()) => {
                    if setting == "client_encoding" {
                        let v = self.set_config_value(args.and_then(|a| a.get(1)));
                        self.out.client_encoding.push(v);
                    }
                    if setting == "standard_conforming_strings" {
                        let v = self.set_config_value(args.and_then(|a| a.get(1)));
                        self.out.standard_conforming_strings.push(v);
                    }
                    if setting == "search_path" {
                        match args.and_then(|a| a.get(1)) {
                            // NULL: back to the value the session started with.
                            Some(v) if null_constant(v) => {}
                            Some(v) => match string_constant(v).and_then(parse_search_path) {
                                Some(names) => self.out.search_path.extend(names),
                                None => self.out.search_path_unknown = true,
                            },
                            None => self.out.search_path_unknown = true,
                        }
                    }
                    self.out.parameters.insert(setting);
                }
                Some(_) => self.out.role_change = true,
                // A setting that is not a constant might be role, or search_path (pg_dump:
                // `SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings
                // WHERE name = …`). As search_path, a constant value is what the path becomes
                // if the server accepts it (and nothing changes if it does not).
                None => {
                    self.out.role_change = true;
                    // Or client_encoding, or standard_conforming_strings.
                    let maybe = match self.set_config_value(args.and_then(|a| a.get(1))) {
                        SettingValue::Value(v) => SettingValue::IfThisSetting(v),
                        other => other,
                    };
                    self.out.client_encoding.push(maybe.clone());
                    self.out.standard_conforming_strings.push(maybe);
                    match args.and_then(|a| a.get(1)) {
                        Some(v) if null_constant(v) => {}
                        Some(v) => match string_constant(v) {
                            Some(text) => match parse_search_path(text) {
                                Some(names) => self.out.search_path.extend(names),
                                // Rejected as a search_path, unless pgiam is unsure.
                                None => {
                                    if text.contains('\u{b}') {
                                        self.out.search_path_unknown = true;
                                    }
                                }
                            },
                            None => self.out.search_path_unknown = true,
                        },
                        None => self.out.search_path_unknown = true,
                    }
                }
            }
        }
        let called = QualifiedName {
            schema: schema.last().map(|s| s.to_string()),
            name: name.to_owned(),
        };
        self.out
            .function_arities
            .entry(called.clone())
            .or_default()
            .insert(args.len());
        self.out.functions.insert(called);
    }
}
