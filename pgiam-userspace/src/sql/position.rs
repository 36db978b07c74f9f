//! Where in a statement PostgreSQL's parser stopped: the `Position` of a syntax error.
//!
//! The `pg_query` crate turns a parse error into its message alone; libpg_query's own error
//! carries the cursor position too, and clients point at it (psql's caret, asyncpg's
//! position). The library is linked into pgiam through that crate, so its entry point is
//! declared here for the one field the crate drops. Called only for statements that failed
//! to parse, never on the hot path.

use std::ffi::CString;
use std::os::raw::{c_char, c_int};

#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryProtobuf {
    len: usize,
    data: *mut c_char,
}

#[repr(C)]
struct PgQueryProtobufParseResult {
    parse_tree: PgQueryProtobuf,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

extern "C" {
    fn pg_query_parse_protobuf_opts(
        input: *const c_char,
        options: c_int,
    ) -> PgQueryProtobufParseResult;
    fn pg_query_free_protobuf_parse_result(result: PgQueryProtobufParseResult);
}

/// The 1-based character position PostgreSQL reports for the parse error in `sql` (as the
/// ErrorResponse `P` field), or `None` when it parses or the error has no position.
pub fn syntax_error_position(sql: &str, options: pg_query::ParserOptions) -> Option<u32> {
    let input = CString::new(sql).ok()?;
    // SAFETY: libpg_query reads the NUL-terminated input and returns a result it allocated,
    // which is read here once and handed back to its own free function.
    unsafe {
        let result = pg_query_parse_protobuf_opts(input.as_ptr(), options.bits());
        let position = if result.error.is_null() {
            None
        } else {
            u32::try_from((*result.error).cursorpos)
                .ok()
                .filter(|p| *p > 0)
        };
        pg_query_free_protobuf_parse_result(result);
        position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters_from_one_as_postgresql_does() {
        let o = pg_query::ParserOptions::DEFAULT;
        assert_eq!(syntax_error_position("SELECT 1 FROM", o), Some(14));
        assert_eq!(syntax_error_position("SELEC 1", o), Some(1));
        // Characters, not bytes: 'é' is two bytes in UTF-8 but one character ("FORM" is an
        // alias; the error is at "t", the 17th character and the 18th byte).
        assert_eq!(syntax_error_position("SELECT 'é' FORM t", o), Some(17));
        assert_eq!(syntax_error_position("SELECT 1", o), None);
    }
}
