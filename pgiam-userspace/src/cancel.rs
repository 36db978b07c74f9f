//! pgiam's own cancel keys. Clients never see a backend's real secret: each session gets a
//! random secret from pgiam, beside its backend's real process id (which clients use for
//! `pg_terminate_backend`, `pg_stat_activity` and NOTIFY senders), and a CancelRequest is
//! forwarded only when both match a live session. A session whose backend does not exist yet
//! (`connect = "deferred"`) is given a made-up process id, as a pooler gives.
//!
//! Keys are the pair: two servers behind one pgiam (intercepted destinations) can have
//! backends with the same process id, never with the same pgiam secret.
//!
//! A cancel must not overtake the statement it is meant for: a session may hold a statement
//! for a moment after reading it (classifying it, waiting for its audit record's flush), and a
//! server that receives the cancel first finds its backend idle and ignores it. So each session
//! says while it holds client bytes not yet forwarded ([`Pending`]), and a cancel is forwarded
//! only once they are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A live session's key and what a cancel needs of it. The registry finds it by key (for a
/// CancelRequest); the session holds it directly, so what it does at every transaction
/// (pointing the key at a backend and away, reading its [`Pending`]) takes no registry-wide
/// lock and hashes nothing.
struct Entry {
    key: (i32, i32),
    state: Mutex<EntryState>,
    pending: Pending,
}

#[derive(Default)]
struct EntryState {
    /// `None` until the session's upstream connection exists (it opens at the first message),
    /// and between two transactions of a transaction-pooled session.
    target: Option<Target>,
    /// [`Pending::reads`] when a cancel for the session was last forwarded: another cancel
    /// before the client sent anything new can only be for the same statement.
    cancelled_at: Option<u64>,
    /// A cancel for the session is being forwarded now.
    forwarding: bool,
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a session holds client bytes it read and has not forwarded yet, and since when.
/// (A lock and a `Notify`: every session has one, and a `watch` channel costs several times
/// the room.)
#[derive(Clone, Default)]
pub struct Pending(Arc<PendingState>);

#[derive(Default)]
pub struct PendingState {
    since: Mutex<Option<Instant>>,
    forwarded: tokio::sync::Notify,
    /// How many times the session started holding bytes: a new statement (or part of one)
    /// since a count means a cancel now may be for something new.
    reads: std::sync::atomic::AtomicU64,
}

impl Pending {
    fn since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.0.since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set when bytes are read, cleared once everything forwardable is forwarded.
    pub fn set(&self, holding: bool) {
        let mut since = self.since();
        match (holding, *since) {
            (true, None) => {
                *since = Some(Instant::now());
                self.0
                    .reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (false, Some(_)) => {
                *since = None;
                drop(since);
                self.0.forwarded.notify_waiters();
            }
            _ => {}
        }
    }

    /// Waits until the session holds nothing unforwarded, then as long again as the cancel
    /// came after the held bytes: the server sees the cancel no sooner after its statement than
    /// pgiam did (PostgreSQL ignores a cancel that arrives before its backend starts the
    /// statement, so a client that waits a moment before cancelling must not lose that
    /// moment in pgiam). `max` bounds each wait: a session stuck on a full server socket must
    /// not keep its cancel forever.
    pub async fn forwarded(&self, max: Duration) {
        let arrived = Instant::now();
        let Some(since) = *self.since() else {
            return;
        };
        let _ = tokio::time::timeout(max, async {
            loop {
                let notified = self.0.forwarded.notified();
                tokio::pin!(notified);
                // Registered before the check, so a clear in between is not missed.
                notified.as_mut().enable();
                if self.since().is_none() {
                    return;
                }
                notified.await;
            }
        })
        .await;
        tokio::time::sleep(arrived.saturating_duration_since(since).min(max)).await;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<(i32, i32), Arc<Entry>>>,
    /// Cancels being forwarded now, for all sessions together.
    forwarding: std::sync::atomic::AtomicUsize,
}

/// The most cancels forwarded at once, for all sessions together: each is a connection to the
/// server, which must not be flooded through pgiam.
pub const MAX_FORWARDING: usize = 64;

/// A cancel being forwarded; dropping it lets the next one for its key through.
pub struct Forwarding<'a> {
    registry: &'a CancelRegistry,
    entry: Arc<Entry>,
}

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        self.entry.state().forwarding = false;
        self.registry
            .forwarding
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A session's key; dropping it makes the key stale.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    entry: Arc<Entry>,
}

impl Registration {
    pub fn process_id(&self) -> i32 {
        self.entry.key.0
    }

