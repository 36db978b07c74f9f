//! The startup phase: the untagged packets a client sends before its first tagged message
//! (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).

use bytes::{Buf, BytesMut};

use super::{
    malformed, take_cstr, WireError, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET,
    SSL_REQUEST_CODE,
};

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
