//! What a statement does, read with PostgreSQL's own parser (libpg_query), never with regexes:
//! a parser that disagreed with the server would be a bypass.
//!
//! The parse tree is walked in full through its serde form. prost serializes every field, so a
//! relation reference is recognised by its shape (`relname` + `relpersistence`) wherever it sits
//! — inside a Node or as a bare field (an INSERT target, `INTO`, a foreign key's referenced
//! table, …). Nothing is reached through per-statement helpers that could miss a case: every
//! RangeVar in the tree becomes a relation access unless it names a CTE in scope.

use std::collections::{BTreeMap, BTreeSet};

mod cache;
mod encoding;
mod position;
mod session_state;
mod walk;

#[cfg(test)]
use cache::shape;
pub use cache::{classify_cached, SHAPE_HITS};
use walk::Walker;

pub use encoding::ClientEncoding;

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SqlError {
    #[error("syntax error: {message}")]
    Syntax {
        message: String,
        /// Where the parser stopped: 1-based, in characters, as PostgreSQL reports it.
        position: Option<u32>,
    },
    /// The text is not valid in the client's encoding (the server would refuse it too).
    #[error("{0}")]
    Encoding(String),
}

/// How a statement touches a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Select,
    Insert,
    Update,
    Delete,
    /// MERGE's target: insert, update and delete are all possible.
    Merge,
    Truncate,
    CopyIn,
    CopyOut,
    /// Created by SELECT INTO or CREATE TABLE AS.
    Create,
    Lock,
    /// Named by any other utility statement (CREATE/ALTER/DROP/GRANT/VACUUM …).
    Ddl,
}

/// A name as the parser folded it: unquoted identifiers lower-cased and truncated to 63 bytes,
/// quoted ones kept. `schema: None` is resolved against the session's search_path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct QualifiedName {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Relation {
    #[serde(flatten)]
    pub name: QualifiedName,
    pub access: Access,
}