    pub fn secret_key(&self) -> i32 {
        self.entry.key.1
    }

    /// The session's backend now exists: a cancel with this key reaches it.
    pub fn connect(&self, target: Target) {
        self.entry.state().target = Some(target);
    }

    /// The session has no backend any more (a transaction-pooled session between two
    /// transactions): a cancel with this key reaches none, least of all the next session's.
    /// Returns whether one is being forwarded now, which may already be on its way to the
    /// backend the session had: that backend must then serve no one else. (One lock for
    /// both: a cancel claimed after it finds no backend, one claimed before is reported.)
    pub fn disconnect(&self) -> bool {
        let mut state = self.entry.state();
        state.target = None;
        state.forwarding
    }

    /// The session's side of [`Pending`].
    pub fn pending(&self) -> Pending {
        self.entry.pending.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.entry.key);
        // A cancel waiting for the session to forward what it held waits no more.
        self.entry.pending.set(false);
    }
}

impl CancelRegistry {
    /// A key for a session: with its backend's real process id, or (no backend yet) a
    /// made-up one.
    pub fn register(self: &Arc<Self>, backend_pid: Option<i32>) -> Registration {
        let mut rng = rand::thread_rng();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let key = loop {
            // Positive, like a real pid: some clients print or parse it.
            let pid = backend_pid.unwrap_or_else(|| rng.gen_range(1..i32::MAX));
            let candidate = (pid, rng.gen());
            if !sessions.contains_key(&candidate) {
                break candidate;
            }
        };
        let entry = Arc::new(Entry {
            key,
            state: Mutex::default(),
            pending: Pending::default(),
        });
        sessions.insert(key, entry.clone());
        Registration {
            registry: self.clone(),
            entry,
        }
    }

