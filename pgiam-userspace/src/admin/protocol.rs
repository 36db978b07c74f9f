//! What the admin socket's client and server say to each other: one request, as a JSON
//! object on one line, and one answer line. Sans I/O, shared by the daemon and the CLI.

use serde::{Deserialize, Serialize};

/// A request; `verb` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every live session.
    Sessions,
    /// End one session, or every session of a principal, now.
    Kill {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        principal: Option<String>,
    },
    /// Refuse a principal's new sessions and end its live ones.
    Revoke {
        principal: String,
        /// Seconds; `None`: until unrevoked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Lift a revocation.
    Unrevoke { principal: String },
    /// The revocations in force.
    Revocations,
    /// Version, uptime, policy, interception, audit, upstream.
    Status,
}

/// The longest request line the server reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// An answer: `{"ok": true, "result": …}` or `{"ok": false, "error": "…"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    pub fn ok(result: serde_json::Value) -> Answer {
        Answer {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }

    /// The answer as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("answers serialize");
        line.push(b'\n');
        line
    }
}

/// Parses a request line; the error is what to tell the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("not a valid request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ones_are_refused() {
        let r = Request::Revoke {
            principal: "unit:a.service".into(),
            for_secs: Some(60),
            reason: None,
        };
        let line = serde_json::to_vec(&r).unwrap();
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            r#"{"verb":"revoke","principal":"unit:a.service","for_secs":60}"#
        );
        assert_eq!(parse_request(&line).unwrap(), r);
        assert!(parse_request(br#"{"verb":"drop_everything"}"#).is_err());
        assert!(parse_request(br#"{"verb":"kill","session":"x","extra":1}"#).is_err());
        assert!(parse_request(b"\xff").is_err());
    }
}
