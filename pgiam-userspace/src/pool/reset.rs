//! What a backend is put through before another session may have it, sans I/O: the requests
//! that undo a session's state, and the reading of their answers into a verdict.
//!
//! `DISCARD ALL` undoes what a session can leave on its backend (settings, the role, prepared
//! statements, cursors, temporary tables, LISTEN, advisory locks, cached plans, sequence
//! state); the check after it asks the backend itself whether it is back to its login state,
//! so that a reset that did less than it should (an older server, an extension) closes the
//! backend rather than hand it on. Every name in the check is schema-qualified or a keyword:
//! the session that just left may have created functions and operators of the same names.

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use crate::upstream::Parameters;
use crate::wire::{self, BackendMessage, TransactionStatus};

/// Why a backend was not put back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResetError {
    #[error("the server answered the reset with an error: {0}")]
    Server(String),
    #[error("the reset's answers were not what it asked for: {0}")]
    Unexpected(&'static str),
    #[error("the backend is not back to its login state: {0}")]
    Dirty(String),
}

/// One reset under way.
#[derive(Debug)]
pub struct Reset {
    login_role: String,
    nonce: String,
    /// ReadyForQuery answers still to come (one per query sent).
    ready_to_come: usize,
    checked: bool,
}

/// How far the reading has come.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    More,
    /// The backend is clean and idle.
    Clean,
}

impl Reset {
    /// The requests for a backend logged in as `login_role`, whose last word was that a
    /// transaction block is open (`in_block`) or not. `nonce` marks the check's answer, so
    /// that nothing the session left unread can pass for it.
    pub fn new(login_role: &str, in_block: bool, nonce: u64, out: &mut BytesMut) -> Reset {
        let nonce = format!("pgiam-reset-{nonce:016x}");
        let mut queries = Vec::new();
        // DISCARD ALL refuses to run inside a block; a failed block takes only ROLLBACK.
        if in_block {
            queries.push("ROLLBACK".to_owned());
        }
        queries.push("DISCARD ALL".to_owned());
        queries.push(check_query(&nonce));
        for q in &queries {
            frontend::query(q, out).expect("no NUL in pgiam's own queries");
        }
        Reset {
            login_role: login_role.to_owned(),
            nonce,
            ready_to_come: queries.len(),
            checked: false,
        }
    }

    /// Reads one server message. Reports the server makes as settings go back (ParameterStatus)
    /// are kept in `parameters`, which then say what the next session is greeted with.
    pub fn step(
        &mut self,
        tag: u8,
        body: &[u8],
        parameters: &mut Parameters,
    ) -> Result<Progress, ResetError> {
        let message = wire::decode_backend(tag, body)
            .map_err(|_| ResetError::Unexpected("a malformed message"))?;
        match message {
            BackendMessage::ErrorResponse(fields) => Err(ResetError::Server(
                fields.get_str(b'M').unwrap_or("?").to_owned(),
            )),
            BackendMessage::ParameterStatus { name, value } => {
                parameters.set(name, value);
                Ok(Progress::More)
            }
            // What the session left unread: notifications, notices.
            BackendMessage::NotificationResponse { .. } | BackendMessage::NoticeResponse(_) => {
                Ok(Progress::More)
            }
            BackendMessage::CommandComplete { .. } | BackendMessage::RowDescription { .. } => {
                Ok(Progress::More)
            }
            BackendMessage::DataRow { .. } => {
                if self.checked || self.ready_to_come != 1 {
                    return Err(ResetError::Unexpected("a row before the check"));
                }
                self.judge(
                    &wire::data_row_values(body)
                        .map_err(|_| ResetError::Unexpected("a malformed DataRow"))?,
                )?;
                self.checked = true;
                Ok(Progress::More)
            }
            BackendMessage::ReadyForQuery(status) => {
                self.ready_to_come = self
                    .ready_to_come
                    .checked_sub(1)
                    .ok_or(ResetError::Unexpected("more answers than queries"))?;
                if self.ready_to_come > 0 {
                    return Ok(Progress::More);
                }
                if !self.checked {
                    return Err(ResetError::Unexpected("the check returned no row"));
                }
                if status != TransactionStatus::Idle {
                    return Err(ResetError::Dirty("a transaction is still open".into()));
                }
                Ok(Progress::Clean)
            }
            _ => Err(ResetError::Unexpected(
                "a message no reset query answers with",
            )),
        }
    }