    /// The live session a key names. (A hash lookup of the whole pair: no comparison of a
    /// stored secret that could stop early at the first wrong bit.)
    fn entry(&self, process_id: i32, secret_key: i32) -> Option<Arc<Entry>> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.get(&(process_id, secret_key)).cloned()
    }

    /// The backend to cancel, if `(process_id, secret_key)` is a live session's key and the
    /// session has a backend.
    pub fn lookup(&self, process_id: i32, secret_key: i32) -> Option<Target> {
        self.entry(process_id, secret_key)?.state().target.clone()
    }

    /// The live session a key names: its backend (if it has one yet) and what it holds.
    pub fn lookup_entry(
        &self,
        process_id: i32,
        secret_key: i32,
    ) -> Option<(Option<Target>, Pending)> {
        let entry = self.entry(process_id, secret_key)?;
        let target = entry.state().target.clone();
        Some((target, entry.pending.clone()))
    }

    /// Claims the forwarding of a cancel for this key; `None`, and the cancel is dropped
    /// (PostgreSQL answers a cancel with nothing either way): one is under way for it already,
    /// or one was forwarded and the client has sent nothing since (it can only be for the same
    /// statement), or [`MAX_FORWARDING`] are under way.
    pub fn begin_forwarding(&self, process_id: i32, secret_key: i32) -> Option<Forwarding<'_>> {
        use std::sync::atomic::Ordering;
        let entry = self.entry(process_id, secret_key)?;
        {
            let mut state = entry.state();
            let reads = entry.pending.0.reads.load(Ordering::Relaxed);
            if state.forwarding || state.cancelled_at == Some(reads) {
                return None;
            }
            if self.forwarding.fetch_add(1, Ordering::Relaxed) >= MAX_FORWARDING {
                self.forwarding.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            state.forwarding = true;
            state.cancelled_at = Some(reads);
        }
        Some(Forwarding {
            registry: self,
            entry,
        })
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
        assert!(reg.process_id() > 0);
        assert!(
            registry
                .lookup(reg.process_id(), reg.secret_key())
                .is_none(),
            "no backend yet: nothing to cancel"
        );
        reg.connect(Target {
            upstream: upstream(),
            process_id: 4242,
            secret_key: 99,
            address: None,
        });
        let t = registry.lookup(reg.process_id(), reg.secret_key()).unwrap();
        assert_eq!((t.process_id, t.secret_key), (4242, 99));
        assert!(registry
            .lookup(reg.process_id(), reg.secret_key() ^ 1)
            .is_none());
        assert!(
            registry.lookup(4242, 99).is_none() || reg.process_id() == 4242,
            "the backend's own secret is not pgiam's key"
        );
        let (pid, key) = (reg.process_id(), reg.secret_key());
        drop(reg);
        assert!(
            registry.lookup(pid, key).is_none(),
            "a stale key cancels nothing"
        );
        assert!(registry.is_empty());
    }

    /// A session that gives its backend up (transaction pooling) is told whether a cancel of
    /// its is on its way, which could still reach that backend; after that, none goes.
    #[test]
    fn a_disconnected_key_cancels_nothing_and_says_if_a_cancel_was_under_way() {
        let registry = Arc::new(CancelRegistry::default());
        let reg = registry.register(None);
        let target = || Target {
            upstream: upstream(),
            process_id: 4242,
            secret_key: 99,
            address: None,
        };
        reg.connect(target());
        assert!(!reg.disconnect(), "no cancel under way");
        assert!(registry
            .lookup(reg.process_id(), reg.secret_key())
            .is_none());
        reg.connect(target());
        let forwarding = registry
            .begin_forwarding(reg.process_id(), reg.secret_key())
            .expect("the first cancel");
        assert!(reg.disconnect(), "a cancel is being forwarded");
        drop(forwarding);
        assert!(!reg.disconnect());
    }

    /// One cancel per session at a time, none again for the statement already cancelled, and
    /// at most MAX_FORWARDING under way for all sessions together.
    #[test]
    fn cancels_are_forwarded_once_per_statement_and_within_the_cap() {
        let registry = Arc::new(CancelRegistry::default());
        let reg = registry.register(None);
        let (pid, key) = (reg.process_id(), reg.secret_key());
        let first = registry
            .begin_forwarding(pid, key)
            .expect("the first cancel");
        assert!(
            registry.begin_forwarding(pid, key).is_none(),
            "a repeat while it is under way"
        );
        drop(first);
        assert!(
            registry.begin_forwarding(pid, key).is_none(),
            "nothing new read since: the same statement"
        );
        reg.pending().set(true);
        reg.pending().set(false);
        let again = registry
            .begin_forwarding(pid, key)
            .expect("a new statement");
        assert!(
            registry.begin_forwarding(pid, key ^ 1).is_none(),
            "a wrong key"
        );

        let others: Vec<_> = (1..MAX_FORWARDING + 1)
            .map(|_| registry.register(None))
            .collect();
        let claim = |r: &Registration| registry.begin_forwarding(r.process_id(), r.secret_key());
        let under_way: Vec<_> = others[..MAX_FORWARDING - 1]
            .iter()
            .map(|r| claim(r).expect("room"))
            .collect();
        let last = &others[MAX_FORWARDING - 1];
        assert!(claim(last).is_none(), "the cap");
        drop(again);
        assert!(claim(last).is_some(), "room again once one is done");
        drop(under_way);
    }

    #[test]
    fn a_real_backend_pid_is_kept_and_two_servers_may_share_one() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register(Some(777));
        let b = registry.register(Some(777));
        assert_eq!((a.process_id(), b.process_id()), (777, 777));
        assert_ne!(a.secret_key(), b.secret_key());
        for (reg, backend) in [(&a, 1), (&b, 2)] {
            reg.connect(Target {
                upstream: upstream(),
                process_id: 777,
                secret_key: backend,
                address: None,
            });
        }
        assert_eq!(registry.lookup(777, a.secret_key()).unwrap().secret_key, 1);
        assert_eq!(registry.lookup(777, b.secret_key()).unwrap().secret_key, 2);
        drop(a);
        assert_eq!(registry.lookup(777, b.secret_key()).unwrap().secret_key, 2);
    }
}