/// One statement of a query string, with everything nested in it (subqueries, CTEs, the
/// statement inside EXPLAIN, PREPARE, DECLARE CURSOR, CREATE TABLE AS, COPY (query)).
///
/// Serialized (audit records, `pgiam sql classify`) with each fact once: a flag only when it
/// is true, a list or set only when it is not empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Statement {
    /// The command, e.g. `select`, `insert`, `copy`, `set`, `ddl`.
    pub command: &'static str,
    /// PostgreSQL's node type, e.g. `SelectStmt`.
    pub node: String,
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub relations: BTreeSet<Relation>,
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub functions: BTreeSet<QualifiedName>,
    /// How many arguments each function is called with (one count per distinct call shape):
    /// which of a user-defined function's overloads a call may run.
    #[serde(skip)]
    pub function_arities: BTreeMap<QualifiedName, BTreeSet<usize>>,
    /// Operators the statement names, as written (`a === b`, `OPERATOR(s.===)`) or as its
    /// syntax spells them (LIKE's `~~`, IN's `=`, BETWEEN's comparisons, `ORDER BY … USING`):
    /// which functions they run is the server's catalog's to say (see `catalog`). Not in
    /// records: the functions they lead to are what is decided.
    #[serde(skip)]
    pub operators: BTreeSet<QualifiedName>,
    /// Types the statement casts to (`x::t`, `CAST(x AS t)`, `t 'literal'`), by their last
    /// name: a user-defined cast into one runs its function.
    #[serde(skip)]
    pub casts: BTreeSet<String>,
    /// EXECUTE of a prepared statement: its classification is the one stored at PREPARE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executes: Option<String>,
    /// PREPARE: the name it creates (one namespace with the protocol's statements).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepares: Option<String>,
    /// DEALLOCATE: the name it removes; `Some("")` for DEALLOCATE ALL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deallocates: Option<String>,
    /// SET/RESET ROLE, SET SESSION AUTHORIZATION, DISCARD ALL, set_config('role'|…)
    /// or set_config() of a setting that is not a constant.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub role_change: bool,
    /// Settings changed by SET, RESET or set_config(), lower-cased.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub parameters: BTreeSet<String>,
    /// Settings read by SHOW or current_setting(), lower-cased; `*` for every setting (SHOW
    /// ALL, pg_show_all_settings(), a current_setting() whose name is not a constant). Reads
    /// of the pg_settings views are the policy's to see (it knows where names resolve).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub shows: BTreeSet<String>,
    /// Every schema named by a search_path value the statement sets anywhere in it (SET, SET
    /// LOCAL, SET SCHEMA, set_config() with a constant, a function's SET clause, ALTER
    /// ROLE/DATABASE/SYSTEM … SET), as the server will read the names; `$user` and `pg_temp`
    /// as written. RESET, SET … TO DEFAULT and set_config(…, NULL, …) name none: they go back
    /// to the value the session started with.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub search_path: BTreeSet<String>,
    /// Sets search_path to a value pgiam cannot read when it decides: not a constant (a bound
    /// parameter, an expression), a list PostgreSQL would read differently or not at all, or a
    /// set_config() whose setting name is not a constant.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub search_path_unknown: bool,
    /// The setting set_config() changes is the `name` column of the one pg_settings row the
    /// WHERE clause names (pg_dump 15.8+: `SELECT set_config(name, 'view, foreign-table',
    /// false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'`): read as that
    /// constant, which holds only if `pg_settings` is the catalog's view (the policy checks how
    /// the name resolves, and asks for `set_role` otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub setting_from_pg_settings: bool,
    /// Names a temporary relation (CREATE TEMP …, pg_temp.x): from then on unqualified names
    /// may resolve to pg_temp.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub temp: bool,
    /// Leaves state in the session that outlives its transaction, as far as the statement
    /// itself says: a temporary relation, SET or RESET (not LOCAL), LISTEN, PREPARE, LOAD,
    /// DECLARE … WITH HOLD, a session advisory lock, set_config() not provably local.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub session_state: bool,
    /// Every value the statement gives client_encoding anywhere in it (SET, SET LOCAL, SET
    /// NAMES, RESET, RESET ALL, DISCARD ALL, set_config(), a function's SET clause, ALTER
    /// ROLE/DATABASE/SYSTEM … SET), in order: the session follows which encodings its
    /// statements may be read in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_encoding: Vec<SettingValue>,
    /// The same for standard_conforming_strings, which changes where strings, and so
    /// statements, end: a session may only set it to the value it is fixed at.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub standard_conforming_strings: Vec<SettingValue>,
    /// A DO block, or a function that runs SQL given as text (query_to_xml, dblink, …).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub do_block: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub copy_program: bool,
    /// COPY to or from a server file, or a server file function.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub server_files: bool,
    /// What running it can change: decides whether its audit record must be on disk before
    /// the server sees it, or only before the client sees the answer.
    #[serde(skip)]
    pub effect: Effect,
}

/// A value a statement gives a setting whose value decides how pgiam must read statements
/// (client_encoding, standard_conforming_strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingValue {
    /// This value, for the session (SET, SET LOCAL, set_config()), as the server reads it.
    Value(String),
    /// This value, kept for later rather than set for the session now: a function's SET
    /// clause (in force during its calls), ALTER ROLE/DATABASE/SYSTEM … SET (later logins).
    Stored(String),
    /// Back to the value the session logged in with: RESET, SET … TO DEFAULT, RESET ALL,
    /// DISCARD ALL, set_config(…, NULL, …).
    Default,
    /// The value in force (a function's SET … FROM CURRENT).
    Current,
    /// set_config()'s value is the statement's bound parameter `$n`: read at Bind.
    Parameter(u32),
    /// set_config() of a setting named by an expression: this value, if the setting is this
    /// one (the server rejects it otherwise, if it is not a value of the setting).
    IfThisSetting(String),
    /// Anything pgiam cannot read when it decides: an expression, a parameter whose number
    /// means something else (inside PREPARE or a function body), ALTER SYSTEM's
    /// standard_conforming_strings (which a reload hands to other sessions).
    Unknown,
}

