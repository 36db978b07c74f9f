//! Sans-I/O codec for the PostgreSQL frontend/backend protocol 3.0.
//!
//! pgiam frames every message itself: a frame is a tag byte and a big-endian `i32` length that
//! counts itself. Framing only peeks at headers, so a relay can hand whole runs of complete
//! messages to the other side with `BytesMut::split_to` and no copy. Typed views
//! ([`FrontendMessage`], [`BackendMessage`]) borrow from the frame body and validate its
//! structure; they allocate nothing.
//!
//! postgres-protocol serializes the frontend messages pgiam itself sends upstream; the few
//! backend messages pgiam writes to clients are encoded here.
//!
//! This file holds the framing and the body readers every message shares; the startup phase,
//! frontend and backend messages and the encoders are submodules, re-exported as `wire::*`.

use bytes::{Buf, BytesMut};

/// Request codes carried in the version field of an untagged startup-phase packet.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// Protocol 3.0: the only version pgiam speaks; newer 3.x minors are negotiated down to it.
pub const PROTOCOL_3_0: i32 = 3 << 16;

/// PostgreSQL's own cap on startup packets (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// First byte of a TLS record carrying a handshake: a PostgreSQL 17 "direct SSL" client starts
/// its connection with a ClientHello instead of an SSLRequest.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("invalid message length {0}: a length counts itself and must be at least 4")]
    BadLength(i64),
    #[error("invalid startup packet length {0}: must be between 8 and {MAX_STARTUP_PACKET}")]
    BadStartupLength(i64),
    #[error("message of {len} bytes exceeds the maximum message size of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported frontend protocol {major}.{minor}: pgiam speaks 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("unknown frontend message type {:?}", char::from(*.0))]
    UnknownFrontendTag(u8),
    #[error("unknown backend message type {:?}", char::from(*.0))]
    UnknownBackendTag(u8),
    #[error("malformed {what} message: {detail}")]
    Malformed {
        what: &'static str,
        detail: &'static str,
    },
}

fn malformed(what: &'static str, detail: &'static str) -> WireError {
    WireError::Malformed { what, detail }
}

mod backend;
mod encode;
mod frontend;
mod startup;
#[cfg(test)]
mod tests;

pub use backend::*;
pub use encode::*;
pub use frontend::*;
pub use startup::*;

// ---------------------------------------------------------------------------------------------
// Framing of tagged messages
// ---------------------------------------------------------------------------------------------

/// The header of one tagged message at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Whole message size on the wire: tag + length field + body.
    pub total: usize,
}

impl Header {
    pub fn body_len(&self) -> usize {
        self.total - 5
    }
}

/// Peeks at the header at `buf[0..5]`; `Ok(None)` if fewer than 5 bytes are buffered.
#[inline]
pub fn peek_header(buf: &[u8], max_message_size: usize) -> Result<Option<Header>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::BadLength(len.into()));
    }
    let total = len as usize + 1;
    if total > max_message_size {
        return Err(WireError::TooLarge {
            len: total,
            max: max_message_size,
        });
    }
    Ok(Some(Header { tag: buf[0], total }))
}

/// Splits one complete message off the front of `buf`: `(tag, body)`.
pub fn next_message(
    buf: &mut BytesMut,
    max_message_size: usize,
) -> Result<Option<(u8, BytesMut)>, WireError> {
    match peek_header(buf, max_message_size)? {
        Some(h) if buf.len() >= h.total => {
            let mut msg = buf.split_to(h.total);
            msg.advance(5);
            Ok(Some((h.tag, msg)))
        }
        _ => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------
// Body readers
// ---------------------------------------------------------------------------------------------

fn take_cstr<'a>(body: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], WireError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed(what, "missing NUL terminator"))?;
    let s = &body[..nul];
    *body = &body[nul + 1..];
    Ok(s)
}

fn take<'a>(body: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
    if body.len() < n {
        return Err(malformed(what, "truncated"));
    }
    let (head, rest) = body.split_at(n);
    *body = rest;
    Ok(head)
}

fn take_i16(body: &mut &[u8], what: &'static str) -> Result<i16, WireError> {
    let b = take(body, 2, what)?;
    Ok(i16::from_be_bytes([b[0], b[1]]))
}

fn take_i32(body: &mut &[u8], what: &'static str) -> Result<i32, WireError> {
    let b = take(body, 4, what)?;
    Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_u8(body: &mut &[u8], what: &'static str) -> Result<u8, WireError> {
    Ok(take(body, 1, what)?[0])
}

fn take_count(body: &mut &[u8], what: &'static str) -> Result<usize, WireError> {
    let n = take_i16(body, what)?;
    usize::try_from(n).map_err(|_| malformed(what, "negative count"))
}

/// A length-prefixed value: `-1` is NULL.
fn take_value<'a>(body: &mut &'a [u8], what: &'static str) -> Result<Option<&'a [u8]>, WireError> {
    match take_i32(body, what)? {
        -1 => Ok(None),
        n if n < 0 => Err(malformed(what, "negative value length")),
        n => take(body, n as usize, what).map(Some),
    }
}

/// A DataRow's values (its body, after the tag and length), NULL as `None`.
pub fn data_row_values(body: &[u8]) -> Result<Vec<Option<&[u8]>>, WireError> {
    const W: &str = "DataRow";
    let mut b = body;
    let n = take_count(&mut b, W)?;
    let values = (0..n)
        .map(|_| take_value(&mut b, W))
        .collect::<Result<Vec<_>, _>>()?;
    finish(b, W)?;
    Ok(values)
}

fn take_formats<'a>(body: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], WireError> {
    let n = take_count(body, what)?;
    let formats = take(body, n * 2, what)?;
    if formats.chunks_exact(2).any(|f| f != [0, 0] && f != [0, 1]) {
        return Err(malformed(what, "format code other than 0 or 1"));
    }
    Ok(formats)
}

fn finish(body: &[u8], what: &'static str) -> Result<(), WireError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(malformed(what, "trailing bytes"))
    }
}
