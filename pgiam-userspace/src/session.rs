//! One client connection, from the first byte to the last: TLS and startup negotiation, the
//! identity → role mapping, the upstream login, and the relay.
//!
//! The session runs over any [`BoxStream`], so tests drive it through in-memory pipes; the pure
//! decisions (which startup parameters pass, what a refusal says) live in [`startup`]. Getting
//! a session established is `establish`; the relay of an established session is `relay`;
//! ending one from outside (an order, a revoked policy) is `ending`. A session idle between
//! two transactions for a second or two gives its relay back and waits in [`rest`] until
//! either side speaks (a transaction-pooled one gives its backend back too, between every
//! two transactions).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::admin::registry::{Order, Registration, Registry, State};
use crate::cancel::CancelRegistry;
use crate::identity::{Identity, IdentityError};
use crate::stream::{BoxStream, Stream};
use crate::wire::{self, PgError, WireError};

mod carried;
mod durability;
mod ending;
mod establish;
use ending::{ordered_out, revoke};
use establish::establish;
use relay::{read_when_ready, relay, ReadSize};
mod login;
mod password;
mod relay;
mod responses;
pub mod startup;
mod statements;

/// What every session shares: the configuration in force and the process-wide registries.
pub struct Shared {
    /// The configuration in force and the upstream connector built from it (reloadable).
    pub settings: Arc<crate::settings::Settings>,
    pub audit: Option<crate::audit::AuditLog>,
    pub tls: Option<crate::tls::ClientAcceptor>,
    pub cancels: Arc<CancelRegistry>,
    pub policies: Arc<crate::policy::PolicyStore>,
    /// The live sessions, for the admin socket and the drain.
    pub registry: Arc<Registry>,
    /// Principals an operator has revoked.
    pub revocations: Arc<crate::admin::revocations::Revocations>,
    /// Backends kept for the next session of pooled mappings.
    pub pools: Arc<crate::pool::Pools>,
    /// The people logged in on this host (`pgiam login`), and their issuers.
    pub people: Arc<crate::people::People>,
    /// What each database's catalog says its operators and casts run.
    pub catalogs: Arc<crate::catalog::cache::Catalogs>,
}

/// Who the client is, and where it was going.
pub struct ClientOrigin {
    pub identity: Identity,
    /// The database address an intercepted application dialled; `None`: the configured one.
    pub destination: Option<std::net::SocketAddr>,
}

impl From<Identity> for ClientOrigin {
    fn from(identity: Identity) -> Self {
        ClientOrigin {
            identity,
            destination: None,
        }
    }
}

/// How the client's identity is obtained: unix peers are known at accept; TCP peers are looked
/// up (kernel record or /proc) only once the client has asked for a session (a CancelRequest
/// needs none).
pub enum IdentitySource {
    Known(Box<Result<ClientOrigin, IdentityError>>),
    Lookup(Box<dyn FnOnce() -> Result<ClientOrigin, IdentityError> + Send>),
}

impl IdentitySource {
    async fn resolve(self) -> Result<ClientOrigin, IdentityError> {
        match self {
            IdentitySource::Known(r) => *r,
            IdentitySource::Lookup(f) => tokio::task::spawn_blocking(f)
                .await
                .unwrap_or_else(|e| Err(IdentityError::PeerCred(std::io::Error::other(e)))),
        }
    }
}

/// Why a session ended early.
enum Refusal {
    /// Tell the client, then close.
    Client(PgError),
    /// The server's own FATAL during login, passed through.
    ServerFrame(Bytes),
    /// Nothing sensible can be written (the client left, or the channel is not ours to speak on).
    Silent(String),
}

impl From<PgError> for Refusal {
    fn from(e: PgError) -> Self {
        Refusal::Client(e)
    }
}

impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Self {
        Refusal::Silent(format!("client I/O: {e}"))
    }
}

fn protocol_violation(e: WireError) -> PgError {
    let code = match e {
        WireError::UnsupportedProtocol { .. } => "0A000",
        _ => "08P01",
    };
    PgError::fatal(code, format!("pgiam: {e}"))
}

struct Client {
    stream: BoxStream,
    buf: BytesMut,
    tls: bool,
    peer: String,
}

/// What only establishing the session needs. (Boxed, and given up once the session is
/// established: the task would hold it for the session's life.)
struct Arrival {
    identity: IdentitySource,
    /// The address the client dialled (TCP), for the certificate it is shown.
    dialled: Option<std::net::IpAddr>,
}

