//! Backends that outlive their sessions: the pools that mappings with `pool = "session"` or
//! `"transaction"` draw from, per server and login (role, database, startup parameters).
//!
//! A backend is handed to the next session only after [`reset`] has undone its last
//! session's state and the backend itself has confirmed it is back to its login state; one
//! that fails is closed. The one exception is a transaction-pooled session's backend between
//! two of its transactions ([`Pools::park`]): it is kept *owned* by the session's principal,
//! and goes without a reset only to the next transaction of that same principal (whose own
//! state it may carry, as a session's backend carries it from one transaction to the next);
//! to anyone else only after the reset.
//!
//! What pgiam holds open to one server is capped (`pool.max_backends`):
//! a session that needs a backend beyond the cap takes an idle one of another login's (closed
//! to make room) or waits in a queue, and is refused (53300) when the wait runs out. A reload
//! of the settings starts a new generation: idle backends are closed, and those in use are
//! closed when their sessions end, so no backend outlives the settings it logged in under.

pub mod reset;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::config;
use crate::stream::BoxStream;
use crate::upstream::{self, Established, LoginKey, Parameters};
use crate::wire::TransactionStatus;

/// What a backend holds under each prepared statement name (transaction pooling), as the
/// Parse that created it: the sessions that land on it bring it to what they hold.
pub type Held = HashMap<Vec<u8>, bytes::Bytes>;

/// How long a reset may take before the backend is given up.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Every pool of the process.
pub struct Pools {
    state: Mutex<State>,
    /// A backend went idle or room was made: sessions in the queue look again.
    changed: Notify,
    generation: AtomicU64,
    nonces: AtomicU64,
}

#[derive(Default)]
struct State {
    servers: HashMap<Option<SocketAddr>, Server>,
}

/// What pgiam holds open to one server (`None`: the configured upstream).
struct Server {
    /// One permit per backend, in use or idle.
    room: Arc<Semaphore>,
    cap: usize,
    /// Idle backends per login, the most recently used last.
    idle: HashMap<Arc<LoginKey>, Vec<Idle>>,
    in_use: usize,
    waiting: usize,
}

struct Idle {
    backend: Backend,
    room: OwnedSemaphorePermit,
    since: Instant,
    /// The principal whose transactions it served since its last reset (parked between two
    /// of them); `None`: reset, fit for anyone.
    owner: Option<Arc<str>>,
}

/// A backend between two sessions.
struct Backend {
    stream: BoxStream,
    facts: Facts,
}

/// What the pool knows of a backend, idle or leased.
struct Facts {
    /// The backend's reports as they stand (its login state's once reset; with the role
    /// it assumed since, if any).
    parameters: Parameters,
    process_id: i32,
    secret_key: i32,
    born: Instant,
    /// The settings' generation it logged in under.
    generation: u64,
    /// The role it has assumed since its last reset (gateway mode).
    assumed: Option<String>,
    /// The prepared statements transaction-pooled sessions left on it since its last reset.
    held: Held,
}

impl Facts {
    /// A backend about to be opened under the settings of `generation`.
    fn opening(generation: u64) -> Facts {
        Facts {
            parameters: Parameters::default(),
            process_id: 0,
            secret_key: 0,
            born: Instant::now(),
            generation,
            assumed: None,
            held: Held::new(),
        }
    }

    /// What its login told.
    fn learn(&mut self, established: &Established) {
        self.parameters = established.parameters.clone();
        self.process_id = established.process_id;
        self.secret_key = established.secret_key;
    }
}

/// A session's hold on a pooled backend: its place under the server's cap, and what the
/// pool needs to take the backend back. (The stream is the session's while it runs.)
pub struct Lease {
    pools: Arc<Pools>,
    key: Arc<LoginKey>,
    facts: Facts,
    room: Option<OwnedSemaphorePermit>,
    /// The principal it serves (a transaction-pooled session's: it is parked owned by it).
    owner: Option<Arc<str>>,
    /// Whether the backend had served a session before this one.
    pub reused: bool,
}

