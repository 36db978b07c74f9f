//! What a transaction-pooled session's prepared statements need on the backend it lands on,
//! without I/O.
//!
//! Between two transactions a session may change backends, and the backend it lands on holds
//! whatever the last sessions of its principal left under each statement name. Before a
//! message that uses a name is forwarded, the backend is brought to hold exactly what the
//! session holds under it (as PgBouncer ≥ 1.21 re-prepares): pgiam's own Close of the
//! backend's statement and Parse of the session's, the very Parse the client sent and pgiam
//! authorized. Their answers are pgiam's (hidden from the client), their errors the
//! client's. What runs is decided at Execute, as always, against the plan the session's gate
//! holds: the Parse sent again is that plan's text.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use super::statements::ExpectKind;
use crate::wire::{FrontendMessage, Target};

pub use crate::pool::Held;

/// The session's own prepared statements, as the Parse messages that created them.
#[derive(Debug, Default)]
pub struct Carried {
    named: HashMap<Vec<u8>, Bytes>,
    /// The last Parse of the unnamed statement (`None`: there is none).
    unnamed: Option<Bytes>,
    /// The backend's unnamed statement is the session's: it was parsed on this backend since
    /// the session landed on it.
    unnamed_here: bool,
}

impl Carried {
    /// The session has landed on another backend.
    pub fn landed(&mut self) {
        self.unnamed_here = false;
    }

    /// What to send ahead of `message` (a hidden Close or Parse, with the answer each is
    /// owed) so that the backend holds what the session holds under the name it uses.
    pub fn ahead_of(
        &mut self,
        message: &FrontendMessage<'_>,
        held: &mut Held,
    ) -> Vec<(ExpectKind, Bytes)> {
        let name = match *message {
            FrontendMessage::Parse { name, .. } => name,
            FrontendMessage::Bind { statement, .. } => statement,
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            }
            | FrontendMessage::Close {
                target: Target::Statement,
                name,
            } => name,
            _ => return Vec::new(),
        };
        if name.is_empty() {
            // A Parse makes its own; a Close of it needs none.
            let uses = matches!(
                message,
                FrontendMessage::Bind { .. } | FrontendMessage::Describe { .. }
            );
            return match (&self.unnamed, uses && !self.unnamed_here) {
                (Some(parse), true) => {
                    self.unnamed_here = true;
                    vec![(ExpectKind::Reparse, parse.clone())]
                }
                _ => Vec::new(),
            };
        }
        let want = self.named.get(name);
        let have = held.get(name);
        if want == have {
            return Vec::new();
        }
        let mut ahead = Vec::new();
        if have.is_some() {
            ahead.push((ExpectKind::Preclose, close_statement(name)));
        }
        match want {
            Some(parse) => {
                ahead.push((ExpectKind::Reparse, parse.clone()));
                held.insert(name.to_vec(), parse.clone());
            }
            None => {
                held.remove(name);
            }
        }
        ahead
    }

    /// What `message` (`frame`: its bytes) did once forwarded, as it was (`authorized`) or
    /// as the sentinel that stands in for it.
    pub fn forwarded(
        &mut self,
        message: &FrontendMessage<'_>,
        frame: &[u8],
        authorized: bool,
        held: &mut Held,
    ) {
        match *message {
            FrontendMessage::Parse { name: b"", .. } => {
                // A refused one is a failing Parse of the unnamed statement: none is left.
                self.unnamed = authorized.then(|| Bytes::copy_from_slice(frame));
                self.unnamed_here = true;
            }
            // A name the session holds already is refused by the server (42P05).
            FrontendMessage::Parse { name, .. } if authorized && !self.named.contains_key(name) => {
                let parse = Bytes::copy_from_slice(frame);
                self.named.insert(name.to_vec(), parse.clone());
                held.insert(name.to_vec(), parse);
            }
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } => {
                if name.is_empty() {
                    self.unnamed = None;
                    self.unnamed_here = true;
                } else {
                    self.named.remove(name);
                    held.remove(name);
                }
            }
            // A simple Query drops the unnamed statement.
            FrontendMessage::Query { .. } => {
                self.unnamed = None;
                self.unnamed_here = true;
            }
            _ => {}
        }
    }

    /// The server did not create `name` after all.
    pub fn not_prepared(&mut self, name: &[u8], held: &mut Held) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(name);
            held.remove(name);
        }
    }
}

/// A Close of the statement `name` (its bytes as the client gave them: any encoding).
fn close_statement(name: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(name.len() + 7);
    b.extend_from_slice(b"C");
    b.extend_from_slice(&((name.len() + 6) as i32).to_be_bytes());
    b.extend_from_slice(b"S");
    b.extend_from_slice(name);
    b.extend_from_slice(b"\0");
    b.freeze()
}
