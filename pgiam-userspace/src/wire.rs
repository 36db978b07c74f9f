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

use bytes::{Buf, BufMut, BytesMut};

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

// ---------------------------------------------------------------------------------------------
// Startup phase
// ---------------------------------------------------------------------------------------------

/// A decoded untagged startup-phase packet.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { process_id: i32, secret_key: i32 },
    Startup(StartupMessage),
}

#[derive(Debug, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor: u16,
    /// Parameters in the order the client sent them.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes one startup-phase packet from the front of `buf`, consuming it.
///
/// Returns `Ok(None)` when more bytes are needed. The packet may not exceed
/// [`MAX_STARTUP_PACKET`], so a client cannot make pgiam buffer without bound before it is known.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(WireError::BadStartupLength(len.into()));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    match code {
        SSL_REQUEST_CODE if packet.is_empty() => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST_CODE if packet.is_empty() => Ok(Some(StartupPacket::GssEncRequest)),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(malformed(
            "SSLRequest",
            "unexpected bytes after the request code",
        )),
        CANCEL_REQUEST_CODE => {
            // Protocol 3.2 allows keys up to 256 bytes; pgiam hands out 3.0 keys (4 bytes) only,
            // so anything else cannot be one of ours.
            if packet.len() != 8 {
                return Err(malformed("CancelRequest", "length must be 16"));
            }
            let process_id = packet.get_i32();
            let secret_key = packet.get_i32();
            Ok(Some(StartupPacket::Cancel {
                process_id,
                secret_key,
            }))
        }
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != 3 {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
            let params = decode_startup_params(&packet)?;
            Ok(Some(StartupPacket::Startup(StartupMessage {
                minor,
                params,
            })))
        }
    }
}

fn decode_startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    const WHAT: &str = "StartupMessage";
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body, WHAT)?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut body, WHAT)?;
        let key = std::str::from_utf8(key)
            .map_err(|_| malformed(WHAT, "parameter name is not valid UTF-8"))?;
        let value = std::str::from_utf8(value)
            .map_err(|_| malformed(WHAT, "parameter value is not valid UTF-8"))?;
        if params.iter().any(|(k, _)| k == key) {
            return Err(malformed(WHAT, "duplicate parameter"));
        }
        params.push((key.to_owned(), value.to_owned()));
    }
    if !body.is_empty() {
        return Err(malformed(WHAT, "bytes after the terminating NUL"));
    }
    Ok(params)
}

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

// ---------------------------------------------------------------------------------------------
// Frontend messages
// ---------------------------------------------------------------------------------------------

/// `Describe` and `Close` target a prepared statement (`S`) or a portal (`P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// A validated view of one tagged frontend message.
#[derive(Debug, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query {
        sql: &'a [u8],
    },
    Parse {
        name: &'a [u8],
        sql: &'a [u8],
        param_types: usize,
    },
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
        params: usize,
    },
    Describe {
        target: Target,
        name: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        max_rows: i32,
    },
    Close {
        target: Target,
        name: &'a [u8],
    },
    Sync,
    Flush,
    FunctionCall {
        function_oid: u32,
        args: usize,
    },
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail {
        message: &'a [u8],
    },
    Terminate,
    /// `p`: PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse; which one only
    /// the authentication exchange in progress can tell (see [`decode_sasl_initial`]).
    AuthResponse(&'a [u8]),
}

impl FrontendMessage<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Query { .. } => "Query",
            Self::Parse { .. } => "Parse",
            Self::Bind { .. } => "Bind",
            Self::Describe { .. } => "Describe",
            Self::Execute { .. } => "Execute",
            Self::Close { .. } => "Close",
            Self::Sync => "Sync",
            Self::Flush => "Flush",
            Self::FunctionCall { .. } => "FunctionCall",
            Self::CopyData(_) => "CopyData",
            Self::CopyDone => "CopyDone",
            Self::CopyFail { .. } => "CopyFail",
            Self::Terminate => "Terminate",
            Self::AuthResponse(_) => "PasswordMessage",
        }
    }
}