impl Client {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn fill(&mut self) -> Result<(), Refusal> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(2048);
        }
        match self.stream.read_buf(&mut self.buf).await? {
            0 if self.buf.is_empty() => Err(Refusal::Silent("client closed the connection".into())),
            0 => Err(Refusal::Silent(
                "client closed the connection mid-message".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Runs one client connection to completion.
///
/// The task is sized by its largest inline stage, and a client that has not spoken yet
/// (deferred) holds only that wait: every other stage is boxed (a timer alone is hundreds of
/// bytes), and nothing is held twice (an `async fn` keeps its arguments beside the locals they
/// are moved into, hence the block; a value matched and moved out of keeps its room, hence the
/// temporaries).
pub fn run(
    shared: Arc<Shared>,
    stream: BoxStream,
    identity: IdentitySource,
    peer: String,
    dialled: Option<std::net::IpAddr>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut client = Client {
        stream,
        buf: BytesMut::with_capacity(ReadSize::MIN),
        tls: false,
        peer,
    };
    let arrival = Box::new(Arrival { identity, dialled });
    async move {
        let establishing = tokio::time::timeout(
            shared.settings.current().config.limits.startup_timeout(),
            establish(&shared, &mut client, arrival),
        );
        // Every way this can end early is one wait: a value held across several waits keeps
        // its room in every state of the task.
        let (mut session, link) = match Box::pin(establishing).await {
            Ok(Ok(Some(established))) => established,
            outcome => {
                let refusal = match outcome {
                    Ok(Ok(_)) => None,
                    Ok(Err(refusal)) => Some(refusal),
                    Err(_) => Some(Refusal::Client(PgError::fatal(
                        "08006",
                        format!(
                            "pgiam: session not established within {}s",
                            shared
                                .settings
                                .current()
                                .config
                                .limits
                                .startup_timeout()
                                .as_secs()
                        ),
                    ))),
                };
                return Box::pin(refuse(&mut client, refusal)).await;
            }
        };
        let mut link = link;
        loop {
            let upstream = 'upstream: {
                let deferred = match std::convert::identity(link) {
                    login::Link::Open(upstream) => break 'upstream upstream,
                    login::Link::Deferred(deferred) => deferred,
                };
                let woke = first_message(&shared, &mut client, &mut session).await;
                let opened = open_deferred(&shared, &mut client, &mut session, deferred, woke);
                match Box::pin(opened).await {
                    Ok(upstream) => upstream,
                    Err(ended_by) => return session.finish(&shared, &client.peer, ended_by),
                }
            };
            // A session with its backend and nothing of the client's in hand rests until
            // either side speaks: one whose relay rested, and one whose backend opened with its
            // login and that has not spoken yet (one whose backend has just opened for its
            // first message has that message in hand). Not a transaction-pooled one: its relay
            // gives the backend back to the pool, and it has none while it waits. (Waited for
            // in a block of its own and outside the match above: what the wait borrows is held
            // in the task only while it waits.)
            let upstream = {
                let mut upstream = upstream;
                if client.buf.is_empty() && session.transactions.is_none() {
                    let woken = shared.registry.subscribe();
                    rest(woken, &mut client, &session, &mut upstream.stream).await;
                }
                upstream
            };
            // (`ended` is never borrowed, only read and moved: a local borrowed is kept in the
            // task's every later state, even once moved.)
            let ended = Box::pin(relay(&shared, &mut client, &mut session, upstream)).await;
            let ended = match ended.resting() {
                Ok(backend) => {
                    link = login::Link::Open(backend);
                    continue;
                }
                Err(ended) => ended,
            };
            if let (true, Some(t)) = (ended.between_transactions, &session.transactions) {
                let parked = between_transactions(&shared, &session.cancel_key, t, ended);
                link = Box::pin(parked).await;
                continue;
            }
            return Box::pin(conclude(&shared, &client.peer, session, ended)).await;
        }
    }
}

/// A transaction-pooled session between two transactions: its backend goes back to the pool
/// (owned by its principal), and it waits for its next message as a deferred session does.
async fn between_transactions(
    shared: &Shared,
    cancel_key: &crate::cancel::Registration,
    transactions: &Transactions,
    ended: relay::Ended,
) -> login::Link {
    if let Some((lease, released)) = ended.released {
        // A cancel sent from now on has nothing of this session's to cancel; one under way
        // might reach the backend while another session's statement runs on it.
        if cancel_key.disconnect() {
            shared.pools.discard(*lease, released).await;
        } else {
            let current = shared.settings.current();
            shared
                .pools
                .park(*lease, released, &current.config.pool)
                .await;
        }
    }
    login::Link::Deferred(transactions.reattach.clone())
}

/// A session's end: its end record, and its backend reset for the next client (pooled, and
/// given back by the relay) or closed.
async fn conclude(shared: &Shared, peer: &str, session: Session, ended: relay::Ended) {
    session.finish(shared, peer, ended.why);
    if let Some((lease, released)) = ended.released {
        let current = shared.settings.current();
        let config = &current.config;
        shared
            .pools
            .checkin(
                *lease,
                released,
                &config.pool,
                config.limits.max_message_size,
            )
            .await;
    }
}

/// Tells a client its session will not be, if the refusal says anything, and closes; `None`:
/// a connection that only carried a CancelRequest, handled. That one is closed as the server
/// closes it: over TLS with a close_notify, which libpq ≥ 17 (cancel inside TLS) reads as the
/// answer; an EOF without one is an error to it.
async fn refuse(client: &mut Client, refusal: Option<Refusal>) {
    match refusal {
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.stream.shutdown()).await;
        }
        Some(refusal) => {
            if let Some(frame) = refusal.frame(&client.peer) {
                last_word(client, &frame).await;
            }
        }
    }
}

