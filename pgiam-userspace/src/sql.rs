//! What a statement does, read with PostgreSQL's own parser (libpg_query), never with regexes:
//! a parser that disagreed with the server would be a bypass.
//!
//! The parse tree is walked in full through its serde form. prost serializes every field, so a
//! relation reference is recognised by its shape (`relname` + `relpersistence`) wherever it sits
//! — inside a Node or as a bare field (an INSERT target, `INTO`, a foreign key's referenced
//! table, …). Nothing is reached through per-statement helpers that could miss a case: every
//! RangeVar in the tree becomes a relation access unless it names a CTE in scope.

use std::collections::BTreeSet;

mod encoding;
mod position;
mod session_state;

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

/// Functions that run SQL given as text (or read a whole table or schema named by a value),
/// which pgiam cannot classify: treated like a DO block.
/// Functions that name the sequence they act on by their first argument (regclass, usually a
/// string), and the access PostgreSQL asks of it (UPDATE or USAGE to advance or set it,
/// SELECT or USAGE to read it).
const SEQUENCE_FUNCTIONS: &[(&str, Access)] = &[
    ("nextval", Access::Update),
    ("setval", Access::Update),
    ("currval", Access::Select),
    ("pg_sequence_last_value", Access::Select),
];

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
    let stmts = tree
        .get("stmts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(stmts
        .iter()
        .filter_map(|raw| raw.get("stmt"))
        .map(classify_statement)
        .collect())
}

type Cache = std::sync::Mutex<std::collections::HashMap<Box<[u8]>, std::sync::Arc<[Statement]>>>;

/// Cache capacity (entries each); when full a cache starts over.
const CACHE_CAPACITY: usize = 8192;
/// Longer texts are not remembered by their text (bulk INSERTs rarely repeat)...
const MAX_CACHED_TEXT: usize = 16 * 1024;
/// ...and not scanned for their shape beyond this.
const MAX_SCANNED_TEXT: usize = 64 * 1024;

/// Times a classification came from the cache by shape (for tests and the benchmark).
pub static SHAPE_HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Looked up by borrowed key: a hit costs no allocation.
fn cache_get(cache: &Cache, key: &[u8]) -> Option<std::sync::Arc<[Statement]>> {
    cache.lock().expect("cache lock").get(key).cloned()
}

fn cache_put(cache: &Cache, key: Box<[u8]>, value: std::sync::Arc<[Statement]>) {
    let mut c = cache.lock().expect("cache lock");
    if c.len() >= CACHE_CAPACITY {
        c.clear();
    }
    c.insert(key, value);
}

/// [`classify`], remembered. By statement text (and the string rules it was split with): the
/// classification is a function of those two, so a cached one is the one parsing would give.
/// And, for statements whose classification cannot depend on a constant's value, by *shape*:
/// PostgreSQL's own scanner's tokens with every literal replaced by its kind (comments and
/// whitespace dropped, keywords lower-cased), so
/// `WHERE aid = 1` and `WHERE aid = 2` share one entry. Statements that read a constant
/// (set_config's setting name, COPY's file name, …) are never remembered by shape, so the
/// cache never changes a decision, only its cost.
pub fn classify_cached(
    sql: &str,
    standard_conforming_strings: bool,
) -> Result<std::sync::Arc<[Statement]>, SqlError> {
    use std::sync::OnceLock;
    // By text: one cache per value of standard_conforming_strings.
    static BY_TEXT: [OnceLock<Cache>; 2] = [OnceLock::new(), OnceLock::new()];
    static BY_SHAPE: OnceLock<Cache> = OnceLock::new();
    let by_text = BY_TEXT[usize::from(standard_conforming_strings)].get_or_init(Default::default);
    let by_shape = BY_SHAPE.get_or_init(Default::default);
    let text_cached = sql.len() <= MAX_CACHED_TEXT;
    if text_cached {
        if let Some(hit) = cache_get(by_text, sql.as_bytes()) {
            return Ok(hit);
        }
    }
    // The scanner pg_query exposes knows only standard_conforming_strings = on.
    let shape_key = (standard_conforming_strings && sql.len() <= MAX_SCANNED_TEXT)
        .then(|| shape(sql))
        .flatten();
    if let Some(hit) = shape_key.as_deref().and_then(|k| cache_get(by_shape, k)) {
        SHAPE_HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(hit);
    }
    let statements: std::sync::Arc<[Statement]> =
        classify(sql, standard_conforming_strings)?.into();
    if let Some(k) = shape_key {
        if statements.iter().all(Statement::is_literal_insensitive) {
            cache_put(by_shape, k, statements.clone());
        }
    }
    if text_cached {
        cache_put(by_text, sql.as_bytes().into(), statements.clone());
    }
    Ok(statements)
}