fn target(b: u8, what: &'static str) -> Result<Target, WireError> {
    match b {
        b'S' => Ok(Target::Statement),
        b'P' => Ok(Target::Portal),
        _ => Err(malformed(what, "target must be 'S' or 'P'")),
    }
}

/// The message types [`decode_frontend`] knows.
const FRONTEND_TAGS: &[u8] = b"QPBDCESHXcdfFp";

/// Checks what a client sent first after its login, as far as it goes (a few bytes may be all
/// there is): an error for a message type or a length no frontend message has.
pub fn check_frontend_start(buf: &[u8], max_message_size: usize) -> Result<(), WireError> {
    match buf.first() {
        Some(tag) if !FRONTEND_TAGS.contains(tag) => Err(WireError::UnknownFrontendTag(*tag)),
        _ => peek_header(buf, max_message_size).map(|_| ()),
    }
}

/// Decodes and validates a frontend message body.
pub fn decode_frontend(tag: u8, mut body: &[u8]) -> Result<FrontendMessage<'_>, WireError> {
    let b = &mut body;
    let msg = match tag {
        b'Q' => {
            let sql = take_cstr(b, "Query")?;
            finish(b, "Query")?;
            FrontendMessage::Query { sql }
        }
        b'P' => {
            const W: &str = "Parse";
            let name = take_cstr(b, W)?;
            let sql = take_cstr(b, W)?;
            let param_types = take_count(b, W)?;
            take(b, param_types * 4, W)?;
            finish(b, W)?;
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            }
        }
        b'B' => {
            const W: &str = "Bind";
            let portal = take_cstr(b, W)?;
            let statement = take_cstr(b, W)?;
            let formats = take_formats(b, W)?.len() / 2;
            let params = take_count(b, W)?;
            if formats > 1 && formats != params {
                return Err(malformed(
                    W,
                    "parameter format count matches neither 1 nor the parameter count",
                ));
            }
            for _ in 0..params {
                take_value(b, W)?;
            }
            take_formats(b, W)?;
            finish(b, W)?;
            FrontendMessage::Bind {
                portal,
                statement,
                params,
            }
        }
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let target = target(take_u8(b, what)?, what)?;
            let name = take_cstr(b, what)?;
            finish(b, what)?;
            if tag == b'D' {
                FrontendMessage::Describe { target, name }
            } else {
                FrontendMessage::Close { target, name }
            }
        }
        b'E' => {
            const W: &str = "Execute";
            let portal = take_cstr(b, W)?;
            let max_rows = take_i32(b, W)?;
            finish(b, W)?;
            FrontendMessage::Execute { portal, max_rows }
        }
        b'S' => {
            finish(b, "Sync")?;
            FrontendMessage::Sync
        }
        b'H' => {
            finish(b, "Flush")?;
            FrontendMessage::Flush
        }
        b'X' => {
            finish(b, "Terminate")?;
            FrontendMessage::Terminate
        }
        b'c' => {
            finish(b, "CopyDone")?;
            FrontendMessage::CopyDone
        }
        b'd' => FrontendMessage::CopyData(body),
        b'f' => {
            let message = take_cstr(b, "CopyFail")?;
            finish(b, "CopyFail")?;
            FrontendMessage::CopyFail { message }
        }
        b'F' => {
            const W: &str = "FunctionCall";
            let function_oid = take_i32(b, W)? as u32;
            let formats = take_formats(b, W)?.len() / 2;
            let args = take_count(b, W)?;
            if formats > 1 && formats != args {
                return Err(malformed(
                    W,
                    "argument format count matches neither 1 nor the argument count",
                ));
            }
            for _ in 0..args {
                take_value(b, W)?;
            }
            let result_format = take_i16(b, W)?;
            if !(0..=1).contains(&result_format) {
                return Err(malformed(W, "result format other than 0 or 1"));
            }
            finish(b, W)?;
            FrontendMessage::FunctionCall { function_oid, args }
        }
        b'p' => FrontendMessage::AuthResponse(body),
        other => return Err(WireError::UnknownFrontendTag(other)),
    };
    Ok(msg)
}

