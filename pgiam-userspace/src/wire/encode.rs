//! Backend encoders: the messages pgiam itself writes to clients.

use bytes::{BufMut, BytesMut};

use super::TransactionStatus;

/// Writes a tagged message whose body `fill` appends, patching in the length afterwards.
fn write_message(buf: &mut BytesMut, tag: u8, fill: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    fill(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    // A NUL inside a field would end it early and let the rest be read as other fields.
    buf.extend(s.iter().map(|&b| if b == 0 { b'?' } else { b }));
    buf.put_u8(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Severity::Error => b"ERROR",
            Severity::Fatal => b"FATAL",
        }
    }
}

/// An error pgiam reports to a client in its own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    /// Five-character SQLSTATE.
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Where in the statement text the error is: 1-based, in characters (the `P` field).
    pub position: Option<u32>,
}

impl PgError {
    /// An error that ends the statement, not the session.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            code,
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_position(mut self, position: Option<u32>) -> Self {
        self.position = position;
        self
    }

    /// Adds the audit record id to the hint, where an operator's lookup starts.
    pub fn with_audit_id(mut self, id: &str) -> Self {
        let note = format!("pgiam audit record {id}");
        self.hint = Some(match self.hint.take() {
            Some(h) => format!("{h} ({note})"),
            None => note,
        });
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let position = self.position.map(|p| p.to_string());
        write_message(buf, b'E', |b| {
            for (code, value) in [
                (b'S', Some(self.severity.as_bytes())),
                (b'V', Some(self.severity.as_bytes())),
                (b'C', Some(self.code.as_bytes())),
                (b'M', Some(self.message.as_bytes())),
                (b'D', self.detail.as_deref().map(str::as_bytes)),
                (b'H', self.hint.as_deref().map(str::as_bytes)),
                (b'P', position.as_deref().map(str::as_bytes)),
            ] {
                if let Some(value) = value {
                    b.put_u8(code);
                    put_cstr(b, value);
                }
            }
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

/// A Terminate message, whole.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

pub fn authentication_ok(buf: &mut BytesMut) {
    write_message(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_cleartext_password(buf: &mut BytesMut) {
    write_message(buf, b'R', |b| b.put_i32(3));
}

pub fn parameter_status(name: &[u8], value: &[u8], buf: &mut BytesMut) {
    write_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn command_complete(tag: &[u8], buf: &mut BytesMut) {
    write_message(buf, b'C', |b| put_cstr(b, tag));
}

pub fn backend_key_data(process_id: i32, secret_key: i32, buf: &mut BytesMut) {
    write_message(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn ready_for_query(status: TransactionStatus, buf: &mut BytesMut) {
    write_message(buf, b'Z', |b| {
        b.put_u8(match status {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        })
    });
}

pub fn negotiate_protocol_version(newest_minor: i32, unrecognized: &[&str], buf: &mut BytesMut) {
    write_message(buf, b'v', |b| {
        b.put_i32(newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for option in unrecognized {
            put_cstr(b, option.as_bytes());
        }
    });
}
