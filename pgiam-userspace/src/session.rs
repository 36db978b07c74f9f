//! One client connection, from the first byte to the last: TLS and startup negotiation, the
//! identity → role mapping, the upstream login, and the relay.
//!
//! The session runs over any [`BoxStream`], so tests drive it through in-memory pipes; the pure
//! decisions (which startup parameters pass, what a refusal says) live in [`startup`]. The
//! relay of an established session is `relay`; ending one from outside (an order, a revoked
//! policy) is `ending`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::admin::registry::{Facts, Live, Order, Registration, Registry, State};
use crate::cancel::CancelRegistry;
use crate::identity::{Identity, IdentityError};
use crate::stream::{BoxStream, Rewind};
use crate::tls::ALPN_POSTGRESQL;
use crate::wire::{self, PgError, StartupPacket, WireError};

mod carried;
mod durability;
mod ending;
use ending::{ordered_out, revoke};
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
            let ended = Box::pin(relay(&shared, &mut client, &mut session, upstream)).await;
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
    login::Link::Deferred(Box::new(transactions.reattach.clone()))
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
/// something or the policy takes its access away.
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
            if session.gate.refresh_policy() {
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

/// Opens a deferred session's server connection once the client has spoken, or ends the
/// session (`Err`: why, for its end record). Access revoked while it waited ends it as it
/// would a busy one.
async fn open_deferred(
    shared: &Arc<Shared>,
    client: &mut Client,
    session: &mut Session,
    deferred: Box<login::Deferred>,
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
    catalog: Arc<crate::catalog::cache::Source>,
}

/// What a transaction-pooled session keeps from one transaction to the next.
struct Transactions {
    /// The principal its mapping matched: whose transactions its backends may go on to
    /// without a reset.
    principal: Arc<str>,
    /// How it logs in again for its next transaction.
    reattach: login::Deferred,
    /// Its prepared statements, for the backends it lands on.
    carried: carried::Carried,
}

/// Negotiation, startup checks, mapping and upstream login (or what stands in for it until the
/// first message). `Ok(None)` for a connection that only carried a CancelRequest.
async fn establish(
    shared: &Arc<Shared>,
    client: &mut Client,
    arrival: Box<Arrival>,
) -> Result<Option<(Session, login::Link)>, Refusal> {
    let Arrival { identity, dialled } = *arrival;
    let startup = loop {
        client.fill().await?;
        if !client.tls && client.buf.first() == Some(&wire::TLS_HANDSHAKE_RECORD) {
            direct_tls(shared, client, dialled).await?;
            continue;
        }
        let Some(packet) = wire::decode_startup(&mut client.buf).map_err(protocol_violation)?
        else {
            continue;
        };
        match packet {
            StartupPacket::SslRequest => {
                if client.tls {
                    return Err(PgError::fatal("08P01", "pgiam: SSLRequest inside TLS").into());
                }
                request_tls(shared, client, dialled).await?;
            }
            StartupPacket::GssEncRequest => {
                if client.tls {
                    return Err(PgError::fatal("08P01", "pgiam: GSSENCRequest inside TLS").into());
                }
                // Anything pipelined behind the request would be read as if it had been
                // encrypted: refuse it, as PostgreSQL does.
                no_pipelining(client)?;
                client.write(b"N").await?;
            }
            StartupPacket::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(shared, process_id, secret_key).await;
                return Ok(None);
            }
            StartupPacket::Startup(m) => break m,
        }
    };
    if !client.buf.is_empty() {
        // libpq waits for the server's answer before sending anything else.
        return Err(
            PgError::fatal("08P01", "pgiam: data sent before authentication completed").into(),
        );
    }
    // Who is asking comes first, so that every refusal below is audited with its identity.
    let origin = identity.resolve().await.map_err(|e| {
        crate::metrics::get().refused("identity");
        warn!(peer = %client.peer, "cannot establish client identity: {e}");
        PgError::fatal(
            "28000",
            "pgiam: cannot establish the identity of this client",
        )
        .with_detail(e.to_string())
    })?;
    let mut origin = origin;
    origin.identity.person = shared
        .people
        .bound(origin.identity.uid, origin.identity.cgroup.as_deref());
    let checked = match startup::check(startup) {
        Ok(c) => c,
        Err(e) => {
            return Err(
                audited_refusal(shared, &client.peer, &origin.identity, None, e, "startup").await,
            )
        }
    };
    if let Some(negotiation) = &checked.negotiation {
        let mut b = BytesMut::new();
        let unrecognized: Vec<&str> = negotiation
            .unrecognized
            .iter()
            .map(String::as_str)
            .collect();
        wire::negotiate_protocol_version(0, &unrecognized, &mut b);
        client.write(&b).await?;
    }

    // One snapshot of the settings for the whole login: a reload meanwhile applies to the next.
    let current = shared.settings.current();
    let config = &current.config;
    if origin.identity.person.is_none()
        && config
            .find_mapping(&origin.identity.principals(), &checked.database)
            .is_none()
        && config.token_password_may_map(&checked.database)
    {
        origin.identity.person =
            Some(password::person_from_password(shared, client, &config.issuers).await?);
    }
    let identity = &origin.identity;
    let principals = identity.principals();
    let Some(mapping) = config.find_mapping(&principals, &checked.database) else {
        warn!(peer = %client.peer, %identity, database = %checked.database, "session refused: no mapping");
        let e = startup::no_mapping(identity, &checked.database);
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            "no_mapping",
        )
        .await);
    };
    let principal = crate::policy::Principal::shared(
        &mapping.principal,
        &mapping.role,
        &checked.database,
        identity,
    );
    // The generation the connect decision is made under: a reload before the session's gate
    // exists (the login takes a while) makes it ask again.
    let decided_under = shared.policies.generation();
    let connect = shared.policies.current().decide(
        &principal,
        &crate::policy::Ask::on_database(crate::policy::Action::Connect, "connect"),
    );
    if !connect.allowed {
        warn!(peer = %client.peer, %identity, database = %checked.database, "session refused by policy");
        let e = PgError::fatal(
            "42501",
            format!(
                "pgiam: permission denied: connect to database {}",
                checked.database
            ),
        );
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            "policy",
        )
        .await);
    }
    let id = match &shared.audit {
        Some(audit) => audit.next_id(),
        None => shared.registry.local_id(),
    };
    let live = Live::new(
        Facts {
            id,
            audited: shared.audit.is_some(),
            principal: mapping.principal.clone(),
            role: mapping.role.clone(),
            database: checked.database.clone(),
            identity: identity.clone(),
            upstream: current.upstream.describe(origin.destination),
            peer: client.peer.clone(),
            tls: client.tls,
            pool: mapping.pool,
        },
        State::NotConnected,
    );
    // Registered before its allow record: once the drain has begun, no session starts.
    let registration = match shared.registry.register(live.clone()) {
        Ok(r) => r,
        Err(e) => {
            let e = PgError::fatal(
                "57P03",
                format!("pgiam: the database system is shutting down ({e})"),
            );
            return Err(audited_refusal(
                shared,
                &client.peer,
                identity,
                Some(&checked.database),
                e,
                "shutting_down",
            )
            .await);
        }
    };
    // An operator's revocation stands above the policy, and the mapping must still be the
    // one in force. Both are looked at once registered: a revocation or a reload that ordered
    // sessions out just before this one registered saw no entry to order, so this one looks
    // for itself (both change their state before they order, and registration is under the
    // registry's lock).
    let names =
        std::iter::once(mapping.principal.as_str()).chain(principals.iter().map(String::as_str));
    let revoked = shared.revocations.find(names);
    let still_mapped = shared
        .settings
        .current()
        .config
        .find_mapping(&principals, &checked.database)
        .is_some_and(|m| m.principal == mapping.principal && m.role == mapping.role);
    let refused = match (&revoked, still_mapped) {
        (Some(r), _) => {
            warn!(peer = %client.peer, %identity, principal = %r.principal, "session refused: principal revoked");
            let e = PgError::fatal(
                "42501",
                format!(
                    "pgiam: permission denied: the access of {} is revoked",
                    r.principal
                ),
            );
            let e = match &r.reason {
                Some(reason) => e.with_detail(format!("reason: {reason}")),
                None => e,
            };
            Some((e, "revoked"))
        }
        (None, false) => Some((
            PgError::fatal(
                "42501",
                "pgiam: permission denied: the configuration changed while the session started",
            ),
            "no_mapping",
        )),
        (None, true) => None,
    };
    if let Some((e, reason)) = refused {
        drop(registration);
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            reason,
        )
        .await);
    }
    registration.started();
    crate::metrics::get().session(&mapping.role);
    // With durability `always` the decision is on disk before anything reaches the database;
    // without a working audit log nothing does.
    if let Some(audit) = &shared.audit {
        let record = crate::audit_fields! {
            "id" => live.facts.id,
            "kind" => "session",
            "decision" => "allow",
            "identity" => identity,
            "principal" => mapping.principal,
            "database" => checked.database,
            "role" => mapping.role,
            "policies" => connect.policies,
            "upstream" => current.upstream.describe(origin.destination),
            "peer" => client.peer,
            "tls" => client.tls,
        };
        audit.record(record).await.map_err(|e| {
            PgError::fatal(
                "58030",
                "pgiam: the audit log is unavailable, so no session can start",
            )
            .with_detail(e.to_string())
        })?;
    }
    let gateway = config.upstream.mode == crate::config::UpstreamMode::Gateway;
    let login_role = match (&config.upstream.gateway_role, gateway) {
        (Some(g), true) => g,
        _ => &mapping.role,
    };
    let mut params = checked.forwarded.clone();
    params.push((
        "search_path".into(),
        checked.search_path_setting(&config.policy),
    ));
    let key = crate::upstream::LoginKey {
        role: login_role.clone(),
        params,
        target: origin.destination,
        assume: gateway.then(|| mapping.role.clone()),
    };
    let remembered = match config.upstream.connect {
        crate::config::UpstreamConnect::Deferred => current.upstream.remembered(&key),
        crate::config::UpstreamConnect::AtLogin => None,
    };
    let key = Arc::new(key);
    let pool = live.facts.pool;
    let transaction_pooled = pool == crate::config::PoolMode::Transaction;
    let owner: Arc<str> = Arc::from(mapping.principal.as_str());
    let owner_of_backends = transaction_pooled.then_some(&owner);
    let mut hello = BytesMut::with_capacity(512);
    wire::authentication_ok(&mut hello);
    // The client is told its backend's real pid (pgiam's own secret beside it); a deferred
    // session has no backend yet, and is told a pid pgiam makes up.
    let encoding_at_login;
    // What a transaction-pooled session logs in with again, after each of its transactions.
    let reattach;
    let (link, scs_at_login, status, cancel_key) = match remembered {
        Some((key, told)) => {
            told.encode_news(None, &mut hello);
            let scs = told.standard_conforming_strings();
            encoding_at_login = told.get("client_encoding").map(str::to_owned);
            let deferred = Box::new(login::Deferred { key, told });
            reattach = transaction_pooled.then(|| (*deferred).clone());
            let link = login::Link::Deferred(deferred);
            let cancel_key = shared.cancels.register(None);
            (link, scs, wire::TransactionStatus::Idle, cancel_key)
        }
        None => {
            let (established, upstream, lease) =
                login::connect(shared, &key, &client.peer, pool, owner_of_backends).await?;
            // A transaction-pooled session's backend changes between its transactions: the
            // pid it is told is pgiam's, whichever backend a cancel then reaches.
            let told_pid = (!transaction_pooled).then_some(established.process_id);
            let cancel_key = shared.cancels.register(told_pid);
            reattach = transaction_pooled.then(|| login::Deferred {
                key: key.clone(),
                told: Arc::new(established.parameters.clone()),
            });
            login::reach(upstream, &key, &cancel_key, &established);
            established.parameters.encode_news(None, &mut hello);
            hello.extend_from_slice(&established.notices);
            let scs = established.parameters.standard_conforming_strings();
            encoding_at_login = established
                .parameters
                .get("client_encoding")
                .map(str::to_owned);
            live.set_state(State::Idle);
            (
                login::Link::Open(login::Backend {
                    stream: established.stream,
                    lease: lease.map(Box::new),
                }),
                scs,
                established.status,
                cancel_key,
            )
        }
    };
    wire::backend_key_data(cancel_key.process_id(), cancel_key.secret_key(), &mut hello);
    wire::ready_for_query(status, &mut hello);
    client.write(&hello).await?;

    let summary = format!(
        "{identity} principal={} database={} role={} upstream={}",
        mapping.principal,
        checked.database,
        mapping.role,
        current.upstream.describe(origin.destination),
    );
    info!(peer = %client.peer, session = %live.facts.id, tls = client.tls, "session established: {summary}");
    let mut session = Session {
        cancel_key,
        gate: Box::new(statements::Gate::new(
            shared.audit.clone(),
            shared.policies.clone(),
            decided_under,
            principal,
            checked.resolver(&config.policy, &mapping.role),
            gateway,
            live,
        )),
        standard_conforming_strings: scs_at_login,
        registration,
        transactions: reattach.map(|reattach| {
            Box::new(Transactions {
                principal: owner,
                reattach,
                carried: carried::Carried::default(),
            })
        }),
        catalog: Arc::new(crate::catalog::cache::Source {
            key: (key.target, checked.database.clone()),
            login: key,
        }),
    };
    session
        .gate
        .login_client_encoding(encoding_at_login.as_deref());
    Ok(Some((session, link)))
}