/// Reads a boolean setting as PostgreSQL's `parse_bool` does: true/false/yes/no/on/off/1/0 or
/// a prefix that is unique (`t`, `of`, not `o`), any case, nothing around it. `None`: the
/// server rejects the value.
pub fn parse_bool(value: &str) -> Option<bool> {
    let prefix = |word: &str, min: usize| {
        value.len() >= min
            && value.len() <= word.len()
            && word.as_bytes()[..value.len()].eq_ignore_ascii_case(value.as_bytes())
    };
    match value.as_bytes().first()?.to_ascii_lowercase() {
        b't' if prefix("true", 1) => Some(true),
        b'f' if prefix("false", 1) => Some(false),
        b'y' if prefix("yes", 1) => Some(true),
        b'n' if prefix("no", 1) => Some(false),
        b'o' if prefix("on", 2) => Some(true),
        b'o' if prefix("off", 2) => Some(false),
        b'1' if value.len() == 1 => Some(true),
        b'0' if value.len() == 1 => Some(false),
        _ => None,
    }
}

/// What running a statement can change in the database, ordered from least to most.
///
/// Only what the statement's own text shows is known: a view, a row-level security policy, a
/// column default or a trigger can call functions the statement does not name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effect {
    /// Nothing: it reads tables (no locking clause) and calls no function, or it is SHOW or
    /// BEGIN. What it can do is answer the client.
    None,
    /// Rows of tables, and no function called: inside a transaction block that is undone
    /// unless the block commits.
    Transactional,
    /// COMMIT (or END): makes permanent what the block's statements changed, and changes
    /// nothing of its own.
    Commits,
    /// Anything else, or not known.
    #[default]
    Immediate,
}

/// Functions that read or write the server's files.
const FILE_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "lo_import",
    "lo_export",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
];

/// Functions that name the sequence they act on by their first argument (regclass, usually a
/// string), and the access PostgreSQL asks of it (UPDATE or USAGE to advance or set it,
/// SELECT or USAGE to read it).
const SEQUENCE_FUNCTIONS: &[(&str, Access)] = &[
    ("nextval", Access::Update),
    ("setval", Access::Update),
    ("currval", Access::Select),
    ("pg_sequence_last_value", Access::Select),
];

/// Functions that run SQL given as text (or read a whole table or schema named by a value),
/// which pgiam cannot classify: treated like a DO block.
const DYNAMIC_SQL_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_send_query",
];

/// Does `value` (a client_encoding setting) name an encoding whose multibyte characters can
/// contain ASCII bytes (SJIS, BIG5, GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004, or an alias)?
/// PostgreSQL compares encoding names ignoring case and punctuation.
pub fn is_unsafe_encoding(value: &str) -> bool {
    ClientEncoding::from_name(value).is_some_and(|e| !e.is_ascii_safe())
}

/// The number of a bare `$n` argument.
fn param_ref(arg: &Value) -> Option<u32> {
    let n = arg
        .get("node")
        .unwrap_or(arg)
        .get("ParamRef")?
        .get("number")?
        .as_u64()?;
    u32::try_from(n).ok()
}

/// The text of a constant argument of SET as the server's `flatten_set_variable_args` gives
/// it to the setting: a string as it is, a number as written.
fn set_argument_text(arg: &Value) -> Option<String> {
    if let Some(s) = string_constant(arg) {
        return Some(s.to_owned());
    }
    let val = arg.get("node").unwrap_or(arg).get("AConst")?.get("val")?;
    if let Some(i) = val.get("Ival") {
        return Some(
            i.get("ival")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .to_string(),
        );
    }
    Some(val.get("Fval")?.get("fval")?.as_str()?.to_owned())
}

/// The string constant of an argument node, if it is one.
fn string_constant(arg: &Value) -> Option<&str> {
    let a = arg.get("node").unwrap_or(arg);
    a.get("AConst")?
        .get("val")?
        .get("Sval")?
        .get("sval")?
        .as_str()
}

