//! pgiam's own cancel keys. Clients never see a backend's real key: each session gets a random
//! (process id, secret) pair from pgiam, and a CancelRequest is forwarded only when both match a
//! live session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::upstream::Upstream;

/// The real backend a pgiam key stands for.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub process_id: i32,
    pub secret_key: i32,
    /// The server's address when it is not the configured one (an intercepted connection).
    pub address: Option<std::net::SocketAddr>,
}

struct Entry {
    secret: i32,
    /// `None` until the session's upstream connection exists (it opens at the first message).
    target: Option<Target>,
}

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, Entry>>,
}

/// A session's key; dropping it makes the key stale.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub process_id: i32,
    pub secret_key: i32,
}

impl Registration {
    /// The session's backend now exists: a cancel with this key reaches it.
    pub fn connect(&self, target: Target) {
        let mut sessions = self
            .registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = sessions.get_mut(&self.process_id) {
            entry.target = Some(target);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.process_id);
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>, target: Option<Target>) -> Registration {
        let mut rng = rand::thread_rng();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // Positive, like a real pid: some clients print or parse it.
        let process_id = loop {
            let candidate = rng.gen_range(1..i32::MAX);
            if !sessions.contains_key(&candidate) {
                break candidate;
            }
        };
        let secret_key = rng.gen();
        sessions.insert(
            process_id,
            Entry {
                secret: secret_key,
                target,
            },
        );
        Registration {
            registry: self.clone(),
            process_id,
            secret_key,
        }
    }

    /// The backend to cancel, if `(process_id, secret_key)` is a live session's key and the
    /// session has a backend.
    pub fn lookup(&self, process_id: i32, secret_key: i32) -> Option<Target> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let entry = sessions.get(&process_id)?;
        // Compare without an early exit, so timing does not reveal how much of a guess matched.
        let diff = (entry.secret ^ secret_key).count_ones();
        if diff == 0 {
            entry.target.clone()
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn upstream() -> Arc<Upstream> {
        let config = crate::config::Config::parse(
            "state_dir = \"/tmp\"\n[listen]\ntcp = \"127.0.0.1:1\"\n[upstream]\nhost = \"127.0.0.1\"\n[policy]\nfile = \"/p\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        Arc::new(Upstream::new(&config).unwrap())
    }

    #[test]
    fn keys_match_only_exactly_and_only_while_live() {
        let registry = Arc::new(CancelRegistry::default());
        let reg = registry.register(None);
        assert!(
            registry.lookup(reg.process_id, reg.secret_key).is_none(),
            "no backend yet: nothing to cancel"
        );
        reg.connect(Target {
            upstream: upstream(),
            process_id: 4242,
            secret_key: 99,
            address: None,
        });
        let t = registry.lookup(reg.process_id, reg.secret_key).unwrap();
        assert_eq!((t.process_id, t.secret_key), (4242, 99));
        assert!(registry
            .lookup(reg.process_id, reg.secret_key ^ 1)
            .is_none());
        assert!(registry.lookup(4242, 99).is_none() || reg.process_id == 4242);
        let (pid, key) = (reg.process_id, reg.secret_key);
        drop(reg);
        assert!(
            registry.lookup(pid, key).is_none(),
            "a stale key cancels nothing"
        );
        assert!(registry.is_empty());
    }
}