/// Records a refusal and points the client at the record.
async fn audited_refusal(
    shared: &Shared,
    peer: &str,
    identity: &Identity,
    database: Option<&str>,
    error: PgError,
    reason: &'static str,
) -> Refusal {
    crate::metrics::get().refused(reason);
    let Some(audit) = &shared.audit else {
        return error.into();
    };
    let id = audit.next_id();
    let record = crate::audit_fields! {
        "id" => id,
        "kind" => "session",
        "decision" => "deny",
        "code" => error.code,
        "reason" => error.message,
        "identity" => identity,
        "database" => database,
        "peer" => peer,
    };
    if let Err(e) = audit.record(record).await {
        warn!("audit record for a refusal was not written: {e}");
    }
    error.with_audit_id(&id).into()
}

fn no_pipelining(client: &Client) -> Result<(), Refusal> {
    if client.buf.is_empty() {
        Ok(())
    } else {
        Err(PgError::fatal(
            "08P01",
            "pgiam: received unencrypted data after a TLS or GSS request",
        )
        .into())
    }
}

async fn request_tls(
    shared: &Shared,
    client: &mut Client,
    dialled: Option<std::net::IpAddr>,
) -> Result<(), Refusal> {
    no_pipelining(client)?;
    let Some(acceptor) = &shared.tls else {
        client.write(b"N").await?;
        return Ok(());
    };
    client.write(b"S").await?;
    let plain = std::mem::replace(&mut client.stream, Box::new(tokio::io::empty()));
    let tls = acceptor
        .accept(plain, dialled)
        .await
        .map_err(|e| Refusal::Silent(format!("TLS handshake failed: {e}")))?;
    client.stream = Box::new(tls);
    client.tls = true;
    Ok(())
}