impl Lease {
    /// The role the backend has assumed since its last reset, if any.
    pub fn assumed(&self) -> Option<&str> {
        self.facts.assumed.as_deref()
    }

    /// The prepared statements the backend holds, for the session on it to bring to its own.
    pub fn held(&mut self) -> &mut Held {
        &mut self.facts.held
    }

    /// Notes that the backend now acts as `role` (SET ROLE in gateway mode), and reports
    /// `parameters` since.
    pub fn assume(&mut self, role: &str, parameters: &Parameters) {
        self.facts.assumed = Some(role.to_owned());
        self.facts.parameters = parameters.clone();
    }
}

/// A backend whose session ended with nothing outstanding, given back.
pub struct Released {
    pub stream: BoxStream,
    /// Bytes the session read from the server and did not pass on: the start of a message
    /// no request asked for (a notification), which the reset reads on from.
    pub leftover: BytesMut,
    /// The server's last word was that a transaction block is open (or failed).
    pub in_block: bool,
}

/// Why no backend was had.
#[derive(Debug)]
pub enum PoolError<E> {
    /// The queue's wait (this long) ran out: the cap on backends to the server is reached.
    Full(Duration),
    /// Opening a new backend failed.
    Open(E),
}

/// A snapshot for `pgiam status` and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Occupancy {
    pub in_use: usize,
    pub idle: usize,
    pub waiting: usize,
}

/// What one look at a server's pool found: a backend (which must be reset first if another
/// principal's transactions left it parked), or room to open one.
enum Found {
    Idle {
        backend: Backend,
        room: OwnedSemaphorePermit,
        foreign: bool,
    },
    Room(OwnedSemaphorePermit),
}

impl Default for Pools {
    fn default() -> Self {
        Pools {
            state: Mutex::default(),
            changed: Notify::new(),
            generation: AtomicU64::new(0),
            nonces: AtomicU64::new(rand::random()),
        }
    }
}

