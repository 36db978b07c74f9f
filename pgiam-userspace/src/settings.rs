//! The configuration in force and what is built from it (the upstream connector), replaced
//! whole when pgiam.toml is reloaded. A session takes one snapshot when it starts and logs in
//! with it; a reload changes what later sessions (and later logins) see.
//!
//! What a running pgiam cannot change in place — its listeners, state directory, client TLS,
//! audit log, admin socket, the interception's attachment — is kept as it was and reported;
//! everything else (mappings, role credentials, upstream address and TLS, limits, the
//! intercepted endpoints and ports, the policy's search_path) takes effect at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::upstream::Upstream;

/// One generation of settings.
pub struct Current {
    pub config: Arc<Config>,
    pub upstream: Arc<Upstream>,
}

/// The settings in force, and where they come from.
pub struct Settings {
    path: PathBuf,
    current: ArcSwap<Current>,
    generation: AtomicU64,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Settings that differ in the file but only change with a restart: kept as they were.
    pub kept: Vec<&'static str>,
    /// Changes that take protection away (upstream TLS, intercepted endpoints and ports),
    /// applied and worth an operator's look.
    pub weakened: Vec<String>,
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("upstream TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl Settings {
    pub fn new(path: &Path, config: Config) -> Result<Settings, ReloadError> {
        let upstream = Arc::new(Upstream::new(&config)?);
        Ok(Settings {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(Current {
                config: Arc::new(config),
                upstream,
            }),
            generation: AtomicU64::new(0),
        })
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again. It is taken whole or not at all: a file that does not validate
    /// (or whose upstream TLS cannot be set up) leaves the settings in force as they are.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let old = self.current();
        let new = Config::load(&self.path)?;
        let (config, kept) = keep_fixed(&old.config, new);
        let weakened = weakened(&old.config, &config);
        let upstream = Arc::new(Upstream::new(&config)?);
        self.current.store(Arc::new(Current {
            config: Arc::new(config),
            upstream,
        }));
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        Ok(Reloaded {
            kept,
            weakened,
            generation,
        })
    }
}

/// What `new` protects less than `old` did.
fn weakened(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (o, n) = (&old.upstream, &new.upstream);
    if format!("{:?}", o.tls) != format!("{:?}", n.tls) {
        out.push(format!("upstream.tls {:?} -> {:?}", o.tls, n.tls));
    }
    if o.ca_file != n.ca_file || o.server_name != n.server_name {
        out.push("upstream.ca_file or server_name changed".into());
    }
    if let (Some(o), Some(n)) = (&old.interception, &new.interception) {
        for e in o.endpoints.iter().filter(|e| !n.endpoints.contains(e)) {
            out.push(format!("interception.endpoints no longer has {e}"));
        }
        for p in o.ports.iter().filter(|p| !n.ports.contains(p)) {
            out.push(format!("interception.ports no longer has {p}"));
        }
    }
    out
}

/// `new` with what cannot change in a running pgiam taken from `old`; the names of what was
/// different (and is kept).
fn keep_fixed(old: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut kept = Vec::new();
    // Compared through their Debug text: every part derives Debug, and a missed difference
    // only means a change is reported less precisely, never applied.
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    macro_rules! keep {
        ($($field:ident).+, $name:expr) => {
            if differs(&old.$($field).+, &new.$($field).+) {
                kept.push($name);
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(state_dir, "state_dir");
    keep!(listen, "listen");
    keep!(client_tls, "client_tls");
    keep!(audit, "audit");
    keep!(admin, "admin");
    keep!(log_format, "log_format");
    keep!(policy.file, "policy.file");
    // The login socket opens with the first issuer, at the path then in force.
    if !old.issuers.is_empty() {
        keep!(people.socket, "people.socket");
    }
    match (&old.interception, &mut new.interception) {
        (Some(o), Some(n)) => {
            // Endpoints, ports and the resolve interval apply live; how the programs are
            // attached does not.
            let mut attached = n.clone();
            attached.endpoints = o.endpoints.clone();
            attached.ports = o.ports.clone();
            attached.resolve_interval_secs = o.resolve_interval_secs;
            if differs(o, &attached) {
                kept.push("interception (cgroup, fast_path, fail_open, mark, bpffs_dir, intercept_bound_devices)");
                let (endpoints, ports, every) = (
                    n.endpoints.clone(),
                    n.ports.clone(),
                    n.resolve_interval_secs,
                );
                *n = o.clone();
                n.endpoints = endpoints;
                n.ports = ports;
                n.resolve_interval_secs = every;
            }
        }
        (None, None) => {}
        _ => {
            kept.push("interception (added or removed)");
            new.interception = old.interception.clone();
        }
    }
    (new, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
state_dir = "/tmp/pgiam-settings-test"
[listen]
tcp = "127.0.0.1:6432"
[upstream]
host = "127.0.0.1"
[policy]
file = "/dev/null"
{extra}
"#
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn what_cannot_change_live_is_kept_and_named() {
        let old = config("[interception]\nendpoints = [\"10.0.0.1\"]\n");
        let mut new = config(
            "[interception]\nendpoints = [\"10.0.0.2\"]\nports = [5433]\nfast_path = false\n",
        );
        new.listen.tcp = Some("127.0.0.1:7000".parse().unwrap());
        new.limits.startup_timeout_secs = 3;
        let (applied, kept) = keep_fixed(&old, new);
        assert_eq!(applied.listen.tcp, old.listen.tcp);
        assert_eq!(applied.limits.startup_timeout_secs, 3, "limits apply live");
        let i = applied.interception.unwrap();
        assert_eq!(i.endpoints, vec!["10.0.0.2".to_string()]);
        assert_eq!(i.ports, vec![5433]);
        assert!(i.fast_path, "kept");
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept[0] == "listen" && kept[1].starts_with("interception"));
    }

    #[test]
    fn an_unchanged_file_keeps_nothing() {
        let (_, kept) = keep_fixed(&config(""), config(""));
        assert!(kept.is_empty());
    }
}