/// Body of a SASLInitialResponse: `(mechanism, initial data)`.
pub fn decode_sasl_initial(mut body: &[u8]) -> Result<(&[u8], Option<&[u8]>), WireError> {
    const W: &str = "SASLInitialResponse";
    let mechanism = take_cstr(&mut body, W)?;
    let data = take_value(&mut body, W)?;
    finish(body, W)?;
    Ok((mechanism, data))
}

/// Body of a PasswordMessage: the password without its NUL.
pub fn decode_password(mut body: &[u8]) -> Result<&[u8], WireError> {
    const W: &str = "PasswordMessage";
    let password = take_cstr(&mut body, W)?;
    finish(body, W)?;
    Ok(password)
}

// ---------------------------------------------------------------------------------------------
// Backend messages
// ---------------------------------------------------------------------------------------------

/// Authentication request codes (`R` messages).
#[derive(Debug, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    KerberosV5,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Gss,
    GssContinue(&'a [u8]),
    Sspi,
    /// NUL-separated mechanism names, list terminated by an empty name.
    Sasl {
        mechanisms: Vec<&'a [u8]>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

/// A validated view of one backend message. Row data is not decoded: relaying it needs only
/// the frame.
#[derive(Debug, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    Authentication(Authentication<'a>),
    BackendKeyData {
        process_id: i32,
        secret_key: i32,
    },
    BindComplete,
    CloseComplete,
    CommandComplete {
        tag: &'a [u8],
    },
    CopyData(&'a [u8]),
    CopyDone,
    CopyInResponse {
        columns: usize,
    },
    CopyOutResponse {
        columns: usize,
    },
    CopyBothResponse {
        columns: usize,
    },
    DataRow {
        columns: usize,
    },
    EmptyQueryResponse,
    ErrorResponse(Fields<'a>),
    FunctionCallResponse(Option<&'a [u8]>),
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<&'a [u8]>,
    },
    NoData,
    NoticeResponse(Fields<'a>),
    NotificationResponse {
        process_id: i32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
    ParameterDescription {
        params: usize,
    },
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    ParseComplete,
    PortalSuspended,
    ReadyForQuery(TransactionStatus),
    RowDescription {
        columns: usize,
    },
}

/// The `(code, value)` fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    pub fn get_str(&self, code: u8) -> Option<&'a str> {
        self.get(code).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let code = *rest.first()?;
            if code == 0 {
                return None;
            }
            rest = &rest[1..];
            take_cstr(&mut rest, "fields").ok().map(|v| (code, v))
        })
    }

    fn parse(mut body: &'a [u8], what: &'static str) -> Result<Self, WireError> {
        let all = body;
        loop {
            match take_u8(&mut body, what)? {
                0 => break,
                _ => {
                    take_cstr(&mut body, what)?;
                }
            }
        }
        finish(body, what)?;
        Ok(Fields(all))
    }
}

fn copy_response(body: &mut &[u8], what: &'static str) -> Result<usize, WireError> {
    let format = take_u8(body, what)?;
    if format > 1 {
        return Err(malformed(what, "overall format other than 0 or 1"));
    }
    let columns = take_formats(body, what)?.len() / 2;
    finish(body, what)?;
    Ok(columns)
}

/// Decodes and validates a backend message body.
pub fn decode_backend(tag: u8, mut body: &[u8]) -> Result<BackendMessage<'_>, WireError> {
    use BackendMessage as M;
    let all = body;
    let b = &mut body;
    let msg = match tag {
        b'R' => {
            const W: &str = "Authentication";
            let code = take_i32(b, W)?;
            let auth = match code {
                0 => Authentication::Ok,
                2 => Authentication::KerberosV5,
                3 => Authentication::CleartextPassword,
                5 => {
                    let s = take(b, 4, W)?;
                    Authentication::Md5Password {
                        salt: [s[0], s[1], s[2], s[3]],
                    }
                }
                7 => Authentication::Gss,
                8 => return Ok(M::Authentication(Authentication::GssContinue(b))),
                9 => Authentication::Sspi,
                10 => {
                    let mut mechanisms = Vec::new();
                    loop {
                        let m = take_cstr(b, W)?;
                        if m.is_empty() {
                            break;
                        }
                        mechanisms.push(m);
                    }
                    Authentication::Sasl { mechanisms }
                }
                11 => return Ok(M::Authentication(Authentication::SaslContinue(b))),
                12 => return Ok(M::Authentication(Authentication::SaslFinal(b))),
                _ => return Err(malformed(W, "unknown authentication code")),
            };
            finish(b, W)?;
            M::Authentication(auth)
        }
        b'K' => {
            const W: &str = "BackendKeyData";
            let process_id = take_i32(b, W)?;
            let secret_key = take_i32(b, W)?;
            finish(b, W)?;
            M::BackendKeyData {
                process_id,
                secret_key,
            }
        }
        b'2' => {
            finish(b, "BindComplete")?;
            M::BindComplete
        }
        b'3' => {
            finish(b, "CloseComplete")?;
            M::CloseComplete
        }
        b'C' => {
            let tag = take_cstr(b, "CommandComplete")?;
            finish(b, "CommandComplete")?;
            M::CommandComplete { tag }
        }
        b'd' => M::CopyData(all),
        b'c' => {
            finish(b, "CopyDone")?;
            M::CopyDone
        }
        b'G' => M::CopyInResponse {
            columns: copy_response(b, "CopyInResponse")?,
        },
        b'H' => M::CopyOutResponse {
            columns: copy_response(b, "CopyOutResponse")?,
        },
        b'W' => M::CopyBothResponse {
            columns: copy_response(b, "CopyBothResponse")?,
        },
        b'D' => {
            const W: &str = "DataRow";
            let columns = take_count(b, W)?;
            for _ in 0..columns {
                take_value(b, W)?;
            }
            finish(b, W)?;
            M::DataRow { columns }
        }
        b'I' => {
            finish(b, "EmptyQueryResponse")?;
            M::EmptyQueryResponse
        }
        b'E' => M::ErrorResponse(Fields::parse(all, "ErrorResponse")?),
        b'N' => M::NoticeResponse(Fields::parse(all, "NoticeResponse")?),
        b'V' => {
            const W: &str = "FunctionCallResponse";
            let value = take_value(b, W)?;
            finish(b, W)?;
            M::FunctionCallResponse(value)
        }
        b'v' => {
            const W: &str = "NegotiateProtocolVersion";
            let newest_minor = take_i32(b, W)?;
            let n = take_i32(b, W)?;
            let n = usize::try_from(n).map_err(|_| malformed(W, "negative count"))?;
            let mut unrecognized = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                unrecognized.push(take_cstr(b, W)?);
            }
            finish(b, W)?;
            M::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        b'n' => {
            finish(b, "NoData")?;
            M::NoData
        }
        b'A' => {
            const W: &str = "NotificationResponse";
            let process_id = take_i32(b, W)?;
            let channel = take_cstr(b, W)?;
            let payload = take_cstr(b, W)?;
            finish(b, W)?;
            M::NotificationResponse {
                process_id,
                channel,
                payload,
            }
        }
        b't' => {
            const W: &str = "ParameterDescription";
            let params = take_count(b, W)?;
            take(b, params * 4, W)?;
            finish(b, W)?;
            M::ParameterDescription { params }
        }
        b'S' => {
            const W: &str = "ParameterStatus";
            let name = take_cstr(b, W)?;
            let value = take_cstr(b, W)?;
            finish(b, W)?;
            M::ParameterStatus { name, value }
        }
        b'1' => {
            finish(b, "ParseComplete")?;
            M::ParseComplete
        }
        b's' => {
            finish(b, "PortalSuspended")?;
            M::PortalSuspended
        }
        b'Z' => {
            const W: &str = "ReadyForQuery";
            let status = match take_u8(b, W)? {
                b'I' => TransactionStatus::Idle,
                b'T' => TransactionStatus::InTransaction,
                b'E' => TransactionStatus::Failed,
                _ => return Err(malformed(W, "unknown transaction status")),
            };
            finish(b, W)?;
            M::ReadyForQuery(status)
        }
        b'T' => {
            const W: &str = "RowDescription";
            let columns = take_count(b, W)?;
            for _ in 0..columns {
                take_cstr(b, W)?;
                // table oid, column number, type oid, type size, type modifier, format code
                take(b, 18, W)?;
            }
            finish(b, W)?;
            M::RowDescription { columns }
        }
        other => return Err(WireError::UnknownBackendTag(other)),
    };
    Ok(msg)
}