impl Pools {
    fn locked(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A backend for `key`, serving `owner` (a transaction-pooled session's principal): an
    /// idle one (`owner`'s own parked one first, then a reset one, then another principal's,
    /// reset now), or a new one from `open` while there is room; else a place in the queue
    /// until one comes free or `limits.queue_timeout_secs` pass.
    pub async fn checkout<E, F, Fut>(
        self: &Arc<Self>,
        key: Arc<LoginKey>,
        owner: Option<Arc<str>>,
        limits: &config::Pool,
        max_message_size: usize,
        open: F,
    ) -> Result<(Lease, Established), PoolError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Established, E>>,
    {
        let deadline = tokio::time::Instant::now() + limits.queue_timeout();
        // Counted among the waiting from its first look that finds no room until it leaves the
        // queue, however it leaves (a session dropped while it waits, by its startup timeout,
        // included).
        let mut queued: Option<Queued<'_>> = None;
        let found = loop {
            // Listening before looking: what frees a backend after the look wakes this.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let (found, closing) = self.take(&key, owner.as_deref(), limits, queued.is_some());
            close_all(closing);
            match found {
                // Another principal's: undone before this one sees it. One that fails its
                // reset is closed, and the look starts again.
                Some(Found::Idle {
                    mut backend,
                    room,
                    foreign: true,
                }) => {
                    let Backend { stream, facts } = &mut backend;
                    let clean = self
                        .reset_backend(
                            &key,
                            stream,
                            facts,
                            BytesMut::new(),
                            false,
                            max_message_size,
                        )
                        .await;
                    if clean {
                        break Some(Found::Idle {
                            backend,
                            room,
                            foreign: false,
                        });
                    }
                    self.leave(key.target, Some(room));
                    close(backend.stream).await;
                    continue;
                }
                Some(found) => break Some(found),
                None => {}
            }
            queued.get_or_insert_with(|| Queued::join(self, key.target));
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break None;
            }
        };
        // Served from the queue: the next in line looks too, if there is more to take (one
        // backend announced wakes one session).
        if queued.take().is_some() && found.is_some() && self.more_for_the_queue(key.target) {
            self.changed.notify_one();
        }
        let metrics = crate::metrics::get();
        match found {
            None => {
                metrics.pool_checkout(crate::metrics::Checkout::Timeout);
                Err(PoolError::Full(limits.queue_timeout()))
            }
            Some(Found::Idle { backend, room, .. }) => {
                metrics.pool_checkout(crate::metrics::Checkout::Reused);
                debug!(
                    backend_pid = backend.facts.process_id,
                    "pooled backend reused"
                );
                let established = Established {
                    stream: backend.stream,
                    parameters: backend.facts.parameters.clone(),
                    notices: BytesMut::new(),
                    process_id: backend.facts.process_id,
                    secret_key: backend.facts.secret_key,
                    status: TransactionStatus::Idle,
                };
                Ok((
                    self.lease(key, owner, backend.facts, room, true),
                    established,
                ))
            }
            Some(Found::Room(room)) => {
                // Counted in use while it opens (the room is taken), under the settings in
                // force as it opens.
                let generation = self.generation.load(Ordering::Acquire);
                let mut lease = self.lease(key, owner, Facts::opening(generation), room, false);
                let established = open().await.map_err(PoolError::Open)?;
                metrics.pool_checkout(crate::metrics::Checkout::Opened);
                lease.facts.learn(&established);
                Ok((lease, established))
            }
        }
    }

    fn lease(
        self: &Arc<Self>,
        key: Arc<LoginKey>,
        owner: Option<Arc<str>>,
        facts: Facts,
        room: OwnedSemaphorePermit,
        reused: bool,
    ) -> Lease {
        Lease {
            pools: self.clone(),
            key,
            facts,
            room: Some(room),
            owner,
            reused,
        }
    }

    /// Puts a backend through the reset (within [`RESET_TIMEOUT`]), counted and, if it fails,
    /// logged; a clean one has assumed no role and holds no statement since. `false`: it
    /// failed, and is to be closed.
    async fn reset_backend(
        &self,
        key: &LoginKey,
        stream: &mut BoxStream,
        facts: &mut Facts,
        leftover: BytesMut,
        in_block: bool,
        max_message_size: usize,
    ) -> bool {
        let nonce = self.nonces.fetch_add(1, Ordering::Relaxed);
        let reset = tokio::time::timeout(
            RESET_TIMEOUT,
            reset(
                stream,
                leftover,
                in_block,
                &key.role,
                nonce,
                &mut facts.parameters,
                max_message_size,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", RESET_TIMEOUT.as_secs())));
        crate::metrics::get().pool_reset(reset.is_ok());
        match reset {
            Ok(()) => {
                facts.assumed = None;
                facts.held.clear();
                true
            }
            Err(e) => {
                warn!(role = %key.role, "a pooled backend failed its reset and is closed: {e}");
                false
            }
        }
    }

    /// A backend that must not be kept: logged in under settings since reloaded, or past its
    /// lifetime.
    fn retired(&self, facts: &Facts, limits: &config::Pool) -> bool {
        facts.generation != self.generation.load(Ordering::Acquire)
            || facts.born.elapsed() >= limits.max_lifetime()
    }

    /// Sessions wait for a server that has an idle backend or room for one.
    fn more_for_the_queue(&self, target: Option<SocketAddr>) -> bool {
        self.locked().servers.get(&target).is_some_and(|s| {
            s.waiting > 0 && (!s.idle.is_empty() || s.room.available_permits() > 0)
        })
    }

    /// A backend counted in use leaves the count (a lease ends, or one taken from the pool is
    /// closed before it was leased), with its room if it still holds it. Room freed: every
    /// session in the queue may use it (for another login too). A backend kept idle instead is
    /// announced by whoever kept it, to one session: with thousands queued, waking them all
    /// for each would cost more than the work.
    fn leave(&self, target: Option<SocketAddr>, room: Option<OwnedSemaphorePermit>) {
        // The room first: a session woken below must find it free.
        let freed = room.is_some();
        drop(room);
        if let Some(server) = self.locked().servers.get_mut(&target) {
            server.in_use = server.in_use.saturating_sub(1);
        }
        if freed {
            self.changed.notify_waiters();
        }
    }

    /// One look at the pool (under its lock): an idle backend of this login (see
    /// [`Server::pick`]), room for a new one (closing an idle backend of another login's if
    /// that is what it takes), or neither. Expired backends met on the way are returned to
    /// be closed.
    ///
    /// A session that is not queued yet takes nothing while others are: they come first
    /// (else sessions coming back for their next transaction would keep the backends from
    /// those queued, for ever).
    fn take(
        &self,
        key: &Arc<LoginKey>,
        owner: Option<&str>,
        limits: &config::Pool,
        queued: bool,
    ) -> (Option<Found>, Vec<Backend>) {
        let generation = self.generation.load(Ordering::Acquire);
        let mut state = self.locked();
        let server = state
            .servers
            .entry(key.target)
            .or_insert_with(|| Server::new(limits.max_backends));
        server.resize(limits.max_backends);
        let mut closing = server.expire(Instant::now(), limits, generation);
        if !queued && server.waiting > 0 {
            return (None, closing);
        }
        if let Some((idle, foreign)) = server.pick(key, owner) {
            server.in_use += 1;
            return (
                Some(Found::Idle {
                    backend: idle.backend,
                    room: idle.room,
                    foreign,
                }),
                closing,
            );
        }
        let room = match server.room.clone().try_acquire_owned() {
            Ok(room) => Some(room),
            Err(_) => match server.oldest_idle() {
                Some(victim) => {
                    drop(victim.room);
                    closing.push(victim.backend);
                    server.room.clone().try_acquire_owned().ok()
                }
                None => None,
            },
        };
        if room.is_some() {
            server.in_use += 1;
        }
        (room.map(Found::Room), closing)
    }

    /// Takes a backend back from its ended session: reset, checked, and kept for the next
    /// session with its login, or closed if any of that fails or it has served long enough.
    pub async fn checkin(
        &self,
        mut lease: Lease,
        released: Released,
        limits: &config::Pool,
        max_message_size: usize,
    ) {
        let Released {
            mut stream,
            leftover,
            in_block,
        } = released;
        if self.retired(&lease.facts, limits) {
            debug!("pooled backend retired (settings reloaded, or past its lifetime)");
            close(stream).await;
            return;
        }
        let key = lease.key.clone();
        let clean = self
            .reset_backend(
                &key,
                &mut stream,
                &mut lease.facts,
                leftover,
                in_block,
                max_message_size,
            )
            .await;
        if !clean {
            close(stream).await;
            return;
        }
        self.keep(lease, stream, None, limits).await;
    }

    /// Takes a backend back between two transactions of a transaction-pooled session: kept,
    /// without a reset, owned by the session's principal (see the module's doc), or closed if
    /// it has served long enough or holds part of a message.
    pub async fn park(&self, mut lease: Lease, released: Released, limits: &config::Pool) {
        if self.retired(&lease.facts, limits) || !released.leftover.is_empty() || released.in_block
        {
            debug!("parked backend retired (settings reloaded, past its lifetime, or not quiet)");
            close(released.stream).await;
            return;
        }
        let owner = lease.owner.take();
        self.keep(lease, released.stream, owner, limits).await;
    }

    /// Closes a leased backend instead of taking it back (one a cancel may still reach).
    pub async fn discard(&self, lease: Lease, released: Released) {
        debug!("pooled backend closed: a cancel may be on its way to it");
        close(released.stream).await;
        drop(lease);
    }

    /// Puts a backend among the idle ones of its login (owned by `owner`), unless there are
    /// `limits.size` already: then it is closed.
    async fn keep(
        &self,
        mut lease: Lease,
        stream: BoxStream,
        owner: Option<Arc<str>>,
        limits: &config::Pool,
    ) {
        let backend = Backend {
            stream,
            facts: Facts {
                // (A shared list: cloned, not taken, as taking leaves a new empty one behind.)
                parameters: lease.facts.parameters.clone(),
                assumed: lease.facts.assumed.take(),
                held: std::mem::take(&mut lease.facts.held),
                ..lease.facts
            },
        };
        let surplus = {
            let mut state = self.locked();
            match (state.servers.get_mut(&lease.key.target), lease.room.take()) {
                (Some(server), Some(room)) if limits.size > 0 => {
                    let list = server.idle.entry(lease.key.clone()).or_default();
                    if list.len() < limits.size {
                        list.push(Idle {
                            backend,
                            room,
                            since: Instant::now(),
                            owner,
                        });
                        None
                    } else {
                        lease.room = Some(room);
                        Some(backend)
                    }
                }
                (_, room) => {
                    // Closed below: its room goes with the lease.
                    lease.room = room;
                    Some(backend)
                }
            }
        };
        // The lease ends here: one session in the queue hears of the idle backend (any
        // session can use it), or all of them of the room its close makes.
        let kept = surplus.is_none();
        drop(lease);
        if kept {
            self.changed.notify_one();
        }
        if let Some(backend) = surplus {
            close(backend.stream).await;
        }
    }

    /// Closes idle backends past their idle timeout or lifetime (run every second or so).
    pub fn reap(&self, limits: &config::Pool) {
        let generation = self.generation.load(Ordering::Acquire);
        let closing: Vec<Backend> = {
            let mut state = self.locked();
            let now = Instant::now();
            state
                .servers
                .values_mut()
                .flat_map(|s| s.expire(now, limits, generation))
                .collect()
        };
        if !closing.is_empty() {
            debug!(backends = closing.len(), "idle pooled backends closed");
            self.changed.notify_waiters();
        }
        close_all(closing);
    }

    /// New settings are in force: idle backends are closed, and those in use are not kept when
    /// their sessions end.
    pub fn renew(&self) {
        close_all(self.retire());
        self.changed.notify_waiters();
    }

    /// pgiam is stopping: every idle backend is told goodbye before the process ends.
    pub async fn shut(&self) {
        let closing = self.retire();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for b in closing {
                close(b.stream).await;
            }
        })
        .await;
    }

    /// Starts a new generation and takes out every idle backend.
    fn retire(&self) -> Vec<Backend> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut state = self.locked();
        state
            .servers
            .values_mut()
            .flat_map(|s| s.idle.drain().flat_map(|(_, v)| v).map(|i| i.backend))
            .collect()
    }