impl Refusal {
    /// What to tell the client, if anything; logged either way.
    fn frame(self, peer: &str) -> Option<Bytes> {
        match self {
            Refusal::Silent(why) => {
                debug!(peer = %peer, "connection closed: {why}");
                None
            }
            Refusal::Client(e) => {
                info!(peer = %peer, code = e.code, "connection refused: {}", e.message);
                let mut b = BytesMut::new();
                e.encode(&mut b);
                Some(b.freeze())
            }
            Refusal::ServerFrame(frame) => Some(frame),
        }
    }
}

/// Writes a final error and closes. Best effort, bounded: a client that does not read its
/// error must not hold the task.
async fn last_word(client: &mut Client, frame: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        client.write(frame).await?;
        client.stream.shutdown().await
    })
    .await;
}

/// What ended a deferred session's wait.
enum Woke {
    /// The client sent something.
    Spoke,
    /// The client left (why).
    Left(String),
    /// The policy no longer lets the session connect.
    Revoked(crate::policy::Decision),
    /// An operator, or the drain, ordered it out.
    Ordered(Order),
}

/// A deferred session waits here, holding no server connection, until the client first sends
/// something or the policy takes its access away (a new policy, or its person's renewed login).
/// (Not an `async fn`, which would hold its arguments twice: this wait is inline in the task.)
#[allow(clippy::manual_async_fn)]
fn first_message<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    session: &'a mut Session,
) -> impl std::future::Future<Output = Woke> + Send + 'a {
    async move {
        let mut woken = shared.registry.subscribe();
        // A waiting client holds no read buffer: room is made once it has sent something.
        if client.buf.is_empty() {
            client.buf = BytesMut::new();
        }
        let mut size = ReadSize::default();
        loop {
            if let Some(order) = session.registration.live().order() {
                return Woke::Ordered(order);
            }
            let renewed = session.gate.follow_person(&shared.people);
            if session.gate.refresh_policy() || renewed {
                let d = session.gate.may_connect();
                if !d.allowed {
                    return Woke::Revoked(d);
                }
            }
            tokio::select! {
                r = read_when_ready(&mut client.stream, &mut client.buf, &mut size) => return match r {
                    Ok(0) => Woke::Left("client closed".into()),
                    Ok(_) => Woke::Spoke,
                    Err(e) => Woke::Left(format!("client read: {e}")),
                },
                Ok(()) = woken.changed() => continue,
            }
        }
    }
}

/// An idle session with its backend and nothing of its client's in hand (its relay rested, or
/// it has not spoken since its login) waits here, holding nothing of a relay's, until the
/// client or the server has something to read, or an order, a new policy or its person's
/// renewed login has come: the relay, built (again), reads it and does what it says (it is
/// the one place that ends a session with a backend). Nothing is read here.
/// (Not an `async fn`, which would hold its arguments twice: this wait is inline in the task.)
#[allow(clippy::manual_async_fn)]
fn rest<'a>(
    mut woken: tokio::sync::watch::Receiver<u64>,
    client: &'a mut Client,
    session: &'a Session,
    server: &'a mut BoxStream,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    async move {
        // Nothing is read here, and the relay makes room for what comes: a session that has
        // not spoken since its login gives back the room its startup message was read into.
        client.buf = BytesMut::new();
        let mut woke = false;
        loop {
            // Looked at once subscribed (`woken`): what came before is seen here. A renewed
            // login wakes every waiting session too; one that carries a logged-in person goes
            // to look whether it was theirs (few do: the people at a keyboard, not the
            // workloads, whose relays are not all built again at every order or reload).
            if session.registration.live().order().is_some()
                || session.gate.policy_replaced()
                || woke && session.gate.carries_a_login()
            {
                return;
            }
            // (One poll of all three, not a `select!`: this wait is the largest of an idle
            // task's, and every byte of it is in every task.)
            let mut changed = std::pin::pin!(woken.changed());
            let peer_ready = std::future::poll_fn(|cx| {
                if client.stream.poll_read_ready(cx).is_ready()
                    || server.poll_read_ready(cx).is_ready()
                {
                    return std::task::Poll::Ready(true);
                }
                // (A registry gone is no reason to wait on: the relay finds out what is.)
                std::future::Future::poll(changed.as_mut(), cx).map(|r| r.is_err())
            })
            .await;
            if peer_ready {
                return;
            }
            woke = true;
        }
    }
}

