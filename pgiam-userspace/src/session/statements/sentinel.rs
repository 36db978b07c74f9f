//! The statements that stand in for refused ones: what pgiam forwards in a refused message's
//! place, so that the pipeline fails exactly where the refused message would have run.

use bytes::{Bytes, BytesMut};

/// The name a refused named Parse is sent under (the client's name must not be created, nor
/// an existing statement of that name dropped).
pub(super) const SENTINEL_NAME: &str = "pgiam_refused";

/// What the server answers a sentinel with: its parse analysis casts the literal, and no text
/// that says "refused" is an integer. (Inside a failed transaction it is 25P02 instead, which
/// the client sees as the server would have said it about the statement.)
pub const SENTINEL_SQLSTATE: &str = "22P02";

/// The statement that stands in for a refused one. It fails in parse analysis, so it fails at
/// exactly the point the refused message would have run, in every protocol route, and does
/// nothing else; its type is schema-qualified so that no search_path can change what it casts
/// to. The server's log then reads `invalid input syntax for type integer: "pgiam: statement
/// refused by policy, audit record …"` with this text as the STATEMENT: a DBA sees pgiam's
/// refusal and the record to look up, not a syntax error.
fn sentinel_sql(record: Option<&str>) -> String {
    match record {
        Some(id) => format!(
            "SELECT 'pgiam: statement refused by policy, audit record {id}'::pg_catalog.int4"
        ),
        None => "SELECT 'pgiam: statement refused by policy'::pg_catalog.int4".into(),
    }
}

pub(super) fn sentinel_query(record: Option<&str>) -> Bytes {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::query(&sentinel_sql(record), &mut b).expect("no NUL");
    b.freeze()
}

pub(super) fn sentinel_parse(name: &str, record: Option<&str>) -> Bytes {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::parse(
        name,
        &sentinel_sql(record),
        std::iter::empty(),
        &mut b,
    )
    .expect("no NUL");
    b.freeze()
}
