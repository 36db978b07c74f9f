//! The CLI's side of the admin socket: send one request, read the answer, and show it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::protocol::{Answer, Request};

/// Sends one request to the admin socket at `path` and returns its answer.
pub fn ask(path: &Path, request: &Request) -> anyhow::Result<Answer> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied opening {}: pgiam's admin socket is for root and the [admin] group",
            path.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "cannot reach pgiam at {} ({e}): is it running, with an [admin] section?",
            path.display()
        ),
        _ => anyhow::anyhow!("cannot reach pgiam at {}: {e}", path.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    serde_json::from_slice(answer.trim_ascii())
        .with_context(|| format!("pgiam's answer on {} is not valid", path.display()))
}

/// Which sessions `pgiam sessions` shows.
#[derive(Default)]
pub struct Filter {
    pub principal: Option<String>,
    pub role: Option<String>,
    pub database: Option<String>,
}

impl Filter {
    pub fn keeps(&self, s: &Value) -> bool {
        let is = |field: &str, want: &Option<String>| {
            want.as_deref().is_none_or(|w| s[field].as_str() == Some(w))
        };
        // A principal filter matches any name the session answers to, as `kill` does.
        let principal = self.principal.as_deref().is_none_or(|p| {
            s["principal"].as_str() == Some(p)
                || identity_names(&s["identity"]).iter().any(|n| n == p)
        });
        principal && is("role", &self.role) && is("database", &self.database)
    }
}

/// The principal names an identity (as the admin socket shows it) answers to.
fn identity_names(identity: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for (field, kind) in [
        ("container", "container"),
        ("unit", "unit"),
        ("cgroup", "cgroup"),
        ("exe", "exe"),
        ("user", "user"),
        ("uid", "uid"),
        ("group", "group"),
        ("gid", "gid"),
    ] {
        match &identity[field] {
            Value::String(v) => names.push(format!("{kind}:{v}")),
            Value::Number(n) => names.push(format!("{kind}:{n}")),
            _ => {}
        }
    }
    names
}

/// `pgiam sessions` as a table.
pub fn sessions_table(sessions: &[Value], now_ms: u64) -> String {
    let headers = [
        "ID",
        "PRINCIPAL",
        "IDENTITY",
        "ROLE",
        "DATABASE",
        "STATE",
        "CLIENT",
        "TLS",
        "POOLED",
        "SINCE",
        "LAST",
        "ALLOWED",
        "REFUSED",
        "IN",
        "OUT",
    ];
    let ago = |ms: &Value| match ms.as_u64() {
        Some(t) => format!("{}s ago", now_ms.saturating_sub(t) / 1000),
        None => "-".into(),
    };
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            let text = |f: &str| s[f].as_str().unwrap_or("-").to_owned();
            let number = |f: &str| s[f].as_u64().map_or("-".into(), |n| n.to_string());
            let id = &s["identity"];
            let mut who = format!("uid={}", id["uid"]);
            for f in ["unit", "container", "exe"] {
                if let Some(v) = id[f].as_str() {
                    who.push_str(&format!(" {f}={v}"));
                }
            }
            vec![
                text("id"),
                text("principal"),
                who,
                text("role"),
                text("database"),
                s["state"].as_str().unwrap_or("-").replace('_', " "),
                text("client"),
                if s["tls"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .into(),
                match s["pool"].as_str() {
                    Some("none") | None => "no".into(),
                    Some(mode) => mode.to_owned(),
                },
                ago(&s["since_ms"]),
                ago(&s["last_statement_ms"]),
                number("allowed"),
                number("refused"),
                number("bytes_in"),
                number("bytes_out"),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session() -> Value {
        json!({
            "id": "r1-3", "principal": "unit:billing.service",
            "identity": {"uid": 1000, "unit": "billing.service", "user": "billing"},
            "role": "billing", "database": "app", "state": "in_transaction",
            "client": "127.0.0.1:5000", "tls": true, "pooled": false, "pool": "none", "since_ms": 1_000, "last_statement_ms": null,
            "allowed": 3, "refused": 1, "bytes_in": 100, "bytes_out": 2000
        })
    }

    #[test]
    fn filters_match_any_name_the_session_answers_to() {
        let s = session();
        let by = |principal: &str| Filter {
            principal: Some(principal.into()),
            ..Filter::default()
        };
        assert!(by("unit:billing.service").keeps(&s));
        assert!(by("uid:1000").keeps(&s));
        assert!(by("user:billing").keeps(&s));
        assert!(!by("uid:1001").keeps(&s));
        let db = Filter {
            database: Some("other".into()),
            ..Filter::default()
        };
        assert!(!db.keeps(&s));
    }

    #[test]
    fn the_table_has_a_row_per_session() {
        let t = sessions_table(&[session()], 11_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID") && lines[0].contains("POOLED"));
        assert!(
            lines[1].contains("yes") && lines[1].contains("no"),
            "TLS, not pooled"
        );
        for cell in [
            "r1-3",
            "uid=1000 unit=billing.service",
            "in transaction",
            "10s ago",
            "yes",
        ] {
            assert!(lines[1].contains(cell), "{cell} in {}", lines[1]);
        }
    }
}
