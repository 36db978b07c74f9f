//! Backend messages: typed, validating views of what servers send.

use super::{
    finish, malformed, take, take_count, take_cstr, take_formats, take_i32, take_u8, take_value,
    WireError,
};

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
