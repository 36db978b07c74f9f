//! The live sessions, as an operator sees them: who each one is, what it is doing, its
//! counters, and the order that ends it (a kill, a revocation, the drain at shutdown).
//!
//! A session registers once it is past the connect decision and holds its [`Registration`]
//! for its life; dropping it removes the entry. The entry is also the session's "who" for its
//! decision records (one copy of the identity per session), and its counters are plain
//! atomics the relay bumps without a lock.
//!
//! Waiting sessions are woken through one process-wide channel ([`Registry::subscribe`]),
//! for an order and for a new policy alike: each then looks at its own order and at the
//! policy. One wait per session, not one per cause, keeps an idle session's task small; an
//! order is rare enough that waking every session for it costs nothing that matters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use internment::ArcIntern;
use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// Who asked for something on the admin socket, from its peer credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some(u) => write!(f, "{u} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// Why a session must end now.
#[derive(Debug, Clone)]
pub enum Order {
    /// `pgiam kill`.
    Kill { by: Operator },
    /// `pgiam revoke` of a principal the session answers to.
    Revoke {
        by: Operator,
        principal: String,
        reason: Option<String>,
    },
    /// pgiam is stopping.
    Shutdown,
    /// A reloaded configuration no longer maps the session's principal to its role.
    Unmapped,
    /// The person the session carries is no longer logged in (logout, expiry, the issuer's
    /// refusal), or the token it gave as password expired.
    LoginEnded {
        /// The person's principal (`None`: a token given as password).
        person: Option<String>,
        why: String,
    },
}

impl Order {
    /// What the audit record and the session's end record call it.
    pub fn kind(&self) -> &'static str {
        match self {
            Order::Kill { .. } => "kill",
            Order::Revoke { .. } => "revoke",
            Order::Shutdown => "shutdown",
            Order::Unmapped => "unmapped",
            Order::LoginEnded { .. } => "login_ended",
        }
    }

    /// The operator behind it, if one is.
    pub fn operator(&self) -> Option<&Operator> {
        match self {
            Order::Kill { by } | Order::Revoke { by, .. } => Some(by),
            Order::Shutdown | Order::Unmapped | Order::LoginEnded { .. } => None,
        }
    }
}

/// What a session is doing, as `pgiam sessions` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum State {
    /// Waiting for the client, outside a transaction block.
    Idle = 0,
    /// Requests forwarded and not yet all answered.
    Active = 1,
    /// Waiting for the client inside a transaction block.
    InTransaction = 2,
    /// Holding a statement until its audit record is on the device.
    WaitingForAudit = 3,
    /// Deferred: logged in, no server connection yet.
    NotConnected = 4,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Idle,
            1 => State::Active,
            2 => State::InTransaction,
            3 => State::WaitingForAudit,
            _ => State::NotConnected,
        }
    }
}

/// The facts a session is established with; they do not change for its life.
pub struct Facts {
    /// The audit id of its session record, or a local one when there is no audit log.
    pub id: String,
    /// Whether `id` names a session record (statement records then point to it).
    pub audited: bool,
    // Held once for all the sessions that share them (a pool's connections, its mapping):
    // the strings and the identity would otherwise be most of an idle session's memory.
    pub principal: ArcIntern<String>,
    pub role: ArcIntern<String>,
    pub database: ArcIntern<String>,
    pub identity: ArcIntern<Identity>,
    pub upstream: ArcIntern<String>,
    pub peer: String,
    pub tls: bool,
    /// Where its backends come from: its own, or a pool it gives them back to at its end
    /// (`session`) or between its transactions too (`transaction`).
    pub pool: crate::config::PoolMode,
}

/// One live session.
pub struct Live {
    pub facts: Facts,
    since: SystemTime,
    /// The same moment on the monotonic clock, for how long the session lasted.
    started: std::time::Instant,
    state: AtomicU8,
    allowed: AtomicU64,
    refused: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Unix milliseconds of the last decision; 0: none yet.
    last_statement_ms: AtomicU64,
    /// Boxed: an order is rare, and every session carries the slot (an `Order` is 88 bytes).
    order: Mutex<Option<Box<Order>>>,
}

impl Live {
    pub fn new(facts: Facts, state: State) -> Arc<Live> {
        Arc::new(Live {
            facts,
            since: SystemTime::now(),
            started: std::time::Instant::now(),
            state: AtomicU8::new(state as u8),
            allowed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            last_statement_ms: AtomicU64::new(0),
            order: Mutex::new(None),
        })
    }

