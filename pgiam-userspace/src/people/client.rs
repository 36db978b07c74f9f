//! The CLI's side of the login socket: `pgiam login`, `logout`, `whoami`, `token`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

use super::socket::Request;

/// Sends `request` and returns the final answer's result; `pending` sees each `pending`
/// answer before it (a login's instructions for the person).
pub fn ask(
    path: &Path,
    request: &Request,
    mut pending: impl FnMut(&Value),
) -> anyhow::Result<Value> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach pgiam's login socket {} (is pgiam running with [[oidc]] issuers?)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("pgiam closed the login socket without an answer");
        }
        let answer: Value = serde_json::from_str(&line).context("pgiam's answer is not JSON")?;
        if answer["ok"] != Value::Bool(true) {
            bail!(
                "{}",
                answer["error"]
                    .as_str()
                    .unwrap_or("pgiam refused the request")
            );
        }
        let result = answer["result"].clone();
        if result.get("pending").is_some() {
            pending(&result);
            continue;
        }
        return Ok(result);
    }
}

/// How a person reads who they are logged in as.
pub fn describe(result: &Value) -> String {
    let p = &result["person"];
    let name = p["email"].as_str().map(str::to_owned).unwrap_or_else(|| {
        format!(
            "{} at {}",
            p["subject"].as_str().unwrap_or("?"),
            p["issuer"].as_str().unwrap_or("?")
        )
    });
    let amr: Vec<&str> = p["amr"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let factors = if p["mfa"] == Value::Bool(true) {
        format!("{} (multi-factor)", amr.join("+"))
    } else {
        format!("{} (one factor)", amr.join("+"))
    };
    let b = &result["binding"];
    format!(
        "{name} (oidc:{}:{}), authenticated with {factors}\nbound to uid {} in {}\nprincipals: {}",
        p["alias"].as_str().unwrap_or("?"),
        p["subject"].as_str().unwrap_or("?"),
        b["uid"],
        b["cgroup"].as_str().unwrap_or("?"),
        result["principals"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
    )
}