/// Settings that change who the session acts as.
const ROLE_SETTINGS: &[&str] = &["role", "session_authorization"];

/// PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;

/// Cuts an identifier to [`MAX_IDENTIFIER`] bytes on a character boundary, as
/// `truncate_identifier` does in a UTF-8 database.
fn truncate_identifier(mut name: String) -> String {
    if name.len() > MAX_IDENTIFIER {
        let mut end = MAX_IDENTIFIER;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// Reads a search_path value (a startup parameter, `-c search_path=` in `options`,
/// set_config()'s value) as the server's `SplitIdentifierString` does: names separated by
/// commas, whitespace around them ignored, a double-quoted name kept as written (`""` inside
/// it is one quote), an unquoted one lower-cased (ASCII, as in a UTF-8 database), each cut to
/// 63 bytes. An empty value names nothing. `None`: the server rejects the value, or might read
/// it differently from pgiam (a vertical tab is whitespace to PostgreSQL 16 and later only).
pub fn parse_search_path(value: &str) -> Option<Vec<String>> {
    split_identifiers(value, ',')
}

/// A list of names separated by `separator`, read as the server's `SplitIdentifierString`
/// reads it (see [`parse_search_path`]): `,` for search_path, `.` for a qualified name given as
/// text (regclass input).
fn split_identifiers(value: &str, separator: char) -> Option<Vec<String>> {
    if value.contains('\u{b}') {
        return None;
    }
    // scanner_isspace
    let space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\u{c}');
    let mut names = Vec::new();
    let mut rest = value.trim_start_matches(space);
    if rest.is_empty() {
        return Some(names);
    }
    loop {
        let name = if let Some(quoted) = rest.strip_prefix('"') {
            let mut name = String::new();
            let mut chars = quoted.char_indices();
            loop {
                match chars.next() {
                    None => return None,
                    Some((i, '"')) if quoted[i + 1..].starts_with('"') => {
                        name.push('"');
                        chars.next();
                    }
                    Some((i, '"')) => {
                        rest = &quoted[i + 1..];
                        break;
                    }
                    Some((_, c)) => name.push(c),
                }
            }
            name
        } else {
            let end = rest
                .find(|c: char| c == separator || space(c))
                .unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            let name = rest[..end].to_ascii_lowercase();
            rest = &rest[end..];
            name
        };
        names.push(truncate_identifier(name));
        rest = rest.trim_start_matches(space);
        match rest.strip_prefix(separator) {
            Some(more) => rest = more.trim_start_matches(space),
            None if rest.is_empty() => return Some(names),
            None => return None,
        }
    }
}

/// The schema one argument of `SET search_path` names, as the server reads it: a string or
/// an identifier is the name itself (the server quotes it as an identifier and reads it back);
/// a number is its text, read as an unquoted name. `None`: anything else.
fn set_argument_schema(arg: &Value) -> Option<String> {
    if let Some(s) = string_constant(arg) {
        return Some(truncate_identifier(s.to_owned()));
    }
    let val = arg.get("node").unwrap_or(arg).get("AConst")?.get("val")?;
    let text = if let Some(i) = val.get("Ival") {
        i.get("ival")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .to_string()
    } else {
        val.get("Fval")?.get("fval")?.as_str()?.to_owned()
    };
    let mut names = parse_search_path(&text)?;
    (names.len() == 1).then(|| names.remove(0))
}

/// The relation a regclass argument names: a string constant (cast or not) read as regclass
/// input reads it. `None` for anything the parse tree cannot resolve: a computed name, a
/// parameter, an OID (all digits), a name with a database part.
fn relation_named_by(arg: &Value) -> Option<QualifiedName> {
    let node = arg.get("node").unwrap_or(arg);
    let text = match node.get("TypeCast") {
        Some(cast) => string_constant(cast.get("arg")?)?,
        None => string_constant(arg)?,
    };
    let mut parts = split_identifiers(text, '.')?;
    let name = parts.pop()?;
    if parts.len() > 1 || name.is_empty() || name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(QualifiedName {
        schema: parts.pop(),
        name,
    })
}

/// Is this argument SQL NULL?
fn null_constant(arg: &Value) -> bool {
    arg.get("node")
        .unwrap_or(arg)
        .get("AConst")
        .and_then(|c| c.get("isnull"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// Splits and classifies a query string. `standard_conforming_strings` must be the server's
/// current value: it changes where string literals end, and so where statements end.
pub fn classify(sql: &str, standard_conforming_strings: bool) -> Result<Vec<Statement>, SqlError> {
    // On pgiam's runtime threads (their stacks are CLASSIFY_STACK and more) this runs in
    // place; elsewhere (the CLI, tests) on a stack of its own, allocated for the call.
    let classified = stacker::maybe_grow(CLASSIFY_STACK, CLASSIFY_STACK, || {
        classify_tree(sql, standard_conforming_strings)
    });
    // A deep tree took megabytes of stack, and of heap for its nodes: both are given back,
    // or they would stay with the process (glibc keeps what is freed in its arenas).
    if classified
        .as_ref()
        .is_ok_and(|(_, depth)| *depth > DEEP_TREE)
    {
        release_unused_stack();
        // SAFETY: malloc_trim only returns free memory of glibc's arenas to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
    classified.map(|(statements, _)| statements)
}

/// Trees deeper than this (levels of the parse tree as pgiam walks it) give their memory back.
const DEEP_TREE: usize = 256;

/// A text this short is not measured: however it nests, it touches little memory.
const SHALLOW_TEXT: usize = 256;

/// How many levels deep `tree` is, found without recursion.
fn tree_depth(tree: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(tree, 1)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(m) => stack.extend(m.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

/// Gives the kernel back the pages of this thread's stack below the current frame (they read
/// as zeros when touched again): what a deep statement touched stays committed otherwise.
fn release_unused_stack() {
    const PAGE: usize = 4096;
    // What the caller may still use below this frame without faulting the pages back in.
    const KEEP: usize = 256 << 10;
    let Some(remaining) = stacker::remaining_stack() else {
        return;
    };
    let here = &remaining as *const usize as usize;
    let top = here.saturating_sub(KEEP) & !(PAGE - 1);
    // stacker's `remaining` stops short of the guard page: one more page of margin.
    let bottom = (here - remaining + PAGE + PAGE - 1) & !(PAGE - 1);
    if top > bottom {
        // SAFETY: [bottom, top) lies in this thread's own stack, below every live frame (the
        // stack grows down and this frame is the deepest); MADV_DONTNEED only drops its pages.
        unsafe {
            libc::madvise(
                bottom as *mut libc::c_void,
                top - bottom,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// The stack [`classify`] needs. libpg_query bounds how deep a tree it returns (its stack
/// check within at most 2 MB, and 10,000 protobuf levels), and pgiam then decodes, converts,
/// walks and drops that tree recursively: up to ~13 KB a level in a debug build. Reserved,
/// not committed: a statement touches only the pages its depth needs.
pub const CLASSIFY_STACK: usize = 160 << 20;

/// [`classify`] on the stack it runs on, and how deep the parse tree was (0: not measured).
fn classify_tree(
    sql: &str,
    standard_conforming_strings: bool,
) -> Result<(Vec<Statement>, usize), SqlError> {
    let options = if standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let parsed = pg_query::parse(sql, options).map_err(|e| SqlError::Syntax {
        message: e.to_string(),
        position: position::syntax_error_position(sql, options),
    })?;
    let tree = serde_json::to_value(&parsed.protobuf).expect("parse trees serialize");
    let depth = if sql.len() > SHALLOW_TEXT {
        tree_depth(&tree)
    } else {
        0
    };
    let stmts = tree
        .get("stmts")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let statements = stmts
        .iter()
        .filter_map(|raw| raw.get("stmt"))
        .map(classify_statement)
        .collect();
    Ok((statements, depth))
}

/// Whether a function of this name reads or writes the server's files, and whether it runs
/// SQL given as text: what a statement that names it asks for beside `execute`.
pub fn function_runs(name: &str) -> (bool, bool) {
    let lower = name.to_ascii_lowercase();
    (
        FILE_FUNCTIONS.contains(&lower.as_str()),
        DYNAMIC_SQL_FUNCTIONS.contains(&lower.as_str()),
    )
}

impl Statement {
    /// Touches nothing beyond its relations' rows and functions: no setting, role, temporary
    /// relation, server program or file, no SQL run from text.
    fn stays_with_rows(&self) -> bool {
        !self.role_change
            && !self.do_block
            && !self.copy_program
            && !self.server_files
            && !self.temp
            && self.client_encoding.is_empty()
            && self.standard_conforming_strings.is_empty()
            && self.parameters.is_empty()
            && self.search_path.is_empty()
            && !self.search_path_unknown
    }
}

impl Statement {
    /// The first name the statement's classification holds (a relation, schema, function,
    /// setting, search_path schema or prepared statement) with a character outside ASCII:
    /// where the client's encoding may not be the one pgiam read the text in, such a name
    /// could be another name to the server.
    pub fn non_ascii_name(&self) -> Option<&str> {
        fn qualified(q: &QualifiedName) -> impl Iterator<Item = &str> {
            q.schema.as_deref().into_iter().chain([q.name.as_str()])
        }
        self.relations
            .iter()
            .flat_map(|r| qualified(&r.name))
            .chain(self.functions.iter().flat_map(qualified))
            .chain(self.search_path.iter().map(String::as_str))
            .chain(self.parameters.iter().map(String::as_str))
            .chain(self.prepares.as_deref())
            .chain(self.executes.as_deref())
            .chain(self.deallocates.as_deref())
            .find(|n| !n.is_ascii())
    }

    /// Some setting's value is a bound parameter, known only at Bind.
    pub fn needs_bind(&self) -> bool {
        self.client_encoding
            .iter()
            .chain(&self.standard_conforming_strings)
            .any(|v| matches!(v, SettingValue::Parameter(_)))
    }

    /// The statement as bound: every [`SettingValue::Parameter`] replaced by the value
    /// `parameter(n)` reads (`None`: SQL NULL, which set_config() takes as RESET), or the
    /// reason it cannot be read.
    pub fn bind(
        &self,
        mut parameter: impl FnMut(u32) -> Result<Option<String>, String>,
    ) -> Result<Statement, String> {
        let mut bound = self.clone();
        for v in bound
            .client_encoding
            .iter_mut()
            .chain(bound.standard_conforming_strings.iter_mut())
        {
            if let SettingValue::Parameter(n) = *v {
                *v = match parameter(n)? {
                    Some(text) => SettingValue::Value(text),
                    None => SettingValue::Default,
                };
            }
        }
        Ok(bound)
    }
}

/// Statements that take the Bind message's parameters as their own `$n`. In any other (a
/// PREPARE's body, a function's) `$n` means something else.
const BOUND_PARAMETER_STATEMENTS: &[&str] = &[
    "SelectStmt",
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
    "CallStmt",
    "ExplainStmt",
    "DeclareCursorStmt",
    "CreateTableAsStmt",
];

/// Where a SET met in a statement takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetContext {
    /// The session: SET, SET LOCAL, RESET.
    Session,
    /// Stored for later: a function's SET clause, ALTER ROLE/DATABASE … SET.
    Stored,
    /// ALTER SYSTEM: every session whose value comes from the configuration, on reload.
    System,
}

fn classify_statement(stmt: &Value) -> Statement {
    let (node, body) = tagged(stmt.get("node").unwrap_or(stmt)).unwrap_or(("", &Value::Null));
    let mut out = Statement {
        command: command_of(node, body),
        node: node.to_owned(),
        ..Statement::default()
    };
    let default = if DML.contains(&node) || node == "SelectStmt" {
        Access::Select
    } else if node == "LockStmt" {
        Access::Lock
    } else {
        Access::Ddl
    };
    let mut w = Walker {
        out: &mut out,
        scopes: Vec::new(),
        set_context: SetContext::Session,
        bound_parameters: true,
        settings_row: pg_settings_row(node, body),
        locking: false,
        sequence_names: Vec::new(),
    };
    w.visit_node(node, body, default);
    out.effect = effect_of(&out, body);
    out
}

/// Is `v` empty as prost serializes an unset field (null, "", 0, false, [])?
fn unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_u64() == Some(0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(_) => false,
    }
}

/// A column reference that is the bare column `name`.
fn is_name_column(v: &Value) -> bool {
    let fields = v
        .get("node")
        .unwrap_or(v)
        .get("ColumnRef")
        .and_then(|c| c.get("fields"))
        .and_then(Value::as_array);
    matches!(fields.map(Vec::as_slice), Some([f]) if string_of(f) == Some("name"))
}

/// The setting of `SELECT set_config(name, …, …) FROM [pg_catalog.]pg_settings WHERE name =
/// 'setting'`, exactly that and nothing more (no other clause, target, relation or alias): the
/// one row the server can return has `name` = the constant, so set_config changes that
/// setting. Lower-cased, as settings are.
fn pg_settings_row(node: &str, body: &Value) -> Option<String> {
    if node != "SelectStmt" {
        return None;
    }
    let m = body.as_object()?;
    // SETOP_NONE and LIMIT_OPTION_DEFAULT, as this protobuf numbers them.
    let expected = |k: &str, v: &Value| match k {
        "target_list" | "from_clause" | "where_clause" => true,
        "op" | "limit_option" => v.as_u64() == Some(1),
        _ => unset(v),
    };
    if !m.iter().all(|(k, v)| expected(k, v)) {
        return None;
    }
    let [target] = m.get("target_list")?.as_array()?.as_slice() else {
        return None;
    };
    let target = target.get("node").unwrap_or(target).get("ResTarget")?;
    if !target.get("name").is_none_or(unset) || !target.get("indirection").is_none_or(unset) {
        return None;
    }
    let call = target.get("val")?;
    let call = call
        .get("node")
        .unwrap_or(call)
        .get("FuncCall")?
        .as_object()?;
    let funcname: Vec<&str> = call
        .get("funcname")?
        .as_array()?
        .iter()
        .filter_map(string_of)
        .collect();
    if !matches!(
        funcname.as_slice(),
        ["set_config"] | ["pg_catalog", "set_config"]
    ) {
        return None;
    }
    let plain_call = call.iter().all(|(k, v)| {
        matches!(k.as_str(), "funcname" | "args" | "funcformat" | "location") || unset(v)
    });
    let args = call.get("args")?.as_array()?;
    if !plain_call || args.len() != 3 || !is_name_column(&args[0]) {
        return None;
    }
    let [from] = m.get("from_clause")?.as_array()?.as_slice() else {
        return None;
    };
    let range = from
        .get("node")
        .unwrap_or(from)
        .get("RangeVar")?
        .as_object()?;
    let schema = range
        .get("schemaname")
        .and_then(Value::as_str)
        .unwrap_or("");
    if range.get("relname").and_then(Value::as_str) != Some("pg_settings")
        || !matches!(schema, "" | "pg_catalog")
        || !range.get("catalogname").is_none_or(unset)
        || !range.get("alias").is_none_or(unset)
    {
        return None;
    }
    let filter = m.get("where_clause")?;
    let filter = filter.get("node").unwrap_or(filter).get("AExpr")?;
    // AEXPR_OP, the operator `=` unqualified, `name` on the left, a string on the right.
    let op: Vec<&str> = filter
        .get("name")?
        .as_array()?
        .iter()
        .filter_map(string_of)
        .collect();
    if filter.get("kind")?.as_u64() != Some(1)
        || op != ["="]
        || !is_name_column(filter.get("lexpr")?)
    {
        return None;
    }
    Some(string_constant(filter.get("rexpr")?)?.to_ascii_lowercase())
}

fn effect_of(s: &Statement, body: &Value) -> Effect {
    let plain = s.stays_with_rows()
        && s.functions.is_empty()
        && s.executes.is_none()
        && s.prepares.is_none()
        && s.deallocates.is_none();
    let accesses = |allowed: &[Access]| s.relations.iter().all(|r| allowed.contains(&r.access));
    match s.node.as_str() {
        _ if !plain => Effect::Immediate,
        // FOR UPDATE/SHARE writes row locks.
        "SelectStmt"
            if s.command == "select"
                && accesses(&[Access::Select])
                && !has_key(body, "locking_clause") =>
        {
            Effect::None
        }
        "VariableShowStmt" => Effect::None,
        // BEGIN and START TRANSACTION (TransactionStmtKind 1 and 2); COMMIT, ROLLBACK and the
        // savepoint commands end or change what a block will commit.
        "TransactionStmt" if matches!(body.get("kind").and_then(Value::as_i64), Some(1 | 2)) => {
            Effect::None
        }
        // TRANS_STMT_COMMIT (COMMIT, END, COMMIT AND CHAIN); not COMMIT PREPARED, which commits
        // what another session prepared.
        "TransactionStmt" if body.get("kind").and_then(Value::as_i64) == Some(3) => Effect::Commits,
        "InsertStmt" | "UpdateStmt" | "DeleteStmt"
            if accesses(&[
                Access::Select,
                Access::Insert,
                Access::Update,
                Access::Delete,
            ]) =>
        {
            Effect::Transactional
        }
        _ => Effect::Immediate,
    }
}

/// Whether `key` appears with a non-empty value anywhere in a parse tree.
fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            (k == key && !(v.is_null() || v.as_array().is_some_and(Vec::is_empty)))
                || has_key(v, key)
        }),
        Value::Array(a) => a.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

const DML: &[&str] = &["InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"];

fn command_of(node: &str, body: &Value) -> &'static str {
    match node {
        "SelectStmt" => {
            if body.get("into_clause").is_some_and(|v| !v.is_null()) {
                "select_into"
            } else {
                "select"
            }
        }
        "InsertStmt" => "insert",
        "UpdateStmt" => "update",
        "DeleteStmt" => "delete",
        "MergeStmt" => "merge",
        "CopyStmt" => "copy",
        "TruncateStmt" => "truncate",
        "ExplainStmt" => "explain",
        "PrepareStmt" => "prepare",
        "ExecuteStmt" => "execute",
        "DeallocateStmt" => "deallocate",
        "DeclareCursorStmt" => "declare",
        "FetchStmt" => "fetch",
        "ClosePortalStmt" => "close",
        "TransactionStmt" => "transaction",
        "VariableSetStmt" => "set",
        "VariableShowStmt" => "show",
        "ListenStmt" => "listen",
        "UnlistenStmt" => "unlisten",
        "NotifyStmt" => "notify",
        "DiscardStmt" => "discard",
        "DoStmt" => "do",
        "CallStmt" => "call",
        "LockStmt" => "lock",
        "CreateTableAsStmt" => "create_table_as",
        _ => "ddl",
    }
}

/// `{"TypeName": {...}}` (how a Node serializes): the type and its fields.
fn tagged(v: &Value) -> Option<(&str, &Value)> {
    let m = v.as_object()?;
    if m.len() != 1 {
        return None;
    }
    let (k, inner) = m.iter().next()?;
    (k.starts_with(|c: char| c.is_ascii_uppercase()) && inner.is_object())
        .then_some((k.as_str(), inner))
}

fn is_range_var(m: &Map<String, Value>) -> bool {
    m.contains_key("relname") && m.contains_key("relpersistence")
}

fn is_func_call(m: &Map<String, Value>) -> bool {
    m.contains_key("funcname") && m.contains_key("agg_within_group")
}

fn string_of(v: &Value) -> Option<&str> {
    // {"node": {"String": {"sval": "x"}}} or {"String": {"sval": "x"}}
    let v = v.get("node").unwrap_or(v);
    v.get("String")?.get("sval")?.as_str()
}

fn name_of(m: &Map<String, Value>) -> QualifiedName {
    let s = |k: &str| {
        m.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    QualifiedName {
        schema: s("schemaname"),
        name: s("relname").unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
