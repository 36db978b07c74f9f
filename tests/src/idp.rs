//! A real OpenID provider for the people tests and the demo: panva's `oidc-provider`, run by
//! `tests/idp/provider.cjs` from the pinned packages `cargo xtask install-deps` puts in
//! `target/drivers/node`, with a person's approval played by `tests/idp/approve.cjs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{workspace_root, write_file};

/// The TOTP secret of alice, the person with a second factor.
pub const ALICE_TOTP: &str = "JBSWY3DPEHPK3PXP";

/// A running provider, stopped on drop.
pub struct Idp {
    child: Child,
    /// The issuer URL (`http://127.0.0.1:PORT`).
    pub issuer: String,
    /// Its private signing keys (first signs).
    pub keys: PathBuf,
}

fn node_path() -> PathBuf {
    let path = workspace_root().join("target/drivers/node/node_modules");
    assert!(
        path.join("oidc-provider/package.json").exists(),
        "{} has no oidc-provider: run `cargo xtask install-deps`",
        path.display()
    );
    path
}

fn script(name: &str) -> PathBuf {
    workspace_root().join("tests/idp").join(name)
}

impl Idp {
    /// Starts a provider with alice (groups dba, eng; password and TOTP) and bob (group eng;
    /// password only), clients `pgiam` and `other-app`, ID tokens valid `id_token_ttl` s.
    pub fn start(dir: &Path, id_token_ttl: u64) -> anyhow::Result<Idp> {
        let keys = dir.join("idp-keys.json");
        let config = serde_json::json!({
            "host": "127.0.0.1", "port": 0,
            "keys": keys,
            "id_token_ttl": id_token_ttl, "access_token_ttl": id_token_ttl,
            "refresh_token_ttl": 86400, "device_code_ttl": 600, "device_poll_interval": 1,
            "clients": [{"client_id": "pgiam"}, {"client_id": "other-app"}],
            "accounts": [
                {"username": "alice", "password": "alice-pw", "sub": "alice",
                 "email": "alice@example.com", "groups": ["dba", "eng"], "totp_secret": ALICE_TOTP},
                {"username": "bob", "password": "bob-pw", "sub": "bob",
                 "email": "bob@example.com", "groups": ["eng"]}
            ]
        });
        let config = write_file(dir, "idp.json", &config.to_string(), 0o600);
        let log = std::fs::File::create(dir.join("idp.log"))?;
        let mut child = Command::new("node")
            .arg(script("provider.cjs"))
            .arg(&config)
            .env("NODE_PATH", node_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting node tests/idp/provider.cjs")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("reading the provider's first line")?;
        let Some(issuer) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the provider did not start: {line:?}\n{}",
                std::fs::read_to_string(dir.join("idp.log")).unwrap_or_default()
            );
        };
        Ok(Idp {
            issuer: issuer.to_owned(),
            keys,
            child,
        })
    }

    /// The person approves the login at `url` (its `verification_uri_complete`) with their
    /// password, and the TOTP code of `totp` when given.
    pub fn approve(&self, url: &str, user: &str, password: &str, totp: Option<&str>) {
        let out = Command::new("node")
            .arg(script("approve.cjs"))
            .args([url, user, password, totp.unwrap_or("-")])
            .env("NODE_PATH", node_path())
            .output()
            .expect("run approve.cjs");
        assert!(
            out.status.success(),
            "approval of {user} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A JWT with `claims`, signed by the provider's own key (`own_key`) or by a key it never
    /// published.
    pub fn forge(&self, own_key: bool, claims: serde_json::Value) -> String {
        let keys = if own_key {
            self.keys.display().to_string()
        } else {
            "new".into()
        };
        let out = Command::new("node")
            .arg(script("sign.cjs"))
            .args([keys, claims.to_string()])
            .env("NODE_PATH", node_path())
            .output()
            .expect("run sign.cjs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `POST <issuer><path>` (the provider's test-only routes: `/test/rotate?generate=1`,
    /// `/test/revoke?sub=…`, `/test/groups?sub=…&groups=…`); the response body.
    pub fn post(&self, path: &str) -> String {
        let addr = self.issuer.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).expect("connect to the provider");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
            "POST {path}: {response}"
        );
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..50 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