    /// How long since the session was established.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The id statement records name as their session: `None` without a session record.
    pub fn session_id(&self) -> Option<&str> {
        self.facts.audited.then_some(self.facts.id.as_str())
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// A statement decided (allowed or refused), now.
    pub fn decided(&self, allowed: bool) {
        let counter = if allowed {
            &self.allowed
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_statement_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Bytes forwarded from the client to the server.
    pub fn bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes written to the client.
    pub fn bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The order to end, once one is given (the first one stands).
    pub fn order(&self) -> Option<Order> {
        self.order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .cloned()
    }

    fn give(&self, order: Order) {
        let mut slot = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(Box::new(order));
        }
    }

    /// Whether this session answers to `principal`: its mapping's or any name its identity has.
    pub fn answers_to(&self, principal: &str) -> bool {
        *self.facts.principal == principal
            || self
                .facts
                .identity
                .principals()
                .iter()
                .any(|p| p == principal)
    }

    /// What `pgiam sessions` shows of it.
    pub fn view(&self) -> SessionView {
        let f = &self.facts;
        let last = self.last_statement_ms.load(Ordering::Relaxed);
        SessionView {
            id: f.id.clone(),
            principal: f.principal.to_string(),
            identity: (*f.identity).clone(),
            role: f.role.to_string(),
            database: f.database.to_string(),
            upstream: f.upstream.to_string(),
            client: f.peer.clone(),
            tls: f.tls,
            pooled: f.pool != crate::config::PoolMode::None,
            pool: f.pool,
            state: self.state(),
            since_ms: unix_ms(self.since),
            last_statement_ms: (last > 0).then_some(last),
            allowed: self.allowed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// One row of `pgiam sessions`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub id: String,
    pub principal: String,
    pub identity: Identity,
    pub role: String,
    pub database: String,
    pub upstream: String,
    pub client: String,
    pub tls: bool,
    /// Its backend comes from a pool (kept for the JSON's readers from before `pool`).
    pub pooled: bool,
    /// Which pooling: `none`, `session` or `transaction`.
    pub pool: crate::config::PoolMode,
    pub state: State,
    pub since_ms: u64,
    pub last_statement_ms: Option<u64>,
    pub allowed: u64,
    pub refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Every live session.
pub struct Registry {
    sessions: Mutex<HashMap<u64, Arc<Live>>>,
    next: AtomicU64,
    /// Set once the drain begins: no session registers after it.
    closing: AtomicBool,
    emptied: tokio::sync::Notify,
    /// Sessions ever registered.
    total: AtomicU64,
    /// Bumped to make every waiting session look at its order and the policy.
    wake: tokio::sync::watch::Sender<u64>,
    /// The same for relays, which are also woken once a second (the value counts the seconds):
    /// how a relay learns its session has been idle a while. (A second channel: a session
    /// waiting without a relay has no use for the clock.)
    relays: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            sessions: Mutex::default(),
            next: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            emptied: tokio::sync::Notify::new(),
            total: AtomicU64::new(0),
            wake: tokio::sync::watch::channel(0).0,
            relays: tokio::sync::watch::channel(0).0,
        }
    }
}

/// pgiam is stopping: no new session.
#[derive(Debug, thiserror::Error)]
#[error("pgiam is shutting down")]
pub struct ShuttingDown;

impl Registry {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a waiting session selects on: it changes when the session should look at its
    /// order and at the policy.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Makes every waiting session look (a new policy, an order).
    pub fn wake_all(&self) {
        self.wake.send_modify(|g| *g += 1);
        // (Woken without a tick: the clock reads the same.)
        self.relays.send_modify(|_| {});
    }

    /// What a relay selects on: it changes as [`Registry::subscribe`]'s does, and once a
    /// second besides; its value is the seconds ticked.
    pub fn subscribe_relay(&self) -> tokio::sync::watch::Receiver<u64> {
        self.relays.subscribe()
    }

    /// One tick of the clock relays measure idleness by (once a second).
    pub fn tick(&self) {
        self.relays.send_modify(|t| *t += 1);
    }

    /// A local id for a session without an audit record.
    pub fn local_id(&self) -> String {
        format!("local-{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Adds a live session; refused once the drain has begun.
    pub fn register(self: &Arc<Self>, live: Arc<Live>) -> Result<Registration, ShuttingDown> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut sessions = self.sessions();
            // Checked under the lock the drain takes too: a session either registers before
            // the drain orders everyone out, or not at all.
            if self.closing.load(Ordering::Acquire) {
                return Err(ShuttingDown);
            }
            sessions.insert(key, live.clone());
        }
        Ok(Registration {
            registry: self.clone(),
            key,
            live,
        })
    }

    /// Every live session's view, oldest first.
    pub fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self.sessions().values().map(|l| l.view()).collect();
        v.sort_by(|a, b| (a.since_ms, &a.id).cmp(&(b.since_ms, &b.id)));
        v
    }

    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions started since start (registered, and past the checks made once registered).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Orders every session that `matches` to end; returns the ids ordered.
    pub fn order(&self, matches: impl Fn(&Live) -> bool, order: &Order) -> Vec<String> {
        let sessions = self.sessions();
        let mut ids = Vec::new();
        for live in sessions.values().filter(|l| matches(l)) {
            live.give(order.clone());
            ids.push(live.facts.id.clone());
        }
        drop(sessions);
        if !ids.is_empty() {
            self.wake_all();
        }
        ids.sort();
        ids
    }

    /// Begins the drain: no session registers from now on, and every live one is ordered out.
    pub fn close(&self) -> usize {
        let sessions = self.sessions();
        self.closing.store(true, Ordering::Release);
        for live in sessions.values() {
            live.give(Order::Shutdown);
        }
        let n = sessions.len();
        drop(sessions);
        self.wake_all();
        n
    }

    /// Resolves once no session is live.
    pub async fn drained(&self) {
        loop {
            let notified = self.emptied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// A session's entry; dropping it removes the session from the registry.
pub struct Registration {
    registry: Arc<Registry>,
    key: u64,
    live: Arc<Live>,
}

impl Registration {
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The session passed the checks made once it was registered: it counts as started.
    pub fn started(&self) {
        self.registry.total.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let empty = {
            let mut sessions = self.registry.sessions();
            sessions.remove(&self.key);
            sessions.is_empty()
        };
        if empty {
            self.registry.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every session holds its entry for its life, a client that has not spoken yet too
    /// (10,000 of them are the bench's idle test): the slot of an order, which few sessions
    /// ever get, is boxed; the identity and the mapping's strings are held once for all the
    /// sessions that share them (456 bytes with them inline).
    #[test]
    fn a_session_s_entry_stays_small() {
        let size = std::mem::size_of::<Live>();
        assert!(size <= 192, "a registry entry: {size} bytes");
    }

    fn facts(id: &str, uid: u32) -> Facts {
        Facts {
            id: id.into(),
            audited: true,
            principal: ArcIntern::new(format!("unit:app-{uid}.service")),
            role: ArcIntern::from_ref("app"),
            database: ArcIntern::from_ref("db"),
            identity: ArcIntern::new(Identity::from_kernel_facts(
                crate::identity::Source::UnixPeerCred,
                uid,
                uid,
                None,
            )),
            upstream: ArcIntern::from_ref("127.0.0.1:5432"),
            peer: "unix".into(),
            tls: false,
            pool: crate::config::PoolMode::None,
        }
    }

    #[tokio::test]
    async fn an_order_reaches_the_sessions_it_names_and_only_those() {
        let registry = Arc::new(Registry::default());
        let a = registry
            .register(Live::new(facts("a", 1000), State::Idle))
            .unwrap();
        let b = registry
            .register(Live::new(facts("b", 1001), State::Idle))
            .unwrap();
        let mut woken = registry.subscribe();
        let by = Operator {
            uid: 0,
            user: Some("root".into()),
            pid: None,
        };
        // By an identity name, not the mapping's principal.
        let ids = registry.order(|l| l.answers_to("uid:1000"), &Order::Kill { by });
        assert_eq!(ids, vec!["a".to_string()]);
        tokio::time::timeout(Duration::from_secs(1), woken.changed())
            .await
            .expect("waiting sessions are woken")
            .unwrap();
        assert!(b.live().order().is_none());
        assert!(matches!(a.live().order(), Some(Order::Kill { .. })));
    }

    #[tokio::test]
    async fn the_drain_orders_everyone_out_and_lets_nobody_in() {
        let registry = Arc::new(Registry::default());
        let a = registry
            .register(Live::new(facts("a", 1000), State::Active))
            .unwrap();
        // Registered and refused by the checks made once registered: not a started session.
        drop(
            registry
                .register(Live::new(facts("refused", 1000), State::Idle))
                .unwrap(),
        );
        assert_eq!(registry.total(), 0);
        a.started();
        assert_eq!(registry.close(), 1);
        assert!(matches!(a.live().order(), Some(Order::Shutdown)));
        assert!(registry
            .register(Live::new(facts("b", 1001), State::Idle))
            .is_err());
        let drained = tokio::spawn({
            let registry = registry.clone();
            async move { registry.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .expect("drained once the last session left")
            .unwrap();
        assert_eq!(registry.total(), 1);
    }

    #[test]
    fn counters_and_state_show_in_the_view() {
        let registry = Arc::new(Registry::default());
        let a = registry
            .register(Live::new(facts("a", 1000), State::NotConnected))
            .unwrap();
        a.live().decided(true);
        a.live().decided(false);
        a.live().decided(true);
        a.live().bytes_in(10);
        a.live().bytes_out(25);
        a.live().set_state(State::InTransaction);
        let v = &registry.list()[0];
        assert_eq!(
            (v.allowed, v.refused, v.bytes_in, v.bytes_out),
            (2, 1, 10, 25)
        );
        assert_eq!(v.state, State::InTransaction);
        assert!(v.last_statement_ms.is_some());
        drop(a);
        assert!(registry.is_empty());
    }
}