/// Opens a deferred session's server connection once the client has spoken, or ends the
/// session (`Err`: why, for its end record). Access revoked while it waited ends it as it
/// would a busy one.
async fn open_deferred(
    shared: &Arc<Shared>,
    client: &mut Client,
    session: &mut Session,
    deferred: Arc<login::Deferred>,
    woke: Woke,
) -> Result<login::Backend, String> {
    match woke {
        // What it said is held until the backend exists: a cancel waits for it.
        Woke::Spoke => session.cancel_key.pending().set(true),
        Woke::Left(why) => return Err(why),
        Woke::Revoked(d) => {
            let database = session.gate.database().to_owned();
            let e = revoke(shared, &session.ids(), &database, d).await;
            return Err(end_with(client, Refusal::Client(e)).await);
        }
        Woke::Ordered(order) => {
            let e = ordered_out(shared, &session.ids(), order).await;
            return Err(end_with(client, Refusal::Client(e)).await);
        }
    }
    // A pool closing a spare connection: no reason to log in just to log out.
    if client.buf[..] == wire::TERMINATE[..] {
        return Err(CLIENT_TERMINATED.into());
    }
    // Bytes no client message starts with cost the database no login either.
    if let Err(e) = wire::check_frontend_start(
        &client.buf,
        shared.settings.current().config.limits.max_message_size,
    ) {
        return Err(end_with(client, Refusal::Client(protocol_violation(e))).await);
    }
    let timeout = shared.settings.current().config.limits.startup_timeout();
    let connected = tokio::time::timeout(
        timeout,
        login::connect(
            shared,
            &deferred.key,
            &client.peer,
            session.registration.live().facts.pool,
            session.transactions.as_ref().map(|t| &t.principal),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Refusal::Client(PgError::fatal(
            "08006",
            format!(
                "pgiam: no connection to the database within {}s",
                timeout.as_secs()
            ),
        )))
    });
    let (established, upstream, lease) = match connected {
        Ok(e) => e,
        Err(refusal) => return Err(end_with(client, refusal).await),
    };
    login::reach(upstream, &deferred.key, &session.cancel_key, &established);
    session.registration.live().set_state(State::Idle);
    session.standard_conforming_strings = established.parameters.standard_conforming_strings();
    session
        .gate
        .login_client_encoding(established.parameters.get("client_encoding"));
    let news = login::news(&established, &deferred.told);
    if !news.is_empty() {
        client
            .write(&news)
            .await
            .map_err(|e| format!("client write: {e}"))?;
    }
    Ok(login::Backend {
        stream: established.stream,
        lease: lease.map(Box::new),
    })
}

/// Ends a session that is past login but has no relay: tells the client (if the refusal says
/// anything) and returns why, for the session's end record.
async fn end_with(client: &mut Client, refusal: Refusal) -> String {
    let why = match &refusal {
        Refusal::Client(e) => e.message.clone(),
        Refusal::ServerFrame(_) => "the server refused the login".into(),
        Refusal::Silent(why) => why.clone(),
    };
    if let Some(frame) = refusal.frame(&client.peer) {
        last_word(client, &frame).await;
    }
    why
}

/// A session past login.
struct Session {
    cancel_key: crate::cancel::Registration,
    /// Authorizes and records each statement before it is forwarded. (Boxed: the session
    /// sits inline in the task of a client that has not spoken yet.)
    gate: Box<statements::Gate>,
    /// The server's standard_conforming_strings at login (a deferred session's, once its
    /// login has happened).
    standard_conforming_strings: bool,
    /// Its entry among the live sessions: how an operator sees it and orders it out.
    registration: Registration,
    /// What a transaction-pooled session keeps between its transactions (boxed: the session
    /// sits inline in the task).
    transactions: Option<Box<Transactions>>,
    /// Where the catalog of its database is read from.
    catalog: internment::ArcIntern<crate::catalog::cache::Source>,
}