/// PostgreSQL 17 "direct SSL": the connection opens with a TLS ClientHello, and ALPN must say
/// `postgresql` so that a TLS connection meant for another protocol cannot be replayed here.
async fn direct_tls(
    shared: &Shared,
    client: &mut Client,
    dialled: Option<std::net::IpAddr>,
) -> Result<(), Refusal> {
    let Some(acceptor) = &shared.tls else {
        return Err(Refusal::Silent(
            "direct TLS, but client TLS is disabled".into(),
        ));
    };
    let prefix = client.buf.split().freeze();
    let plain = std::mem::replace(&mut client.stream, Box::new(tokio::io::empty()));
    let tls = acceptor
        .accept(Rewind::new(prefix, plain), dialled)
        .await
        .map_err(|e| Refusal::Silent(format!("direct TLS handshake failed: {e}")))?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(Refusal::Silent(
            "direct TLS without ALPN \"postgresql\"".into(),
        ));
    }
    client.stream = Box::new(tls);
    client.tls = true;
    Ok(())
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
    /// pooling adds, to 2,016; the catalog read for operators and casts, to 2,056; a
    /// transaction-pooled session holds no relay while it is idle).
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
        assert!(returned4(relay) <= 2056, "the relay: {}", returned4(relay));
    }
}