// ---------------------------------------------------------------------------------------------
// Backend encoders: the messages pgiam itself writes to clients
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    #[test]
    fn the_first_bytes_after_login_are_checked_against_every_frontend_type() {
        for tag in 0..=u8::MAX {
            let known = !matches!(
                decode_frontend(tag, &[]),
                Err(WireError::UnknownFrontendTag(_))
            );
            let checked = check_frontend_start(&[tag, 0, 0, 0, 4], 1 << 20);
            assert_eq!(checked.is_ok(), known, "message type {tag}");
        }
        assert!(
            check_frontend_start(b"Q", 1 << 20).is_ok(),
            "too short to tell"
        );
        assert!(matches!(
            check_frontend_start(&[b'Q', 0, 0, 0, 3], 1 << 20),
            Err(WireError::BadLength(3))
        ));
        assert!(matches!(
            check_frontend_start(&[b'Q', 0x7f, 0, 0, 0], 1 << 20),
            Err(WireError::TooLarge { .. })
        ));
    }

    fn startup(params: &[(&str, &str)]) -> BytesMut {
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf).unwrap();
        buf
    }

    #[test]
    fn startup_message_round_trip() {
        let mut buf = startup(&[("user", "alice"), ("database", "app")]);
        buf.extend_from_slice(b"extra");
        let Some(StartupPacket::Startup(m)) = decode_startup(&mut buf).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.minor, 0);
        assert_eq!(m.param("user"), Some("alice"));
        assert_eq!(m.param("database"), Some("app"));
        assert_eq!(&buf[..], b"extra", "only the packet is consumed");
    }

    #[test]
    fn startup_partial_needs_more() {
        let full = startup(&[("user", "alice")]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode_startup(&mut buf), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn startup_requests() {
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::SslRequest))
        );
        let mut buf = BytesMut::new();
        frontend::cancel_request(42, -7, &mut buf);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::Cancel {
                process_id: 42,
                secret_key: -7
            }))
        );
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30][..]);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::GssEncRequest))
        );
    }

    #[test]
    fn startup_rejects_bad_input() {
        for len in [0i32, 3, 4, 7, 10_001, -1] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            buf.extend_from_slice(&[0; 8]);
            assert!(
                matches!(
                    decode_startup(&mut buf),
                    Err(WireError::BadStartupLength(_))
                ),
                "length {len}"
            );
        }
        // An unknown request code with major version 1234.
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x99, 0x99][..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::UnsupportedProtocol { major: 1234, .. })
        ));
        // Protocol 2.0.
        let mut buf = BytesMut::from(&[0, 0, 0, 9, 0, 2, 0, 0, 0][..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::UnsupportedProtocol { major: 2, .. })
        ));
        // A Query as the first message: its tag is read as the high byte of a huge length.
        let mut buf = BytesMut::new();
        frontend::query("select 1", &mut buf).unwrap();
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::BadStartupLength(_))
        ));
        // Missing final NUL, and a duplicate parameter.
        let mut buf = BytesMut::from(&[0, 0, 0, 13, 0, 3, 0, 0, b'u', 0, b'x', 0, b'y'][..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::Malformed { .. })
        ));
        let mut buf = startup(&[("user", "a"), ("user", "b")]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::Malformed { .. })
        ));
        // Bytes trailing an SSLRequest inside its own length.
        let mut buf = BytesMut::from(&[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 1][..]);
        assert!(decode_startup(&mut buf).is_err());
    }

    #[test]
    fn protocol_3_2_is_decoded_with_its_minor() {
        let mut buf = startup(&[("user", "a")]);
        buf[7] = 2;
        let Some(StartupPacket::Startup(m)) = decode_startup(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(m.minor, 2);
    }

    #[test]
    fn framing_limits() {
        assert_eq!(peek_header(b"Q\0\0\0", 100), Ok(None));
        assert_eq!(peek_header(b"Q\0\0\0\0", 100), Err(WireError::BadLength(0)));
        assert_eq!(
            peek_header(b"Q\0\0\0\x03", 100),
            Err(WireError::BadLength(3))
        );
        assert_eq!(
            peek_header(b"Q\xff\xff\xff\xff", 100),
            Err(WireError::BadLength(-1))
        );
        assert_eq!(
            peek_header(b"d\0\0\x01\0", 100),
            Err(WireError::TooLarge { len: 257, max: 100 })
        );
        assert_eq!(
            peek_header(b"S\0\0\0\x04", 100),
            Ok(Some(Header {
                tag: b'S',
                total: 5
            }))
        );
    }

    #[test]
    fn every_frontend_message_decodes() {
        let mut buf = BytesMut::new();
        frontend::query("select 1", &mut buf).unwrap();
        frontend::parse("s1", "select $1", [23], &mut buf).unwrap();
        frontend::bind(
            "p1",
            "s1",
            [1],
            [7i32],
            |v, out| {
                out.extend_from_slice(&v.to_be_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [1],
            &mut buf,
        )
        .map_err(|_| ())
        .unwrap();
        frontend::describe(b'P', "p1", &mut buf).unwrap();
        frontend::execute("p1", 0, &mut buf).unwrap();
        frontend::close(b'S', "s1", &mut buf).unwrap();
        frontend::sync(&mut buf);
        frontend::flush(&mut buf);
        frontend::CopyData::new(&b"1\t2\n"[..])
            .unwrap()
            .write(&mut buf);
        frontend::copy_done(&mut buf);
        frontend::copy_fail("oops", &mut buf).unwrap();
        frontend::password_message(b"secret", &mut buf).unwrap();
        frontend::terminate(&mut buf);
        // FunctionCall has no serializer in postgres-protocol: oid 1, one text arg, text result.
        buf.extend_from_slice(b"F\0\0\0\x15\0\0\0\x01\0\x01\0\0\0\x01\0\0\0\x01x\0\0");
        let mut names = Vec::new();
        while let Some((tag, body)) = next_message(&mut buf, 1 << 20).unwrap() {
            let m = decode_frontend(tag, &body).unwrap();
            names.push(m.name());
            if let FrontendMessage::Bind { params, .. } = m {
                assert_eq!(params, 1);
            }
            if let FrontendMessage::AuthResponse(body) = m {
                assert_eq!(decode_password(body), Ok(&b"secret"[..]));
            }
        }
        assert_eq!(
            names,
            [
                "Query",
                "Parse",
                "Bind",
                "Describe",
                "Execute",
                "Close",
                "Sync",
                "Flush",
                "CopyData",
                "CopyDone",
                "CopyFail",
                "PasswordMessage",
                "Terminate",
                "FunctionCall"
            ]
        );
    }

    #[test]
    fn malformed_frontend_messages() {
        let cases: &[(u8, &[u8])] = &[
            (b'Q', b"select 1"),                                 // no NUL
            (b'Q', b"select 1\0junk"),                           // trailing bytes
            (b'P', b"s\0select 1\0\0\x05"),                      // five param types, none present
            (b'B', b"\0\0\0\x01\0\x02\0\x01\0\0\0\x10x"),        // value longer than the message
            (b'B', b"\0\0\0\x01\0\x07\0\0\0\0"),                 // format code 7
            (b'D', b"X\0"),                                      // bad describe target
            (b'E', b"\0\0\0"),                                   // truncated max_rows
            (b'S', b"x"),                                        // Sync with a body
            (b'F', b"\0\0\0\x01\0\0\0\x01\xff\xff\xff\xfe\0\0"), // length -2
            (b'?', b""),                                         // unknown tag
        ];
        for (tag, body) in cases {
            assert!(
                decode_frontend(*tag, body).is_err(),
                "{} {:?} should be rejected",
                char::from(*tag),
                body
            );
        }
    }

    #[test]
    fn backend_messages_decode() {
        let mut buf = BytesMut::new();
        authentication_ok(&mut buf);
        parameter_status(b"server_version", b"15.18", &mut buf);
        backend_key_data(7, 9, &mut buf);
        ready_for_query(TransactionStatus::InTransaction, &mut buf);
        negotiate_protocol_version(0, &["_pq_.x"], &mut buf);
        PgError::fatal("28000", "no mapping")
            .with_hint("see pgiam.toml")
            .encode(&mut buf);
        let mut seen = Vec::new();
        while let Some((tag, body)) = next_message(&mut buf, 1 << 20).unwrap() {
            seen.push(format!("{:?}", decode_backend(tag, &body).unwrap()));
        }
        assert_eq!(seen.len(), 6);
        assert!(seen[0].contains("Ok"));
        assert!(seen[1].contains("ParameterStatus"));
        assert!(seen[2].contains("process_id: 7"));
        assert!(seen[3].contains("InTransaction"));
        assert!(seen[4].contains("NegotiateProtocolVersion"));
        assert!(seen[5].contains("ErrorResponse"));
    }

    #[test]
    fn error_fields_read_back() {
        let mut buf = BytesMut::new();
        PgError::fatal("42501", "no\0pe")
            .with_detail("d")
            .encode(&mut buf);
        let (tag, body) = next_message(&mut buf, 1 << 20).unwrap().unwrap();
        let BackendMessage::ErrorResponse(f) = decode_backend(tag, &body).unwrap() else {
            panic!()
        };
        assert_eq!(f.get_str(b'C'), Some("42501"));
        assert_eq!(f.get_str(b'S'), Some("FATAL"));
        assert_eq!(
            f.get_str(b'M'),
            Some("no?pe"),
            "an embedded NUL cannot split a field"
        );
        assert_eq!(f.get_str(b'D'), Some("d"));
        assert_eq!(f.get(b'H'), None);
    }

    #[test]
    fn authentication_requests_decode() {
        let sasl = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(
            decode_backend(b'R', sasl),
            Ok(BackendMessage::Authentication(Authentication::Sasl {
                mechanisms: vec![&b"SCRAM-SHA-256-PLUS"[..], &b"SCRAM-SHA-256"[..]]
            }))
        );
        assert_eq!(
            decode_backend(b'R', b"\0\0\0\x05abcd"),
            Ok(BackendMessage::Authentication(
                Authentication::Md5Password { salt: *b"abcd" }
            ))
        );
        assert!(decode_backend(b'R', b"\0\0\0\x63").is_err());
    }
}
