//! The classification cache: a statement's classification remembered by its text, and, where
//! no constant can change it, by its shape (PostgreSQL's scanner's tokens, literals reduced to
//! their kind), so that `WHERE aid = 1` and `WHERE aid = 2` are parsed once.

use super::{classify, SqlError, Statement};

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
pub(super) fn shape(sql: &str) -> Option<Box<[u8]>> {
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