    fn judge(&self, row: &[Option<&[u8]>]) -> Result<(), ResetError> {
        let text = |i: usize| {
            row.get(i)
                .copied()
                .flatten()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
        };
        if row.len() != CHECKS.len() + 3 || text(0) != self.nonce {
            return Err(ResetError::Unexpected("the check's row is not the check's"));
        }
        let (current, session) = (text(1), text(2));
        if current != self.login_role || session != self.login_role {
            return Err(ResetError::Dirty(format!(
                "current_user {current:?} and session_user {session:?}, not the login role {:?}",
                self.login_role
            )));
        }
        let held: Vec<String> = CHECKS
            .iter()
            .enumerate()
            .filter(|(i, _)| text(i + 3) != "0")
            .map(|(i, (what, _))| format!("{what}: {}", text(i + 3)))
            .collect();
        if !held.is_empty() {
            return Err(ResetError::Dirty(held.join(", ")));
        }
        Ok(())
    }
}

/// What must be gone, and how the backend counts it.
const CHECKS: &[(&str, &str)] = &[
    (
        "temporary relations",
        "pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()",
    ),
    ("listened channels", "pg_catalog.pg_listening_channels()"),
    // Advisory locks are the only ones a session holds past its transactions (the check's
    // own catalog reads hold locks of other kinds while it runs).
    (
        "advisory locks held",
        "pg_catalog.pg_locks WHERE pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() \
         AND locktype OPERATOR(pg_catalog.=) 'advisory'",
    ),
    ("prepared statements", "pg_catalog.pg_prepared_statements"),
    ("open cursors", "pg_catalog.pg_cursors"),
];

