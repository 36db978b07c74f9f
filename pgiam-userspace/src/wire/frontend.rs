//! Frontend messages: typed, validating views of what clients send.

use super::{
    finish, malformed, peek_header, take, take_count, take_cstr, take_formats, take_i16, take_i32,
    take_u8, take_value, WireError,
};

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