/// What a transaction-pooled session keeps from one transaction to the next.
struct Transactions {
    /// The principal its mapping matched: whose transactions its backends may go on to
    /// without a reset.
    principal: Arc<str>,
    /// How it logs in again for its next transaction.
    reattach: Arc<login::Deferred>,
    /// Its prepared statements, for the backends it lands on.
    carried: carried::Carried,
}

async fn forward_cancel(shared: &Shared, process_id: i32, secret_key: i32) {
    // After the statement it cancels: what the session has read is forwarded first.
    let Some((_, pending)) = shared.cancels.lookup_entry(process_id, secret_key) else {
        // PostgreSQL answers nothing either way, so a prober learns nothing from the reply.
        warn!(process_id, "cancel request with an unknown key ignored");
        return;
    };
    // Repeats of a cancel under way are the same request: one connection to the server.
    let Some(_forwarding) = shared.cancels.begin_forwarding(process_id, secret_key) else {
        info!(process_id, "cancel request coalesced with one under way");
        return;
    };
    pending.forwarded(CANCEL_WAIT_MAX).await;
    match shared.cancels.lookup(process_id, secret_key) {
        Some(target) => {
            info!(backend_pid = target.process_id, "forwarding cancel request");
            if let Err(e) = target
                .upstream
                .cancel(target.process_id, target.secret_key, target.address)
                .await
            {
                warn!("cancel request could not be forwarded: {e}");
            }
        }
        // PostgreSQL answers nothing either way, so a prober learns nothing from the reply.
        None => warn!(process_id, "cancel request with an unknown key ignored"),
    }
}

/// The longest a cancel waits for its session to forward what it holds.
const CANCEL_WAIT_MAX: Duration = Duration::from_secs(5);

const CLIENT_TERMINATED: &str = "client terminated";
const CLIENT_CLOSED: &str = "client closed";

impl Session {
    fn ids(&self) -> (Option<&str>, i32, i32) {
        (
            self.gate.info().session_id(),
            self.cancel_key.process_id(),
            self.cancel_key.secret_key(),
        )
    }

    /// The session's end record and log line.
    fn finish(self, shared: &Shared, peer: &str, ended_by: String) {
        if let (Some(audit), Some(session_id)) = (&shared.audit, self.gate.info().session_id()) {
            audit.record_later(crate::audit_fields! {
                "id" => audit.next_id(),
                "kind" => "session_end",
                "session" => session_id,
                "duration_ms" => self.registration.live().age().as_millis() as u64,
                "ended_by" => ended_by,
            });
        }
        let who = &self.gate.info().facts;
        info!(
            peer = %peer,
            session = %who.id,
            "session ended: {} principal={} database={} role={}",
            who.identity, who.principal, who.database, who.role
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session holds while it is idle is mostly its futures' own size. tokio allocates
    /// a task as one cell, 128-byte aligned, of the future and 104 bytes of its own: a client
    /// that has not spoken (the run future, waiting inline) fits in 512 bytes up to 408. The
    /// relay is boxed beside it once the session has spoken (1,792 bytes before pooling; what
    /// it keeps to hand a backend back to its pool takes it to 1,888, and what transaction
    /// pooling adds, to 2,016; the catalog read for operators and casts, to 2,056; what both
    /// directions share and what neither changes, each reached through one reference instead
    /// of a pointer per local in every future that uses it, back to 1,712; the registry's
    /// clock it measures idleness by, 1,744; the deadline of a message half sent, kept across
    /// wake-ups, and the server side's first look, 1,776). A session idle for a second or two
    /// holds no relay (its wait for either side, inline in the run future, fits in the same
    /// 408), nor does a transaction-pooled one between its transactions.
    #[test]
    fn an_idle_session_s_futures_stay_small() {
        fn returned<F: FnOnce(A, B, C, D, E) -> R, A, B, C, D, E, R>(_: F) -> usize {
            std::mem::size_of::<R>()
        }

        assert!(
            returned(run) <= 408,
            "the task of a waiting client: {}",
            returned(run)
        );
        fn returned4<F: FnOnce(A, B, C, D) -> R, A, B, C, D, R>(_: F) -> usize {
            std::mem::size_of::<R>()
        }
        assert!(returned4(relay) <= 1776, "the relay: {}", returned4(relay));
    }
}
