//! Properties of the sans-I/O parts on input nobody wrote by hand (proptest, stable Rust):
//! the startup, frontend and backend decoders never panic on any bytes, and the classifier
//! never panics on any text and finds exactly the relations of grammar-shaped SQL built with
//! known tables. `cargo xtask test` runs a short round; `cargo xtask fuzz --minutes N` runs
//! rounds until the time is up. A failing input is kept in `proptest-regressions/` and runs
//! first from then on.

use std::collections::BTreeSet;

use bytes::BytesMut;
use proptest::prelude::*;

use crate::sql::{self, Access};
use crate::wire;

/// Bytes that start like protocol traffic more often than uniform noise does: a tag from
/// the protocol's set, a length near the body's.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    let tags = prop::sample::select(b"QPBEDCSHFXdcfpRNKZTAnItsGW123v".to_vec());
    (tags, prop::collection::vec(any::<u8>(), 0..64), -8i32..80).prop_map(|(tag, body, skew)| {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() as i32 + 4).saturating_add(skew - 8)).to_be_bytes());
        out.extend_from_slice(&body);
        out
    })
}

fn traffic() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(framed(), 0..8).prop_map(|m| m.concat()),
    ]
}

/// Table names the generated SQL uses, and so what the classifier must find.
fn table() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["accounts", "orders", "items", "t_1", "payments"])
        .prop_map(str::to_owned)
}

/// A SELECT over 1–3 of the tables, joined, filtered by a sub-query on another, maybe locking.
fn select() -> impl Strategy<Value = (String, BTreeSet<(String, Access)>)> {
    (
        prop::collection::vec(table(), 1..4),
        prop::option::of(table()),
        any::<bool>(),
    )
        .prop_map(|(from, sub, lock)| {
            let mut sql = format!("SELECT * FROM {}", from[0]);
            for t in &from[1..] {
                sql.push_str(&format!(" JOIN {t} ON true"));
            }
            if let Some(s) = &sub {
                sql.push_str(&format!(" WHERE EXISTS (SELECT 1 FROM {s})"));
            }
            if lock {
                sql.push_str(" FOR UPDATE");
            }
            let mut want: BTreeSet<(String, Access)> = BTreeSet::new();
            for t in from.iter().chain(&sub) {
                want.insert((t.clone(), Access::Select));
                if lock {
                    want.insert((t.clone(), Access::Lock));
                }
            }
            (sql, want)
        })
}

/// A data-changing statement on one table reading another.
fn change() -> impl Strategy<Value = (String, BTreeSet<(String, Access)>)> {
    (0..3usize, table(), table()).prop_map(|(kind, target, read)| {
        let (sql, access) = match kind {
            0 => (
                format!("INSERT INTO {target} SELECT * FROM {read}"),
                Access::Insert,
            ),
            1 => (
                format!("UPDATE {target} SET x = 1 FROM {read} WHERE true"),
                Access::Update,
            ),
            _ => (
                format!("DELETE FROM {target} USING {read} WHERE true"),
                Access::Delete,
            ),
        };
        let want = [(target, access), (read, Access::Select)]
            .into_iter()
            .collect();
        (sql, want)
    })
}

fn relations(sql: &str) -> BTreeSet<(String, Access)> {
    sql::classify(sql, true)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .flat_map(|s| s.relations)
        .map(|r| (r.name.name, r.access))
        .collect()
}

proptest! {
    #[test]
    fn the_startup_decoder_never_panics_and_takes_only_what_it_decodes(bytes in traffic()) {
        let mut buf = BytesMut::from(&bytes[..]);
        match wire::decode_startup(&mut buf) {
            Ok(None) => prop_assert_eq!(&buf[..], &bytes[..]),
            Ok(Some(_)) => prop_assert!(buf.len() < bytes.len()),
            Err(_) => {}
        }
    }

    #[test]
    fn frontend_framing_and_decoding_never_panic(bytes in traffic()) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = wire::check_frontend_start(&buf, 1 << 20);
        while let Ok(Some((tag, body))) = wire::next_message(&mut buf, 1 << 20) {
            let _ = wire::decode_frontend(tag, &body);
        }
    }

    #[test]
    fn backend_decoding_never_panics(tag in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = wire::decode_backend(tag, &body);
    }

    #[test]
    fn the_classifier_never_panics_on_any_text(text in "\\PC{0,80}") {
        let _ = sql::classify(&text, true);
        let _ = sql::classify(&text, false);
    }

    #[test]
    fn the_classifier_never_panics_on_sql_shaped_text(
        words in prop::collection::vec(prop::sample::select(vec![
            "SELECT", "*", "FROM", "t", "WHERE", "(", ")", ",", ";", "'x'", "$1", "FOR", "UPDATE",
            "WITH", "AS", "INSERT", "INTO", "VALUES", "DELETE", "SET", "ROLE", "COPY", "DO", "$$",
            "E'\\\\'", "U&\"a\"", "--", "/*", "*/", "current_setting", "SHOW", "ALL", "pg_settings",
        ]), 0..24)
    ) {
        let _ = sql::classify(&words.join(" "), true);
    }

    #[test]
    fn a_select_s_relations_are_the_tables_it_reads_and_locks((sql, want) in select()) {
        prop_assert_eq!(relations(&sql), want, "{}", sql);
    }

    #[test]
    fn a_change_s_relations_are_its_target_and_what_it_reads((sql, want) in change()) {
        prop_assert_eq!(relations(&sql), want, "{}", sql);
    }
}