    /// Backends in use and idle, and sessions waiting, over every server.
    pub fn occupancy(&self) -> Occupancy {
        let state = self.locked();
        state
            .servers
            .values()
            .fold(Occupancy::default(), |o, s| Occupancy {
                in_use: o.in_use + s.in_use,
                idle: o.idle + s.idle.values().map(Vec::len).sum::<usize>(),
                waiting: o.waiting + s.waiting,
            })
    }
}

/// A session in a server's queue; leaving it (any way) counts it out.
struct Queued<'a> {
    pools: &'a Pools,
    target: Option<SocketAddr>,
}

impl<'a> Queued<'a> {
    fn join(pools: &'a Pools, target: Option<SocketAddr>) -> Queued<'a> {
        if let Some(server) = pools.locked().servers.get_mut(&target) {
            server.waiting += 1;
        }
        Queued { pools, target }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut state = self.pools.locked();
        if let Some(server) = state.servers.get_mut(&self.target) {
            server.waiting = server.waiting.saturating_sub(1);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pools.leave(self.key.target, self.room.take());
    }
}

impl Server {
    fn new(cap: usize) -> Server {
        Server {
            room: Arc::new(Semaphore::new(cap)),
            cap,
            idle: HashMap::new(),
            in_use: 0,
            waiting: 0,
        }
    }

    /// Follows a reloaded cap: more room at once; less as backends leave.
    fn resize(&mut self, cap: usize) {
        if cap > self.cap {
            self.room.add_permits(cap - self.cap);
        } else if cap < self.cap {
            let gone = self.room.forget_permits(self.cap - cap);
            // What could not be taken back now is held by backends: the cap falls as they
            // close (the difference is forgotten from the next resize on).
            self.cap -= gone;
            return;
        }
        self.cap = cap;
    }

    /// Takes out idle backends past their idle timeout or lifetime, or of older settings.
    fn expire(&mut self, now: Instant, limits: &config::Pool, generation: u64) -> Vec<Backend> {
        let stale = |i: &mut Idle| {
            i.backend.facts.generation != generation
                || now.duration_since(i.since) >= limits.idle_timeout()
                || now.duration_since(i.backend.facts.born) >= limits.max_lifetime()
        };
        // Taken out in place, in order: this runs at every checkout, and mostly finds nothing.
        let mut out = Vec::new();
        for list in self.idle.values_mut() {
            out.extend(list.extract_if(.., stale).map(|i| i.backend));
        }
        self.idle.retain(|_, v| !v.is_empty());
        out
    }

    /// Takes an idle backend of `key` for `owner`: the most recently used one `owner` parked
    /// itself (no reset needed), else the most recent reset one, else the most recent of
    /// another principal's (`true`: it must be reset first).
    fn pick(&mut self, key: &Arc<LoginKey>, owner: Option<&str>) -> Option<(Idle, bool)> {
        let list = self.idle.get_mut(key)?;
        let at = |want: &dyn Fn(&Idle) -> bool| list.iter().rposition(want);
        let own = owner.and_then(|o| at(&|i: &Idle| i.owner.as_deref() == Some(o)));
        let (index, foreign) = match own.or_else(|| at(&|i: &Idle| i.owner.is_none())) {
            Some(i) => (i, false),
            None => (list.len().checked_sub(1)?, true),
        };
        let idle = list.remove(index);
        if list.is_empty() {
            self.idle.remove(key);
        }
        Some((idle, foreign))
    }

    fn forget_empty(&mut self, key: &Arc<LoginKey>) {
        if self.idle.get(key).is_some_and(Vec::is_empty) {
            self.idle.remove(key);
        }
    }

    /// The idle backend unused longest, of any login.
    fn oldest_idle(&mut self) -> Option<Idle> {
        let key = self
            .idle
            .iter()
            .filter_map(|(k, v)| v.first().map(|i| (k.clone(), i.since)))
            .min_by_key(|(_, since)| *since)?
            .0;
        let list = self.idle.get_mut(&key)?;
        let oldest = list.remove(0);
        self.forget_empty(&key);
        Some(oldest)
    }
}

/// Puts a backend through the reset and reads its verdict. Errors are for the log.
async fn reset(
    stream: &mut BoxStream,
    leftover: BytesMut,
    in_block: bool,
    login_role: &str,
    nonce: u64,
    parameters: &mut Parameters,
    max_message_size: usize,
) -> Result<(), String> {
    if reset_disabled_for_tests() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    let mut check = reset::Reset::new(login_role, in_block, nonce, &mut out);
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = leftover;
    loop {
        let (tag, body) = upstream::read_message(stream, &mut buf, max_message_size)
            .await
            .map_err(|e| e.to_string())?;
        if check
            .step(tag, &body, parameters)
            .map_err(|e| e.to_string())?
            == reset::Progress::Clean
        {
            if !buf.is_empty() {
                return Err("the server sent more after the check".into());
            }
            return Ok(());
        }
    }
}

/// The role-safety tests prove each case leaks without the reset: a debug build only may be
/// told to skip it. A release build has no way to.
fn reset_disabled_for_tests() -> bool {
    #[cfg(debug_assertions)]
    {
        static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let disabled = *DISABLED
            .get_or_init(|| std::env::var_os("PGIAM_TEST_UNSAFE_SKIP_POOL_RESET").is_some());
        if disabled {
            warn!("PGIAM_TEST_UNSAFE_SKIP_POOL_RESET: a pooled backend is handed on without its reset");
        }
        disabled
    }
    #[cfg(not(debug_assertions))]
    false
}

fn close_all(backends: Vec<Backend>) {
    if backends.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for b in backends {
            close(b.stream).await;
        }
    });
}

/// Says goodbye to a backend (Terminate), briefly: one that does not take it is dropped.
async fn close(mut stream: BoxStream) {
    let mut t = BytesMut::new();
    postgres_protocol::message::frontend::terminate(&mut t);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&t).await?;
        stream.shutdown().await
    })
    .await;
}