/// The statement's tokens as PostgreSQL's scanner sees them, literals reduced to their kind,
/// comments dropped, keywords lower-cased. `None` if it does not scan (the parser will say why).
fn shape(sql: &str) -> Option<Box<[u8]>> {
    use pg_query::protobuf::Token;
    // Text that is only white space has no token, and pg_query 18.1 then builds a slice from
    // the null pointer libpg_query returns (undefined behaviour; a panic in debug builds):
    // pg_restore sends such statements. Any other byte is a token or a scan error.
    if sql.bytes().all(|b| b" \t\n\r\x0b\x0c".contains(&b)) {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut out = Vec::with_capacity(sql.len());
    for t in &tokens {
        let kind = Token::try_from(t.token);
        if matches!(kind, Ok(Token::SqlComment | Token::CComment)) {
            continue;
        }
        let literal = matches!(
            kind,
            Ok(Token::Sconst
                | Token::Usconst
                | Token::Iconst
                | Token::Fconst
                | Token::Bconst
                | Token::Xconst)
        );
        let text = sql.as_bytes().get(t.start as usize..t.end as usize)?;
        if literal {
            out.push(0xff);
            out.extend_from_slice(&t.token.to_le_bytes());
        } else if t.keyword_kind != pg_query::protobuf::KeywordKind::NoKeyword as i32 {
            // A keyword is never quoted, and its case does not matter.
            out.extend(text.iter().map(u8::to_ascii_lowercase));
            out.push(0);
        } else {
            out.extend_from_slice(text);
            out.push(0);
        }
    }
    Some(out.into())
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

    /// Changing any constant in the statement cannot change this classification: plain DML
    /// that calls no function reading a constant as a name (set_config) and sets nothing.
    fn is_literal_insensitive(&self) -> bool {
        matches!(
            self.command,
            "select" | "insert" | "update" | "delete" | "merge"
        ) && self.stays_with_rows()
            && !self
                .functions
                .iter()
                .any(|f| f.name.eq_ignore_ascii_case("set_config"))
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

struct Walker<'a> {
    out: &'a mut Statement,
    /// CTE names visible at this point, innermost last.
    scopes: Vec<BTreeSet<String>>,
    /// Where a SET at this point takes effect.
    set_context: SetContext,
    /// `$n` at this point is the Bind message's parameter n.
    bound_parameters: bool,
    /// The statement is the one-row pg_settings shape: the setting its `name` column holds.
    settings_row: Option<String>,
    /// Inside a SELECT with a locking clause (FOR UPDATE, FOR SHARE, …): what it reads, it
    /// also locks. (Every relation of that SELECT, sub-queries included, whatever `OF` names:
    /// more than the server locks, never less.)
    locking: bool,
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

    fn visit_node(&mut self, node: &str, body: &Value, access: Access) {
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
        self.out.functions.insert(QualifiedName {
            schema: schema.last().map(|s| s.to_string()),
            name: name.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = classify(sql, true).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    fn rels(sql: &str) -> Vec<(String, Access)> {
        one(sql)
            .relations
            .into_iter()
            .map(|r| (r.name.to_string(), r.access))
            .collect()
    }

    use Access::*;

    fn r(name: &str, a: Access) -> (String, Access) {
        (name.to_owned(), a)
    }

    #[test]
    fn names_fold_as_postgresql_folds_them() {
        assert_eq!(rels("SELECT * FROM Accounts"), [r("accounts", Select)]);
        assert_eq!(rels(r#"SELECT * FROM "Accounts""#), [r("Accounts", Select)]);
        assert_eq!(rels("select * from App.T"), [r("app.t", Select)]);
        let long = "x".repeat(70);
        assert_eq!(
            rels(&format!("select * from {long}")),
            [r(&"x".repeat(63), Select)]
        );
    }

    #[test]
    fn writes_and_their_sources() {
        assert_eq!(
            rels("INSERT INTO t SELECT * FROM secret"),
            [r("secret", Select), r("t", Insert)]
        );
        assert_eq!(
            rels("UPDATE t SET a = s.a FROM secret s WHERE t.id = s.id"),
            [r("secret", Select), r("t", Update)]
        );
        assert_eq!(
            rels("DELETE FROM t USING secret WHERE t.id = secret.id"),
            [r("secret", Select), r("t", Delete)]
        );
        assert_eq!(
            rels("MERGE INTO t USING secret s ON t.id = s.id WHEN MATCHED THEN DELETE"),
            [r("secret", Select), r("t", Merge)]
        );
        assert_eq!(rels("TRUNCATE a, b"), [r("a", Truncate), r("b", Truncate)]);
        assert_eq!(
            rels("SELECT * INTO t3 FROM secret"),
            [r("secret", Select), r("t3", Create)]
        );
        assert_eq!(
            rels("CREATE TABLE t2 AS SELECT * FROM secret"),
            [r("secret", Select), r("t2", Create)]
        );
    }

    #[test]
    fn nested_statements_reveal_their_tables() {
        // The cases pg_query's summary helpers miss.
        assert_eq!(
            rels("DECLARE c CURSOR FOR SELECT * FROM secret"),
            [r("secret", Select)]
        );
        assert_eq!(
            rels("PREPARE p AS SELECT * FROM secret"),
            [r("secret", Select)]
        );
        assert_eq!(
            rels("EXPLAIN ANALYZE DELETE FROM secret"),
            [r("secret", Delete)]
        );
        assert_eq!(
            rels("COPY (SELECT * FROM secret) TO STDOUT"),
            [r("secret", Select)]
        );
        assert_eq!(
            rels("SELECT 1 FROM t WHERE x IN (SELECT y FROM u WHERE EXISTS (SELECT FROM v))"),
            [r("t", Select), r("u", Select), r("v", Select)]
        );
        assert_eq!(
            rels("CREATE VIEW v AS SELECT * FROM secret"),
            [r("secret", Select), r("v", Ddl)]
        );
        assert_eq!(
            rels("CREATE TABLE c (id int REFERENCES parent(id))"),
            [r("c", Ddl), r("parent", Ddl)]
        );
    }

    #[test]
    fn ctes_are_scoped_like_postgresql() {
        assert_eq!(
            rels("WITH x AS (DELETE FROM secret RETURNING *) SELECT * FROM x"),
            [r("secret", Delete)]
        );
        assert_eq!(
            rels("WITH a AS (SELECT * FROM secret) SELECT * FROM a"),
            [r("secret", Select)]
        );
        // Non-recursive: inside its own body, `secret` is the table.
        assert_eq!(
            rels("WITH secret AS (SELECT * FROM secret) SELECT * FROM secret"),
            [r("secret", Select)]
        );
        // Later CTEs see earlier ones, not the other way round.
        assert_eq!(
            rels("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b"),
            [r("b", Select)]
        );
        assert_eq!(
            rels("WITH RECURSIVE r AS (SELECT 1 UNION SELECT * FROM r) SELECT * FROM r"),
            []
        );
        // A schema-qualified name is never a CTE.
        assert_eq!(
            rels("WITH secret AS (SELECT 1) SELECT * FROM public.secret"),
            [r("public.secret", Select)]
        );
        // A CTE's scope ends with its statement.
        assert_eq!(
            rels("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x"),
            [r("x", Select)]
        );
    }

    #[test]
    fn copy_directions_program_and_files() {
        assert_eq!(rels("COPY secret TO STDOUT"), [r("secret", CopyOut)]);
        assert_eq!(rels("COPY t FROM STDIN"), [r("t", CopyIn)]);
        assert!(one("COPY t FROM PROGRAM 'id'").copy_program);
        assert!(one("COPY t TO '/tmp/x'").server_files);
        assert!(!one("COPY t TO STDOUT").server_files);
    }

    #[test]
    fn role_changes_in_every_form() {
        for sql in [
            "SET ROLE postgres",
            "set local role postgres",
            "RESET ROLE",
            "SET SESSION AUTHORIZATION postgres",
            "DISCARD ALL",
            "SELECT set_config('role', 'postgres', false)",
            "SELECT set_config('ROLE', 'postgres', false)",
            "SELECT set_config(current_setting('x'), 'postgres', false)",
            "SELECT pg_catalog.set_config('session_authorization', 'postgres', false)",
        ] {
            assert!(one(sql).role_change, "{sql}");
        }
        // A role's default role applies at its next login: a role may set its own.
        for sql in [
            "ALTER ROLE current_user SET role = postgres",
            "ALTER ROLE app IN DATABASE app SET ROLE TO postgres",
            "ALTER USER app SET session_authorization = postgres",
        ] {
            assert!(one(sql).role_change, "{sql}");
        }
        for sql in [
            "SET search_path = x",
            "ALTER ROLE app SET work_mem = '1MB'",
            "SELECT set_config('work_mem', '4MB', false)",
            "DISCARD PLANS",
            "RESET ALL",
        ] {
            assert!(!one(sql).role_change, "{sql}");
        }
        assert_eq!(
            one("SELECT set_config('Search_Path', 'x', false)").parameters,
            BTreeSet::from(["search_path".to_owned()])
        );
        assert_eq!(
            one("SET LOCAL work_mem = '1MB'").parameters,
            BTreeSet::from(["work_mem".to_owned()])
        );
    }

    #[test]
    fn search_path_values_are_read_as_the_server_reads_them() {
        let schemas = |sql: &str| {
            let s = one(sql);
            assert!(!s.search_path_unknown, "{sql}");
            s.search_path.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(schemas("SET search_path = other"), ["other"]);
        // Each argument is one name, exactly: identifiers as the parser folded them, strings
        // as written (the server quotes them), numbers as unquoted names.
        assert_eq!(
            schemas(r#"SET search_path TO "Other", Public, 'a, B', 1, "$user""#),
            ["$user", "1", "Other", "a, B", "public"]
        );
        assert_eq!(schemas("SET SCHEMA 'Tenant'"), ["Tenant"]);
        assert_eq!(schemas("set local search_path = x"), ["x"]);
        assert_eq!(
            schemas("SET SESSION search_path = x, pg_temp"),
            ["pg_temp", "x"]
        );
        // set_config's value is a list, split and folded as the server does.
        assert_eq!(
            schemas(r#"SELECT set_config('Search_Path', ' "A b" ,  C,pg_temp , "x""y"', false)"#),
            ["A b", "c", "pg_temp", "x\"y"]
        );
        assert_eq!(
            schemas("SELECT pg_catalog.set_config('search_path', '', false)"),
            Vec::<String>::new()
        );
        // Wherever a SET sits: a function's SET clause, a role's default, a prepared
        // statement, a cursor.
        assert_eq!(
            schemas(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = fn_path \
                 AS 'select 1'"
            ),
            ["fn_path"]
        );
        assert_eq!(
            schemas("ALTER FUNCTION f() SET search_path = a, b"),
            ["a", "b"]
        );
        assert_eq!(schemas("ALTER ROLE r SET search_path = c"), ["c"]);
        assert_eq!(
            schemas("ALTER ROLE r IN DATABASE d SET search_path = c2"),
            ["c2"]
        );
        assert_eq!(schemas("ALTER DATABASE d SET search_path = c3"), ["c3"]);
        assert_eq!(schemas("ALTER SYSTEM SET search_path = c4"), ["c4"]);
        assert_eq!(
            schemas("PREPARE p AS SELECT set_config('search_path', 'd', false)"),
            ["d"]
        );
        assert_eq!(
            schemas("DECLARE c CURSOR FOR SELECT set_config('search_path', 'e', true)"),
            ["e"]
        );
        // Back to the starting value: nothing new.
        for sql in [
            "RESET search_path",
            "SET search_path TO DEFAULT",
            "RESET ALL",
            "SELECT set_config('search_path', NULL, false)",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path FROM CURRENT AS 'select 1'",
        ] {
            assert_eq!(schemas(sql), Vec::<String>::new(), "{sql}");
        }
        // Values pgiam cannot read when it decides.
        for sql in [
            "SELECT set_config('search_path', $1, false)",
            "SELECT set_config('search_path', 'a' || 'b', false)",
            "SELECT set_config('search_path', 'x'::text, false)",
            "SELECT set_config('search_path', current_setting('x'), false)",
            "SELECT set_config('search_path', '\"a', false)",
            "SELECT set_config('search_path', 'a b', false)",
            "SELECT set_config('search_path', 'a,', false)",
            "SELECT set_config('search_path', E'a\\vb', false)",
            "SELECT set_config('search_path')",
            "SELECT set_config(lower('SEARCH_PATH'), lower('x'), false)",
            "SELECT set_config(lower('SEARCH_PATH'), E'a\\vb', false)",
            "SELECT set_config(setting_name => 'search_path', new_value => 'x', is_local => false)",
        ] {
            assert!(one(sql).search_path_unknown, "{sql}");
        }
        assert!(!one("SELECT set_config('role', 'x', false)").search_path_unknown);
        // A setting name that is not a constant might be search_path: its constant value is
        // what the path would become, if the server accepts it as one.
        let s = one(
            "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
             WHERE name LIKE 'restrict%'",
        );
        assert!(s.role_change && !s.search_path_unknown);
        assert_eq!(
            s.search_path,
            BTreeSet::from(["view".into(), "foreign-table".into()])
        );
        let s = one("SELECT set_config(lower('X'), '1 day', false)");
        assert!(s.role_change && !s.search_path_unknown && s.search_path.is_empty());
        assert!(!one("SELECT set_config('work_mem', $1, false)").search_path_unknown);
    }

    #[test]
    fn search_path_lists_split_like_split_identifier_string() {
        let p = |v: &str| parse_search_path(v);
        assert_eq!(p(""), Some(vec![]));
        assert_eq!(p("  "), Some(vec![]));
        assert_eq!(p("a"), Some(vec!["a".into()]));
        assert_eq!(
            p("\t$User ,\n\"$user\",PUBLIC"),
            Some(vec!["$user".into(), "$user".into(), "public".into()])
        );
        assert_eq!(p(r#""""#), Some(vec!["".into()]));
        assert_eq!(p(r#""a,b""#), Some(vec!["a,b".into()]));
        assert_eq!(p(r#""Ab""c""#), Some(vec![r#"Ab"c"#.into()]));
        // An unquoted name runs to a comma or whitespace, quotes and all.
        assert_eq!(p(r#"A"b""#), Some(vec![r#"a"b""#.into()]));
        assert_eq!(p(&"x".repeat(70)), Some(vec!["x".repeat(63)]));
        assert_eq!(
            p(&format!("\"{}\"", "é".repeat(40))),
            Some(vec!["é".repeat(31)])
        );
        for bad in [",", "a,", ",a", "a b", "\"a", "\"a\"b", "a,,b", "a\u{b}"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sequences_named_by_text_are_relations() {
        assert_eq!(rels("SELECT nextval('s')"), [r("s", Update)]);
        assert_eq!(
            rels(r#"SELECT pg_catalog.setval('App."Seq"', 5)"#),
            [r("app.Seq", Update)]
        );
        assert_eq!(rels("SELECT currval('s'::regclass)"), [r("s", Select)]);
        assert_eq!(
            rels("SELECT nextval(' public . s ')"),
            [r("public.s", Update)]
        );
        for dynamic in [
            "SELECT nextval('s' || 'x')",
            "SELECT nextval('16384')",
            "SELECT nextval('db.public.s')",
            "SELECT nextval($1)",
            "SELECT nextval(('s'::regclass)::oid::regclass)",
            r#"SELECT nextval('"unterminated')"#,
        ] {
            let s = one(dynamic);
            assert!(s.do_block && s.relations.is_empty(), "{dynamic}: {s:?}");
        }
        // Another schema's function of the same name is an ordinary function.
        let s = one("SELECT other.nextval('s')");
        assert!(s.relations.is_empty() && !s.do_block, "{s:?}");
    }

    #[test]
    fn functions_do_blocks_and_file_access() {
        let s = one("SELECT pg_catalog.pg_read_file('/etc/passwd'), lower('A')");
        assert!(s.server_files);
        assert!(s.functions.contains(&QualifiedName {
            schema: Some("pg_catalog".into()),
            name: "pg_read_file".into()
        }));
        assert!(s.functions.contains(&QualifiedName {
            schema: None,
            name: "lower".into()
        }));
        assert!(one("DO $$ BEGIN PERFORM 1; END $$").do_block);
        assert!(one("SELECT query_to_xml('select * from secret', true, true, '')").do_block);
        assert!(one("SELECT pg_catalog.table_to_xml('secret', true, true, '')").do_block);
        assert!(one("CALL proc(1)")
            .functions
            .iter()
            .any(|f| f.name == "proc"));
        assert_eq!(one("EXECUTE p(1)").executes.as_deref(), Some("p"));
        assert_eq!(one("PREPARE P AS SELECT 1").prepares.as_deref(), Some("p"));
        assert_eq!(one("DEALLOCATE p").deallocates.as_deref(), Some("p"));
        assert_eq!(one("DEALLOCATE ALL").deallocates.as_deref(), Some(""));
    }

    #[test]
    fn statements_split_by_the_servers_string_rules() {
        let sql = r"SELECT 'a\'; DROP TABLE t; --'";
        let on = classify(sql, true).unwrap();
        assert_eq!(
            on.iter().map(|s| s.command).collect::<Vec<_>>(),
            ["select", "ddl"],
            "with standard_conforming_strings on, the backslash ends nothing"
        );
        let off = classify(sql, false).unwrap();
        assert_eq!(off.len(), 1, "off: the whole thing is one string literal");
        assert_eq!(
            classify("SELECT 1; SELECT * FROM secret", true)
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            classify("SELEC 1", true),
            Err(SqlError::Syntax { .. })
        ));
    }

    /// Every relation name anywhere in the parse tree surfaces as an access, unless it names a
    /// CTE: the walker has no statement kind it does not look into.
    #[test]
    fn no_relation_in_the_tree_is_missed() {
        let corpus = [
            "SELECT * FROM a JOIN b USING (id) LEFT JOIN LATERAL (SELECT * FROM c) x ON true",
            "SELECT (SELECT max(v) FROM d), array(SELECT 1 FROM e) FROM f",
            "INSERT INTO g (a) VALUES ((SELECT 1 FROM h)) ON CONFLICT (a) DO UPDATE SET a = (SELECT 2 FROM i)",
            "UPDATE j SET a = 1 WHERE id IN (SELECT id FROM k) RETURNING (SELECT 1 FROM l)",
            "DELETE FROM m WHERE EXISTS (SELECT FROM n)",
            "MERGE INTO o USING p ON o.id = p.id WHEN NOT MATCHED THEN INSERT VALUES (p.id)",
            "CREATE TABLE q (id int REFERENCES r, LIKE s)",
            "CREATE INDEX ON t (a)",
            "CREATE TRIGGER tr AFTER INSERT ON u FOR EACH ROW EXECUTE FUNCTION f()",
            "CREATE POLICY pol ON v USING (true)",
            "ALTER TABLE w ADD CONSTRAINT c FOREIGN KEY (a) REFERENCES x(a)",
            "ALTER TABLE y RENAME TO z2",
            "GRANT SELECT ON aa, bb TO public",
            "VACUUM cc",
            "CLUSTER dd USING idx",
            "REFRESH MATERIALIZED VIEW ee",
            "CREATE MATERIALIZED VIEW ff AS SELECT * FROM gg",
            "CREATE RULE r AS ON INSERT TO hh DO INSTEAD NOTHING",
            "LOCK TABLE ii, jj",
            "COMMENT ON TABLE kk IS 'x'",
            "ALTER TABLE ll ATTACH PARTITION mm FOR VALUES IN (1)",
            "CREATE TABLE nn PARTITION OF oo FOR VALUES IN (1)",
            "TABLE pp",
            "SELECT * FROM qq TABLESAMPLE SYSTEM (10)",
            "WITH cte AS (SELECT * FROM rr) INSERT INTO ss SELECT * FROM cte",
            "CREATE PUBLICATION pub FOR TABLE tt",
            "ANALYZE uu",
            "CREATE STATISTICS st ON a, b FROM vv",
            "SELECT * FROM ww FOR UPDATE OF ww",
        ];
        for sql in corpus {
            let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
            let tree =
                serde_json::to_string(&serde_json::to_value(&parsed.protobuf).unwrap()).unwrap();
            let found: BTreeSet<String> = one(sql)
                .relations
                .iter()
                .map(|r| r.name.name.clone())
                .collect();
            let mut rest = tree.as_str();
            while let Some(at) = rest.find("\"relname\":\"") {
                rest = &rest[at + 11..];
                let name = &rest[..rest.find('"').unwrap()];
                if name != "cte" {
                    assert!(
                        found.contains(name),
                        "{sql}: {name} missed; found {found:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_shape_cache_shares_literal_variants_and_never_a_decision() {
        use std::sync::atomic::Ordering;
        let hits = || SHAPE_HITS.load(Ordering::Relaxed);
        let a = classify_cached("SELECT v FROM shape_t WHERE id = 1 AND n = 'x'", true).unwrap();
        let before = hits();
        let b = classify_cached(
            "select v  FROM shape_t WHERE id = 42 AND n = 'y' /* c */",
            true,
        )
        .unwrap();
        assert!(hits() > before, "a literal-only difference is a cache hit");
        assert_eq!(a, b);
        // A constant that decides the classification is never shared by shape.
        let safe = classify_cached(
            "SELECT set_config('work_mem', '1MB', false) FROM shape_u",
            true,
        )
        .unwrap();
        assert!(!safe[0].role_change);
        let role =
            classify_cached("SELECT set_config('role', '1MB', false) FROM shape_u", true).unwrap();
        assert!(role[0].role_change);
        assert!(!classify_cached("COPY shape_v TO STDOUT", true).unwrap()[0].server_files);
        assert!(classify_cached("COPY shape_v TO '/tmp/x'", true).unwrap()[0].server_files);
        let path = |v: &str| {
            let sql = format!("SELECT set_config('search_path', '{v}', false), x FROM shape_w");
            classify_cached(&sql, true).unwrap()[0].search_path.clone()
        };
        assert_eq!(path("a"), BTreeSet::from(["a".to_owned()]));
        assert_eq!(path("b"), BTreeSet::from(["b".to_owned()]));
        // Identifiers are not literals.
        let c = classify_cached("SELECT v FROM shape_t2 WHERE id = 1 AND n = 'x'", true).unwrap();
        assert_eq!(c[0].relations.iter().next().unwrap().name.name, "shape_t2");
        let q = classify_cached(r#"SELECT v FROM "shape_T" WHERE id = 1"#, true).unwrap();
        assert_eq!(q[0].relations.iter().next().unwrap().name.name, "shape_T");
        // With standard_conforming_strings off the split differs: never served by shape.
        let off = classify_cached(r"SELECT 'a\'; DELETE FROM shape_t; --'", false).unwrap();
        assert_eq!(off.len(), 1);
        let on = classify_cached(r"SELECT 'a\'; DELETE FROM shape_t; --'", true).unwrap();
        assert_eq!(on.len(), 2);
    }

    #[test]
    fn pg_dumps_one_row_of_pg_settings_sets_that_setting() {
        let s = one(
            "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
             WHERE name = 'restrict_nonsystem_relation_kind'",
        );
        assert!(!s.role_change && s.setting_from_pg_settings);
        assert_eq!(
            s.parameters,
            BTreeSet::from(["restrict_nonsystem_relation_kind".to_owned()])
        );
        let s = one(
            "SELECT pg_catalog.set_config(name, 'x', false) FROM pg_catalog.pg_settings \
             WHERE name = 'Role'",
        );
        assert!(s.role_change, "the row named is role: a role change");
        // Anything more or other than the exact shape might reach another row or setting.
        for sql in [
            "SELECT set_config(name, 'x', false) FROM pg_settings",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name <> 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' OR true",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' UNION SELECT 'b'",
            "SELECT set_config(name, 'x', false) FROM pg_settings s WHERE name = 'a'",
            "SELECT set_config(name, 'x', false) FROM app.pg_settings WHERE name = 'a'",
            "SELECT set_config(name, 'x', false) FROM pg_settings, t WHERE name = 'a'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' GROUP BY name",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name OPERATOR(public.=) 'a'",
            "SELECT set_config(lower(name), 'x', false) FROM pg_settings WHERE name = 'a'",
            "SELECT set_config(name, 'x', false), 1 FROM pg_settings WHERE name = 'a'",
            "WITH pg_settings AS (SELECT 'role' AS name) SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a'",
        ] {
            assert!(one(sql).role_change, "{sql}");
        }
    }

    #[test]
    fn text_of_white_space_alone_classifies_as_nothing() {
        for sql in ["", " ", "\n\t\r\x0b\x0c "] {
            assert!(shape(sql).is_none(), "{sql:?}");
            assert!(classify_cached(sql, true).unwrap().is_empty(), "{sql:?}");
        }
        assert!(shape("-- only a comment").is_some());
    }

    #[test]
    fn values_given_to_client_encoding_and_standard_conforming_strings_are_read() {
        use SettingValue::*;
        let v = |s: &str| Value(s.into());
        let enc = |sql: &str| one(sql).client_encoding;
        let scs = |sql: &str| one(sql).standard_conforming_strings;
        assert_eq!(enc("SET client_encoding = 'SJIS'"), [v("SJIS")]);
        assert_eq!(enc("SET client_encoding TO 'Shift_JIS'"), [v("Shift_JIS")]);
        assert_eq!(enc("SET NAMES 'big5'"), [v("big5")]);
        assert_eq!(enc("SET LOCAL client_encoding = gbk"), [v("gbk")]);
        assert_eq!(enc("SET client_encoding = 8"), [v("8")]);
        assert_eq!(enc("SET client_encoding TO DEFAULT"), [Default]);
        assert_eq!(enc("SET NAMES"), [Default]);
        assert_eq!(enc("RESET client_encoding"), [Default]);
        assert_eq!(
            enc("SELECT set_config('client_encoding', 'EUC_JP', false)"),
            [v("EUC_JP")]
        );
        assert_eq!(
            enc("SELECT pg_catalog.set_config('CLIENT_ENCODING', NULL, true)"),
            [Default]
        );
        assert_eq!(
            enc("SELECT set_config('client_encoding', $1, false)"),
            [Parameter(1)]
        );
        assert_eq!(
            enc("EXPLAIN ANALYZE SELECT set_config('client_encoding', $2, false)"),
            [Parameter(2)]
        );
        // $1 in a PREPARE's body is EXECUTE's argument, not a bound parameter.
        for sql in [
            "PREPARE p(text) AS SELECT set_config('client_encoding', $1, false)",
            "SELECT set_config('client_encoding', lower('SJIS'), false)",
            "SELECT set_config('client_encoding', $1::text, false)",
            "SELECT set_config('client_encoding')",
        ] {
            assert_eq!(enc(sql), [Unknown], "{sql}");
        }
        // Kept for later.
        assert_eq!(
            enc(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'LATIN1' \
                 AS 'select 1'"
            ),
            [Stored("LATIN1".into())]
        );
        assert_eq!(
            enc("ALTER ROLE r SET client_encoding = 'LATIN2'"),
            [Stored("LATIN2".into())]
        );
        assert_eq!(
            enc("ALTER SYSTEM SET client_encoding = 'LATIN3'"),
            [Stored("LATIN3".into())]
        );
        assert_eq!(
            scs("ALTER SYSTEM SET standard_conforming_strings = on"),
            [Unknown]
        );
        assert_eq!(
            scs("ALTER DATABASE d SET standard_conforming_strings = on"),
            [Stored("on".into())]
        );
        assert_eq!(
            scs("CREATE FUNCTION f() RETURNS int LANGUAGE sql \
                 SET standard_conforming_strings FROM CURRENT AS 'select 1'"),
            [Current]
        );
        // standard_conforming_strings, every way.
        assert_eq!(scs("SET standard_conforming_strings = on"), [v("on")]);
        assert_eq!(scs("SET standard_conforming_strings TO true"), [v("true")]);
        assert_eq!(scs("SET standard_conforming_strings = 1"), [v("1")]);
        assert_eq!(
            scs("SET LOCAL standard_conforming_strings = 'off'"),
            [v("off")]
        );
        assert_eq!(scs("RESET standard_conforming_strings"), [Default]);
        assert_eq!(scs("SET standard_conforming_strings TO DEFAULT"), [Default]);
        assert_eq!(
            scs("SELECT set_config('standard_conforming_strings', $1, false)"),
            [Parameter(1)]
        );
        // RESET ALL and DISCARD ALL go back to the login values.
        for sql in ["RESET ALL", "DISCARD ALL"] {
            assert_eq!(enc(sql), [Default], "{sql}");
            assert_eq!(scs(sql), [Default], "{sql}");
        }
        // A setting name that is not a constant could be either.
        let s = one("SELECT set_config(name, 'off', false) FROM pg_settings");
        assert_eq!(s.client_encoding, [IfThisSetting("off".into())]);
        assert_eq!(s.standard_conforming_strings, [IfThisSetting("off".into())]);
        let s = one("SET work_mem = '1MB'");
        assert!(s.client_encoding.is_empty() && s.standard_conforming_strings.is_empty());
        assert!(is_unsafe_encoding("Shift_JIS") && is_unsafe_encoding("windows-950"));
        assert!(!is_unsafe_encoding("EUC_JP") && !is_unsafe_encoding("nonsense"));
    }

    #[test]
    fn booleans_read_as_postgresql_reads_a_setting() {
        for (text, value) in [
            ("on", Some(true)),
            ("ON", Some(true)),
            ("of", Some(false)),
            ("off", Some(false)),
            ("o", None),
            ("onn", None),
            ("t", Some(true)),
            ("TRU", Some(true)),
            ("truee", None),
            ("f", Some(false)),
            ("y", Some(true)),
            ("yes", Some(true)),
            ("n", Some(false)),
            ("no", Some(false)),
            ("1", Some(true)),
            ("0", Some(false)),
            ("01", None),
            (" on", None),
            ("on ", None),
            ("", None),
        ] {
            assert_eq!(parse_bool(text), value, "{text:?}");
        }
    }

    #[test]
    fn names_outside_ascii_are_found_wherever_the_classification_holds_them() {
        for sql in [
            r#"SELECT * FROM "é""#,
            r#"SELECT * FROM "ß".t"#,
            "SELECT ü()",
            "SELECT s\u{e9}.f()",
            "SET search_path = 'schéma'",
            "SELECT set_config('search_path', 'a, \"b\u{e9}\"', false)",
            r#"SET "my.settïng" = 1"#,
            r#"PREPARE "pé" AS SELECT 1"#,
            r#"EXECUTE "pé""#,
            r#"DEALLOCATE "pé""#,
            r#"SELECT * FROM U&"\00e9""#,
        ] {
            assert!(one(sql).non_ascii_name().is_some(), "{sql}");
        }
        for sql in [
            "SELECT 'é', \"t\".v FROM t -- é",
            "SELECT /* ü */ 1",
            "SELECT $é$x$é$",
            r#"SELECT * FROM U&"\0074""#,
        ] {
            assert_eq!(one(sql).non_ascii_name(), None, "{sql}");
        }
    }

    #[test]
    fn bound_parameters_replace_the_values_they_stand_for() {
        let s = one("SELECT set_config('client_encoding', $2, false), $1::int");
        assert!(s.needs_bind());
        let bound = s
            .bind(|n| Ok((n == 2).then(|| "LATIN9".to_owned())))
            .unwrap();
        assert!(!bound.needs_bind());
        assert_eq!(
            bound.client_encoding,
            [SettingValue::Value("LATIN9".into())]
        );
        let null = s.bind(|_| Ok(None)).unwrap();
        assert_eq!(null.client_encoding, [SettingValue::Default]);
        assert_eq!(s.bind(|_| Err("no".into())), Err("no".to_owned()));
        assert!(!one("SELECT set_config('work_mem', $1, false)").needs_bind());
    }

    #[test]
    fn temporary_relations_are_noticed() {
        assert!(one("CREATE TEMP TABLE t (a int)").temp);
        assert!(one("SELECT 1 INTO TEMP t").temp);
        assert!(one("CREATE TABLE pg_temp.t (a int)").temp);
        assert!(!one("CREATE TABLE t (a int)").temp);
    }

    #[test]
    fn commands() {
        for (sql, command) in [
            ("select 1", "select"),
            ("select 1 into t", "select_into"),
            ("begin", "transaction"),
            ("listen x", "listen"),
            ("notify x", "notify"),
            ("show work_mem", "show"),
            ("lock table t", "lock"),
            ("create table t(a int)", "ddl"),
            ("grant select on t to public", "ddl"),
        ] {
            assert_eq!(one(sql).command, command, "{sql}");
        }
        assert_eq!(rels("lock table t"), [r("t", Lock)]);
        assert_eq!(rels("grant select on t to public"), [r("t", Ddl)]);
    }

    #[test]
    fn effects() {
        use Effect::*;
        for (sql, effect) in [
            ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", None),
            ("select 1", None),
            (
                "SELECT * FROM a JOIN b USING (id) WHERE a.x IN (SELECT y FROM c)",
                None,
            ),
            ("show work_mem", None),
            ("begin", None),
            ("start transaction isolation level serializable", None),
            (
                "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
                Transactional,
            ),
            ("INSERT INTO h (a) VALUES (1) RETURNING a", Transactional),
            (
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
                 VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
                Transactional,
            ),
            (
                "DELETE FROM t WHERE id IN (SELECT id FROM u)",
                Transactional,
            ),
            // Functions are opaque; row locks are writes; so is anything else.
            ("select count(*) from t", Immediate),
            ("select nextval('s')", Immediate),
            ("select * from t for update", Immediate),
            (
                "select * from t where id in (select id from u for share)",
                Immediate,
            ),
            (
                "with d as (delete from t returning *) select * from d",
                Immediate,
            ),
            ("select 1 into t2", Immediate),
            ("insert into t values (now())", Immediate),
            ("commit", Commits),
            ("end", Commits),
            ("commit and chain", Commits),
            ("commit prepared 'x'", Immediate),
            ("prepare transaction 'x'", Immediate),
            ("rollback", Immediate),
            ("savepoint s", Immediate),
            ("set work_mem = '1MB'", Immediate),
            (
                "merge into t using u on t.a = u.a when matched then delete",
                Immediate,
            ),
            ("truncate t", Immediate),
            ("copy t from stdin", Immediate),
            ("explain select 1", Immediate),
            ("prepare p as select 1", Immediate),
            ("execute p", Immediate),
            ("declare c cursor for select 1", Immediate),
            ("create table t(a int)", Immediate),
        ] {
            assert_eq!(one(sql).effect, effect, "{sql}");
        }
    }
}