fn check_query(nonce: &str) -> String {
    let counts: Vec<String> = CHECKS
        .iter()
        .map(|(_, from)| format!("(SELECT pg_catalog.count(*) FROM {from})"))
        .collect();
    format!(
        "SELECT '{nonce}', current_user, session_user, {}",
        counts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server message: its tag and body.
    type Frame = (u8, Vec<u8>);

    fn frame(tag: u8, body: &[u8]) -> Frame {
        (tag, body.to_vec())
    }

    fn data_row(values: &[&str]) -> (u8, Vec<u8>) {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v.as_bytes());
        }
        frame(b'D', &b)
    }

    fn ready(status: u8) -> (u8, Vec<u8>) {
        frame(b'Z', &[status])
    }

    fn complete(tag: &str) -> (u8, Vec<u8>) {
        let mut b = tag.as_bytes().to_vec();
        b.push(0);
        frame(b'C', &b)
    }

    fn run(reset: &mut Reset, answers: &[(u8, Vec<u8>)]) -> Result<Progress, ResetError> {
        let mut params = Parameters::default();
        let mut last = Progress::More;
        for (tag, body) in answers {
            last = reset.step(*tag, body, &mut params)?;
        }
        Ok(last)
    }

    fn clean_row(nonce: &str, role: &str) -> (u8, Vec<u8>) {
        data_row(&[nonce, role, role, "0", "0", "0", "0", "0"])
    }

    #[test]
    fn a_clean_backend_passes_and_an_open_block_is_rolled_back_first() {
        let mut out = BytesMut::new();
        let mut r = Reset::new("app", true, 7, &mut out);
        let sent = String::from_utf8_lossy(&out).into_owned();
        assert!(
            sent.contains("ROLLBACK") && sent.contains("DISCARD ALL"),
            "{sent}"
        );
        let nonce = r.nonce.clone();
        let answers = [
            complete("ROLLBACK"),
            ready(b'I'),
            complete("DISCARD ALL"),
            ready(b'I'),
            clean_row(&nonce, "app"),
            complete("SELECT 1"),
            ready(b'I'),
        ];
        assert_eq!(run(&mut r, &answers), Ok(Progress::Clean));

        let mut out = BytesMut::new();
        let r = Reset::new("app", false, 7, &mut out);
        assert_eq!(r.ready_to_come, 2, "no ROLLBACK outside a block");
    }

    #[test]
    fn anything_left_behind_or_out_of_place_keeps_the_backend_from_the_pool() {
        let mut out = BytesMut::new();
        let fresh = || Reset::new("app", false, 9, &mut BytesMut::new());
        let nonce = Reset::new("app", false, 9, &mut out).nonce;
        let prefix = [complete("DISCARD ALL"), ready(b'I')];
        let with_row = |row: (u8, Vec<u8>), status: u8| {
            let mut a = prefix.to_vec();
            a.extend([row, complete("SELECT 1"), ready(status)]);
            a
        };
        let cases: Vec<(&str, Vec<Frame>)> = vec![
            (
                "another role",
                with_row(
                    data_row(&[&nonce, "boss", "app", "0", "0", "0", "0", "0"]),
                    b'I',
                ),
            ),
            (
                "a temp table",
                with_row(
                    data_row(&[&nonce, "app", "app", "1", "0", "0", "0", "0"]),
                    b'I',
                ),
            ),
            (
                "a channel",
                with_row(
                    data_row(&[&nonce, "app", "app", "0", "1", "0", "0", "0"]),
                    b'I',
                ),
            ),
            (
                "a lock",
                with_row(
                    data_row(&[&nonce, "app", "app", "0", "0", "2", "0", "0"]),
                    b'I',
                ),
            ),
            (
                "a prepared statement",
                with_row(
                    data_row(&[&nonce, "app", "app", "0", "0", "0", "1", "0"]),
                    b'I',
                ),
            ),
            (
                "a cursor",
                with_row(
                    data_row(&[&nonce, "app", "app", "0", "0", "0", "0", "1"]),
                    b'I',
                ),
            ),
            (
                "another nonce",
                with_row(clean_row("pgiam-reset-0000000000000000", "app"), b'I'),
            ),
            ("still in a block", with_row(clean_row(&nonce, "app"), b'T')),
            (
                "no row",
                vec![
                    complete("DISCARD ALL"),
                    ready(b'I'),
                    complete("SELECT 0"),
                    ready(b'I'),
                ],
            ),
            (
                "an error",
                vec![frame(
                    b'E',
                    b"SERROR\0C25001\0Mcannot run inside a transaction block\0\0",
                )],
            ),
            ("an extra answer", {
                let mut a = with_row(clean_row(&nonce, "app"), b'I');
                a.insert(0, ready(b'I'));
                a
            }),
            ("a row the session left unread", {
                let mut a = with_row(clean_row(&nonce, "app"), b'I');
                a.insert(0, data_row(&["x"]));
                a
            }),
        ];
        for (what, answers) in cases {
            let mut r = fresh();
            assert_ne!(run(&mut r, &answers), Ok(Progress::Clean), "{what}");
        }
    }

    #[test]
    fn settings_going_back_are_kept_and_notifications_left_unread_are_passed_over() {
        let mut out = BytesMut::new();
        let mut r = Reset::new("app", false, 1, &mut out);
        let nonce = r.nonce.clone();
        let mut params = Parameters::default();
        params.set(b"DateStyle", b"SQL, DMY");
        let notify = frame(b'A', b"\0\0\0\x07chan\0payload\0");
        let status = frame(b'S', b"DateStyle\0ISO, MDY\0");
        for (tag, body) in [
            notify,
            complete("DISCARD ALL"),
            status,
            ready(b'I'),
            clean_row(&nonce, "app"),
            complete("SELECT 1"),
        ] {
            assert_eq!(r.step(tag, &body, &mut params), Ok(Progress::More));
        }
        let (tag, body) = ready(b'I');
        assert_eq!(r.step(tag, &body, &mut params), Ok(Progress::Clean));
        assert_eq!(params.get("DateStyle"), Some("ISO, MDY"));
    }

    #[test]
    fn the_check_names_nothing_a_session_could_shadow() {
        let q = check_query("n");
        for word in [
            "count(",
            "pg_class",
            "pg_locks",
            "pg_my_temp_schema",
            "pg_backend_pid",
        ] {
            for (at, _) in q.match_indices(word) {
                assert!(
                    q[..at].ends_with("pg_catalog."),
                    "{word} at {at} is not schema-qualified: {q}"
                );
            }
        }
        assert!(!q.contains(" = "), "operators are qualified: {q}");
    }
}
