//! One client connection, from the first byte to the last: TLS and startup negotiation, the
//! identity → role mapping, the upstream login, and the relay.
//!
//! The session runs over any [`BoxStream`], so tests drive it through in-memory pipes; the pure
//! decisions (which startup parameters pass, what a refusal says) live in [`startup`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::admin::registry::{Facts, Live, Order, Registration, Registry, State};
use crate::cancel::CancelRegistry;
use crate::identity::{Identity, IdentityError};
use crate::stream::{BoxStream, Rewind, Split, Stream};
use crate::tls::ALPN_POSTGRESQL;
use crate::wire::{self, FrontendMessage, PgError, StartupPacket, WireError};
use durability::Wait;

mod durability;
mod login;
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
        let ended_by = Box::pin(relay(&shared, &mut client, &mut session, upstream)).await;
        session.finish(&shared, &client.peer, ended_by);
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
) -> Result<BoxStream, String> {
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
    let connected =
        tokio::time::timeout(timeout, login::connect(shared, &deferred.key, &client.peer))
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
    let (established, upstream) = match connected {
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
    Ok(established.stream)
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
    started: std::time::Instant,
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
    let identity = &origin.identity;
    let checked = match startup::check(startup) {
        Ok(c) => c,
        Err(e) => {
            return Err(audited_refusal(shared, &client.peer, identity, None, e, "startup").await)
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

    let principals = identity.principals();
    // One snapshot of the settings for the whole login: a reload meanwhile applies to the next.
    let current = shared.settings.current();
    let config = &current.config;
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
    // An operator's revocation stands above the policy.
    let names =
        std::iter::once(mapping.principal.as_str()).chain(principals.iter().map(String::as_str));
    if let Some(r) = shared.revocations.find(names) {
        warn!(peer = %client.peer, %identity, principal = %r.principal, "session refused: principal revoked");
        let mut e = PgError::fatal(
            "42501",
            format!(
                "pgiam: permission denied: the access of {} is revoked",
                r.principal
            ),
        );
        if let Some(reason) = &r.reason {
            e = e.with_detail(format!("reason: {reason}"));
        }
        return Err(audited_refusal(
            shared,
            &client.peer,
            identity,
            Some(&checked.database),
            e,
            "revoked",
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
    // Checked again once registered: a revocation or a reload that ordered sessions out just
    // before this one registered saw no entry to order, so this one looks for itself. (Both
    // change their state before they order, and registration is under the registry's lock.)
    let names =
        std::iter::once(mapping.principal.as_str()).chain(principals.iter().map(String::as_str));
    let revoked = shared.revocations.find(names).map(|r| r.principal);
    let now = shared.settings.current();
    let still_mapped = now
        .config
        .find_mapping(&principals, &checked.database)
        .is_some_and(|m| m.principal == mapping.principal && m.role == mapping.role);
    if revoked.is_some() || !still_mapped {
        let e = PgError::fatal(
            "42501",
            match &revoked {
                Some(p) => format!("pgiam: permission denied: the access of {p} is revoked"),
                None => {
                    "pgiam: permission denied: the configuration changed while the session started"
                        .to_owned()
                }
            },
        );
        let reason = if revoked.is_some() {
            "revoked"
        } else {
            "no_mapping"
        };
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
    let mut hello = BytesMut::with_capacity(512);
    wire::authentication_ok(&mut hello);
    // The client is told its backend's real pid (pgiam's own secret beside it); a deferred
    // session has no backend yet, and is told a pid pgiam makes up.
    let encoding_at_login;
    let (link, scs_at_login, status, cancel_key) = match remembered {
        Some((key, told)) => {
            told.encode_news(None, &mut hello);
            let scs = told.standard_conforming_strings();
            encoding_at_login = told.get("client_encoding").map(str::to_owned);
            let link = login::Link::Deferred(Box::new(login::Deferred { key, told }));
            let cancel_key = shared.cancels.register(None);
            (link, scs, wire::TransactionStatus::Idle, cancel_key)
        }
        None => {
            let (established, upstream) = login::connect(shared, &key, &client.peer).await?;
            let cancel_key = shared.cancels.register(Some(established.process_id));
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
                login::Link::Open(established.stream),
                scs,
                established.status,
                cancel_key,
            )
        }
    };
    wire::backend_key_data(cancel_key.process_id, cancel_key.secret_key, &mut hello);
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
        started: std::time::Instant::now(),
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

/// How long the server has to close a session pgiam is ending.
const ENDING_GRACE: Duration = Duration::from_secs(5);

/// The longest a cancel waits for its session to forward what it holds.
const CANCEL_WAIT_MAX: Duration = Duration::from_secs(5);

const CLIENT_TERMINATED: &str = "client terminated";

/// Moves bytes both ways until either side ends. Client messages are framed, validated and
/// authorized before they are forwarded; server messages stream through, matched to the
/// requests they answer.
/// Returns why the session ended. (Its state is borrowed: what the relay's future holds is
/// its own.)
async fn relay(
    shared: &Shared,
    client: &mut Client,
    session: &mut Session,
    upstream: BoxStream,
) -> String {
    let (max, stalled_after) = {
        let current = shared.settings.current();
        let limits = &current.config.limits;
        (
            limits.max_message_size,
            Duration::from_secs(limits.message_timeout_secs),
        )
    };
    let stream = std::mem::replace(&mut client.stream, Box::new(tokio::io::empty()));
    let mut cbuf = std::mem::take(&mut client.buf);
    let peer = &client.peer;
    let (client_io, server_io) = (Split::new(stream), Split::new(upstream));
    let (mut client_rd, mut client_wr) = client_io.halves();
    let (mut server_rd, mut server_wr) = server_io.halves();
    let session_ids = session.ids();
    let pending = session.cancel_key.pending();
    let live = session.registration.live();
    let metrics = crate::metrics::get();
    {
        let gate = &mut session.gate;
        // What the server says about standard_conforming_strings, for classifying what follows.
        let standard_conforming_strings = AtomicBool::new(session.standard_conforming_strings);
        // The client-to-server direction never writes to the client: a fatal error it finds is
        // handed to the other direction, which writes it once the server has gone quiet, so it can
        // never land in the middle of a server message.
        // (A slot, not a channel: an idle session would hold the channel's block.)
        let fatal = std::sync::Mutex::new(None::<Box<PgError>>);
        // Set when the session is being ended (an order, a revocation): from then on nothing
        // more of the server's reaches the client.
        let ending = AtomicBool::new(false);
        // Requests forwarded, in order, for the direction that reads the answers; and back from
        // it, prepared statements the server did not create after all. Both directions run in this
        // one task, so these locks are never contended; no guard is held across an await. (Not
        // channels: an idle session would hold their preallocated blocks.)
        let responses = std::sync::Mutex::new(responses::Responses::default());
        let unprepared = std::sync::Mutex::new(Vec::<(Vec<u8>, u64)>::new());
        // The client_encoding the server last reported, for the gate.
        let reported_encoding = std::sync::Mutex::new(None::<String>);
        // Decision records of statements forwarded before their records were on disk (statements
        // that change nothing): no answer reaches the client before they are.
        let in_flight = std::sync::Mutex::new(Vec::<crate::audit::Written>::new());
        let audit = shared.audit.as_ref();
        let mut woken = shared.registry.subscribe();

        let mut to_server = std::pin::pin!(async {
            let mut client_size = ReadSize::default();
            let mut checked = Vec::new();
            let mut expects = Vec::new();
            let result: Result<&'static str, PgError> = async {
            loop {
                if let Some(order) = live.order() {
                    ending.store(true, Ordering::Relaxed);
                    return Err(Box::pin(ordered_out(shared, &session_ids, order)).await);
                }
                // A new policy is checked before anything more is forwarded under it.
                if gate.refresh_policy() {
                    let d = gate.may_connect();
                    if !d.allowed {
                        let database = gate.database().to_owned();
                        ending.store(true, Ordering::Relaxed);
                        return Err(Box::pin(revoke(shared, &session_ids, &database, d)).await);
                    }
                }
                for (name, generation) in std::mem::take(&mut *locked(&unprepared)) {
                    gate.forget_prepared(&name, generation);
                }
                if let Some(e) = locked(&reported_encoding).take() {
                    gate.client_encoding_reported(&e);
                }
                // Forward what was complete and valid before a bad message, as a server would
                // have executed it; nothing from the bad message on.
                let framed = frame_client_messages(&cbuf, max, |message, range| {
                    let frame = &cbuf[range.clone()];
                    // (Read here, not held: both directions run in this task, so it does not
                    // change while a run is framed.)
                    let scs = standard_conforming_strings.load(Ordering::Relaxed);
                    let decided = crate::metrics::timed(&metrics.decision, || {
                        gate.check(message, frame, scs, &mut expects)
                    });
                    checked.push((range, decided));
                });
                if framed.len > 0 {
                    // Every decision is in the audit log (the kernel's copy) before what it
                    // decided is forwarded; without the log, nothing is. Whether the device
                    // flush comes first too is the durability mode's call.
                    let batch = gate.take_records();
                    if let (Some(audit), false) = (&audit, batch.records.is_empty()) {
                        let unavailable = |e: crate::audit::AuditError| {
                            PgError::fatal(
                                "58030",
                                "pgiam: the audit log is unavailable; the statement was not forwarded",
                            )
                            .with_detail(e.to_string())
                        };
                        let records = batch.records.len();
                        let end = audit.append(batch.records).map_err(unavailable)?;
                        let in_block = locked(&responses).idle_in_block();
                        match durability::wait_for(
                            audit.durability(),
                            batch.effect,
                            in_block,
                            end,
                            records,
                            batch.must_sync,
                        ) {
                            Wait::Nothing => {}
                            Wait::Answer(upto) => locked(&in_flight).push(audit.durable(upto)),
                            Wait::Forward(upto) => {
                                live.set_state(State::WaitingForAudit);
                                audit.durable(upto).wait().await.map_err(unavailable)?
                            }
                        }
                    }
                    {
                        // Taken, not drained: an idle session keeps no room for a pipeline.
                        let mut r = locked(&responses);
                        for e in std::mem::take(&mut expects) {
                            r.push(e);
                        }
                    }
                    // Before the write: its answer may come back while the write is awaited.
                    live.set_state(State::Active);
                    live.bytes_in(framed.len);
                    metrics.bytes_from_clients.inc_by(framed.len as u64);
                    let chunk = cbuf.split_to(framed.len);
                    // Flushed: a TLS writer may keep the tail of what it accepted (the socket was
                    // full) until it is flushed, and nothing else would push it out. (Boxed, as
                    // are the other waits that only a busy session makes: the relay is sized by
                    // its largest wait, and an idle session holds only its reads.)
                    Box::pin(async {
                        write_checked(&mut server_wr, &chunk, &mut checked).await?;
                        server_wr.flush().await
                    })
                    .await
                    .map_err(|e| PgError::fatal("08006", format!("pgiam: server write: {e}")))?;
                }
                if let Some(e) = framed.error {
                    return Err(protocol_violation(e));
                }
                if framed.terminate {
                    return Ok(CLIENT_TERMINATED);
                }
                // A message whose header says how long it is gets room for all of it at once.
                if let Ok(Some(h)) = wire::peek_header(&cbuf, max) {
                    if h.total > cbuf.len() {
                        cbuf.reserve(h.total - cbuf.len());
                    }
                }
                // Nothing is left of what was checked: an idle session keeps no room for it.
                checked = Vec::new();
                // Waiting for the client is also waiting for the policy to change: a session
                // whose access is revoked ends now (at the top of the loop), not at its next
                // statement.
                // Everything forwardable is forwarded: a cancel may go now, unless part of a
                // message is still held (it may be the statement the cancel is for).
                pending.set(!cbuf.is_empty());
                // Part of a message held: the rest must come within the limit. (Boxed, and made
                // only then: a timer is hundreds of bytes an idle session need not hold.)
                let stall = (!cbuf.is_empty()).then(|| Box::pin(tokio::time::sleep(stalled_after)));
                let read = tokio::select! {
                    r = read_when_ready(&mut client_rd, &mut cbuf, &mut client_size) => r,
                    Ok(()) = woken.changed() => continue,
                    () = async { match stall { Some(s) => s.await, None => std::future::pending().await } } => {
                        return Err(PgError::fatal(
                            "08P01",
                            format!(
                                "pgiam: the client sent part of a message and nothing more for {}s",
                                stalled_after.as_secs()
                            ),
                        ));
                    }
                };
                if let Ok(n) = read {
                    pending.set(n > 0);
                }
                match read {
                    Ok(0) if cbuf.is_empty() => return Ok("client closed"),
                    Ok(0) => {
                        return Err(PgError::fatal(
                            "08P01",
                            "pgiam: client closed the connection in the middle of a message",
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(PgError::fatal("08006", format!("pgiam: client read: {e}")))
                    }
                }
            }
        }
        .await;
            // Whatever ended this direction, the server is told the session is over.
            if result != Ok(CLIENT_TERMINATED) {
                let mut t = BytesMut::new();
                postgres_protocol::message::frontend::terminate(&mut t);
                let _ = server_wr.write_all(&t).await;
            }
            let _ = server_wr.shutdown().await;
            if let Err(e) = &result {
                *locked(&fatal) = Some(Box::new(e.clone()));
            }
            result
        });

        let mut to_client = std::pin::pin!(async {
            let mut sbuf = BytesMut::new();
            let mut size = ReadSize::default();
            // Why an answer was held back for good: the audit record it waited for failed.
            let mut withheld: Option<Box<PgError>> = None;
            let end = 'relay: loop {
                match read_when_ready(&mut server_rd, &mut sbuf, &mut size).await {
                    Ok(0) => break "server closed",
                    Ok(_) => {}
                    Err(_) => break "server read failed",
                }
                // Ended by an order or a revocation: the server's answer to the cancel is not
                // the client's; the FATAL that says why is its last word, as when PostgreSQL
                // terminates a backend. (Looked at again after the audit wait below.)
                if ending.load(Ordering::Relaxed) {
                    sbuf.clear();
                    continue;
                }
                // Whatever this answers was forwarded, its record handed to the writer, before it
                // was read: nothing of it is written to the client before that record is on disk.
                if let Err(e) = all_written(&in_flight).await {
                    warn!(peer = %peer, session = %live.facts.id, "{e}: the answer is withheld and the session ends");
                    withheld = Some(Box::new(
                        PgError::fatal(
                            "58030",
                            "pgiam: the audit log is unavailable; the statement's result was withheld",
                        )
                        .with_detail(e.to_string()),
                    ));
                    break 'relay "audit log unavailable";
                }
                if ending.load(Ordering::Relaxed) {
                    sbuf.clear();
                    continue;
                }
                // What to write: runs of the server's bytes, with pgiam's errors in place of the
                // sentinels'. Decided under the lock, written after it.
                let mut replaced: Vec<(std::ops::Range<usize>, Bytes)> = Vec::new();
                let mut pos = 0;
                let mut failed = false;
                let events = {
                    let mut r = locked(&responses);
                    loop {
                        match r.step(&sbuf[pos..]) {
                            Ok(responses::Step::Pass(n)) => pos += n,
                            Ok(responses::Step::Replace { len, with }) => {
                                replaced.push((pos..pos + len, with));
                                pos += len;
                            }
                            Ok(responses::Step::NeedMore) => break,
                            Err(e) => {
                                warn!(peer = %peer, session = %live.facts.id, "invalid data from the server: {e}");
                                failed = true;
                                break;
                            }
                        }
                    }
                    r.release();
                    live.set_state(match (r.idle(), r.in_block()) {
                        (false, _) => State::Active,
                        (true, true) => State::InTransaction,
                        (true, false) => State::Idle,
                    });
                    std::mem::take(&mut r.events)
                };
                // Flushed for the same reason as the other direction: a TLS writer that met a
                // full socket keeps the tail of the answer until it is flushed, and the server
                // has nothing more to say that would push it out. (An answer with replacements
                // is written in a boxed wait, the larger one: see the other direction.)
                let written = if replaced.is_empty() {
                    async {
                        client_wr.write_all(&sbuf[..pos]).await?;
                        client_wr.flush().await
                    }
                    .await
                } else {
                    Box::pin(write_replaced(&mut client_wr, &sbuf[..pos], replaced)).await
                };
                if written.is_err() {
                    return "client write failed";
                }
                live.bytes_out(pos);
                metrics.bytes_to_clients.inc_by(pos as u64);
                let _ = sbuf.split_to(pos);
                for event in events {
                    match event {
                        responses::Event::Completed {
                            record,
                            sqlstate,
                            rows,
                            tag,
                            micros,
                        } => {
                            if let Some(audit) = &audit {
                                audit.record_later(statements::completion_record(
                                    &record,
                                    sqlstate.as_deref(),
                                    rows,
                                    tag.as_deref(),
                                    micros,
                                ));
                            }
                        }
                        responses::Event::NotPrepared { name, generation } => {
                            locked(&unprepared).push((name, generation));
                        }
                        responses::Event::StandardConformingStrings(on) => {
                            standard_conforming_strings.store(on, Ordering::Relaxed)
                        }
                        responses::Event::ClientEncoding(value) => {
                            *locked(&reported_encoding) = Some(value)
                        }
                        responses::Event::UnsafeClientEncoding(value) => {
                            warn!(peer = %peer, session = %live.facts.id, "server switched client_encoding to {value}: ending the session");
                            failed = true;
                        }
                    }
                }
                if failed {
                    break "invalid data from the server, or an encoding pgiam cannot read";
                }
            };
            // The last word, written only between two of the server's messages: why the answer
            // was withheld, or the error that ended the other direction once the server is drained.
            let last_word = withheld.or_else(|| sbuf.is_empty().then(|| locked(&fatal).take())?);
            if let Some(e) = last_word.filter(|_| locked(&responses).at_boundary()) {
                let mut b = BytesMut::new();
                e.encode(&mut b);
                let _ = client_wr.write_all(&b).await;
            }
            let _ = client_wr.shutdown().await;
            end
        });

        let mut server_side_done = false;
        let mut ended_by = String::new();
        // Once a session is being ended, the server has this long to close its side (after the
        // cancel and the Terminate); a server that does not is cut off, so that an order always
        // ends the session.
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            tokio::select! {
                () = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    warn!(peer = %peer, session = %live.facts.id, "the server did not close the ended session within {}s: cut off", ENDING_GRACE.as_secs());
                    break;
                }
                r = &mut to_server, if !server_side_done => {
                    server_side_done = true;
                    if ending.load(Ordering::Relaxed) {
                        grace = Some(Box::pin(tokio::time::sleep(ENDING_GRACE)));
                    }
                    match r {
                        Ok(why) => {
                            debug!(peer = %peer, session = %live.facts.id, "{why}");
                            ended_by = why.to_owned();
                        }
                        Err(e) => {
                            warn!(peer = %peer, session = %live.facts.id, code = e.code, "closing session: {}", e.message);
                            ended_by = e.message.clone();
                        }
                    }
                }
                why = &mut to_client => {
                    debug!(peer = %peer, session = %live.facts.id, "{why}");
                    if ended_by.is_empty() {
                        ended_by = why.to_owned();
                    }
                    break;
                }
            }
        }
        ended_by
    }
}

impl Session {
    fn ids(&self) -> (Option<String>, i32, i32) {
        (
            self.gate.info().session_id().map(str::to_owned),
            self.cancel_key.process_id,
            self.cancel_key.secret_key,
        )
    }

    /// The session's end record and log line.
    fn finish(self, shared: &Shared, peer: &str, ended_by: String) {
        if let (Some(audit), Some(session_id)) = (&shared.audit, self.gate.info().session_id()) {
            audit.record_later(crate::audit_fields! {
                "id" => audit.next_id(),
                "kind" => "session_end",
                "session" => session_id,
                "duration_ms" => self.started.elapsed().as_millis() as u64,
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

/// The lock's contents, even if a panic poisoned it (the data is a queue, always consistent
/// between operations).
fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session the new policy no longer lets connect: its running statement is cancelled, the
/// revocation recorded, and the error for the client returned.
async fn revoke(
    shared: &Shared,
    (session_id, process_id, secret_key): &(Option<String>, i32, i32),
    database: &str,
    decision: crate::policy::Decision,
) -> PgError {
    cancel_running(shared, *process_id, *secret_key).await;
    let mut error = PgError::fatal(
        "57P01",
        format!("pgiam: terminating connection: access to database {database} was revoked"),
    );
    if let Some(audit) = &shared.audit {
        let id = audit.next_id();
        let record = crate::audit_fields! {
            "id" => id,
            "kind" => "session_revoked",
            "session" => session_id,
            "denied" => decision.denied,
            "policies" => decision.policies,
        };
        if let Err(e) = audit.record(record).await {
            warn!("audit record for a revocation was not written: {e}");
        }
        error = error.with_audit_id(&id);
    }
    crate::metrics::get().ended_by("policy");
    info!(database, "session ended: access revoked by the policy");
    error
}

/// A session an operator (or the drain) ordered out: its running statement is cancelled, the
/// order recorded with who gave it, and the error for the client returned.
async fn ordered_out(
    shared: &Shared,
    (session_id, process_id, secret_key): &(Option<String>, i32, i32),
    order: Order,
) -> PgError {
    cancel_running(shared, *process_id, *secret_key).await;
    let (message, detail) = match &order {
        Order::Kill { by } => (
            "pgiam: terminating connection due to administrator command".to_owned(),
            format!("The session was killed by {by}."),
        ),
        Order::Revoke {
            by,
            principal,
            reason,
        } => (
            format!("pgiam: terminating connection: the access of {principal} was revoked"),
            match reason {
                Some(r) => format!("Revoked by {by}: {r}"),
                None => format!("Revoked by {by}."),
            },
        ),
        Order::Shutdown => (
            "pgiam: terminating connection due to administrator command".to_owned(),
            "pgiam is shutting down.".to_owned(),
        ),
        Order::Unmapped => (
            "pgiam: terminating connection: the configuration no longer maps this session's principal to its role".to_owned(),
            "pgiam.toml was reloaded without the mapping this session was established under.".to_owned(),
        ),
    };
    let mut error = PgError::fatal("57P01", message).with_detail(detail);
    if let Some(audit) = &shared.audit {
        let id = audit.next_id();
        let (principal, reason) = match &order {
            Order::Revoke {
                principal, reason, ..
            } => (Some(principal.as_str()), reason.as_deref()),
            _ => (None, None),
        };
        let record = crate::audit_fields! {
            "id" => id,
            "kind" => "session_killed",
            "session" => session_id,
            "order" => order.kind(),
            "by" => order.operator(),
            "principal" => principal,
            "reason" => reason,
        };
        if let Err(e) = audit.record(record).await {
            warn!("audit record for an ended session was not written: {e}");
        }
        error = error.with_audit_id(&id);
    }
    crate::metrics::get().ended_by(order.kind());
    info!(
        session = session_id.as_deref().unwrap_or("-"),
        order = order.kind(),
        "session ended by order: {}",
        error.message
    );
    error
}

/// Cancels whatever the session's backend is running (best effort: the session ends anyway).
async fn cancel_running(shared: &Shared, process_id: i32, secret_key: i32) {
    if let Some(target) = shared.cancels.lookup(process_id, secret_key) {
        if let Err(e) = target
            .upstream
            .cancel(target.process_id, target.secret_key, target.address)
            .await
        {
            warn!("ending a session: its running statement could not be cancelled: {e}");
        }
    }
}

/// Writes a framed run of client messages: as one write when all were authorized as they are,
/// else piecewise with the sentinels in place of the refused ones.
async fn write_checked<W: AsyncWriteExt + Unpin>(
    server: &mut W,
    chunk: &[u8],
    checked: &mut Vec<(std::ops::Range<usize>, statements::Checked)>,
) -> std::io::Result<()> {
    let mut at = 0;
    for (range, c) in checked.drain(..) {
        match c {
            statements::Checked::Forward(statements::Authorized { .. }) => {}
            statements::Checked::Substitute(with) => {
                server.write_all(&chunk[at..range.start]).await?;
                server.write_all(&with).await?;
                at = range.end;
            }
        }
    }
    server.write_all(&chunk[at..]).await
}

/// Waits for the records of what an answer is for (taken from `in_flight`), in order: the
/// first failure, if any. The wait is boxed, and made only if there is something to wait for.
fn all_written(
    in_flight: &std::sync::Mutex<Vec<crate::audit::Written>>,
) -> impl std::future::Future<Output = Result<(), crate::audit::AuditError>> {
    let waiting = std::mem::take(&mut *locked(in_flight));
    let wait = (!waiting.is_empty()).then(|| {
        Box::pin(async move {
            for written in waiting {
                written.wait().await?;
            }
            Ok(())
        })
    });
    async move {
        match wait {
            Some(wait) => wait.await,
            None => Ok(()),
        }
    }
}

/// Writes the server's answer with pgiam's errors in place of the runs `replaced` names, and
/// flushes.
async fn write_replaced<W: AsyncWriteExt + Unpin>(
    client: &mut W,
    answer: &[u8],
    replaced: Vec<(std::ops::Range<usize>, Bytes)>,
) -> std::io::Result<()> {
    let mut start = 0;
    for (range, with) in replaced {
        client.write_all(&answer[start..range.start]).await?;
        client.write_all(&with).await?;
        start = range.end;
    }
    client.write_all(&answer[start..]).await?;
    client.flush().await
}

/// The run of complete, valid client messages at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
struct Framed {
    /// Bytes that may be forwarded.
    len: usize,
    /// The run ends with a Terminate.
    terminate: bool,
    /// The message after the run is invalid.
    error: Option<WireError>,
}

/// Frames and validates client messages after login. Every byte pgiam forwards has passed
/// here; nothing after a Terminate or an invalid message is included. `visit` sees each message
/// that will be forwarded, decoded once.
fn frame_client_messages(
    buf: &[u8],
    max: usize,
    mut visit: impl FnMut(&FrontendMessage<'_>, std::ops::Range<usize>),
) -> Framed {
    let mut at = 0;
    let done = |len, terminate, error| Framed {
        len,
        terminate,
        error,
    };
    loop {
        let header = match wire::peek_header(&buf[at..], max) {
            Ok(Some(h)) if buf.len() - at >= h.total => h,
            Ok(_) => return done(at, false, None),
            Err(e) => return done(at, false, Some(e)),
        };
        let message = match wire::decode_frontend(header.tag, &buf[at + 5..at + header.total]) {
            Ok(m) => m,
            Err(e) => return done(at, false, Some(e)),
        };
        match message {
            FrontendMessage::AuthResponse(_) => {
                let e = WireError::Malformed {
                    what: "PasswordMessage",
                    detail: "not expected after authentication",
                };
                return done(at, false, Some(e));
            }
            FrontendMessage::Terminate => return done(at + header.total, true, None),
            _ => {
                visit(&message, at..at + header.total);
                at += header.total;
            }
        }
    }
}

/// Reads what the peer sends next into `buf`, `size` at a time. A read that would wait, with
/// nothing held in `buf`, gives `buf`'s room back and waits for the stream to be readable: an
/// idle session holds no read buffers. While bytes keep coming the room is kept and reused.
/// (Not an `async fn`: the future is only the references it polls with.)
fn read_when_ready<'a, S: Stream>(
    stream: &'a mut S,
    buf: &'a mut BytesMut,
    size: &'a mut ReadSize,
) -> impl std::future::Future<Output = std::io::Result<usize>> + 'a {
    use std::future::Future;
    use std::task::{ready, Poll};
    std::future::poll_fn(move |cx| {
        if buf.capacity() == 0 {
            ready!(stream.poll_read_ready(cx))?;
        }
        size.prepare(buf);
        let free = buf.capacity() - buf.len();
        let read = std::pin::pin!(stream.read_buf(buf)).poll(cx);
        match read {
            Poll::Ready(Ok(n)) => {
                size.observe(n, free);
                Poll::Ready(Ok(n))
            }
            Poll::Pending if buf.is_empty() => {
                *buf = BytesMut::new();
                Poll::Pending
            }
            other => other,
        }
    })
}

/// How much to read at a time: doubles while reads fill the buffer (a result set streaming),
/// halves when they come back small, so a session that reads little makes little room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadSize(usize);

impl ReadSize {
    const MIN: usize = 512;
    const MAX: usize = 256 * 1024;

    /// Makes room for the next read, giving back an empty buffer far larger than needed.
    fn prepare(self, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 4 * self.0 {
            *buf = BytesMut::with_capacity(self.0);
        }
        if buf.capacity() - buf.len() < self.0 / 2 {
            buf.reserve(self.0);
        }
    }

    /// Learns from a read of `n` bytes into `free` bytes of room.
    fn observe(&mut self, n: usize, free: usize) {
        if n >= free {
            self.0 = (self.0 * 2).min(Self::MAX);
        } else if n < self.0 / 4 {
            self.0 = (self.0 / 2).max(Self::MIN);
        }
    }
}

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(Self::MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session holds while it is idle is mostly its futures' own size. tokio allocates
    /// a task as one cell, 128-byte aligned, of the future and 104 bytes of its own: a client
    /// that has not spoken (the run future, waiting inline) fits in 512 bytes up to 408. The
    /// relay is boxed beside it once the session has spoken.
    #[test]
    fn an_idle_session_s_futures_stay_small() {
        fn returned<F: FnOnce(A, B, C, D, E) -> R, A, B, C, D, E, R>(_: F) -> usize {
            std::mem::size_of::<R>()
        }
        fn returned4<F: FnOnce(A, B, C, D) -> R, A, B, C, D, R>(_: F) -> usize {
            std::mem::size_of::<R>()
        }
        assert!(
            returned(run) <= 408,
            "the task of a waiting client: {}",
            returned(run)
        );
        assert!(returned4(relay) <= 1792, "the relay: {}", returned4(relay));
    }

    /// A read that would wait, with nothing held, gives its room back; what comes next is read
    /// whole, and room held for a partial message is kept.
    #[tokio::test]
    async fn an_idle_read_holds_no_buffer() {
        use std::future::Future;
        let (mut near, mut far) = tokio::io::duplex(1 << 16);
        let mut buf = BytesMut::new();
        let mut size = ReadSize::default();
        far.write_all(b"hello").await.unwrap();
        assert_eq!(
            read_when_ready(&mut near, &mut buf, &mut size)
                .await
                .unwrap(),
            5
        );
        assert_eq!(&buf[..], b"hello");
        let _ = buf.split();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        {
            let idle = std::pin::pin!(read_when_ready(&mut near, &mut buf, &mut size));
            assert!(idle.poll(&mut cx).is_pending());
        }
        assert_eq!(buf.capacity(), 0, "an idle session holds no read buffer");
        far.write_all(b"again").await.unwrap();
        assert_eq!(
            read_when_ready(&mut near, &mut buf, &mut size)
                .await
                .unwrap(),
            5
        );
        assert_eq!(&buf[..], b"again");
        // Part of a message is held: the room stays while the rest is awaited.
        {
            let waiting = std::pin::pin!(read_when_ready(&mut near, &mut buf, &mut size));
            assert!(waiting.poll(&mut cx).is_pending());
        }
        assert_eq!(&buf[..], b"again");
        far.write_all(b"!").await.unwrap();
        read_when_ready(&mut near, &mut buf, &mut size)
            .await
            .unwrap();
        assert_eq!(&buf[..], b"again!");
    }

    #[test]
    fn read_size_grows_while_streaming_and_shrinks_when_quiet() {
        let mut size = ReadSize::default();
        let mut buf = BytesMut::new();
        for _ in 0..10 {
            size.prepare(&mut buf);
            let free = buf.capacity() - buf.len();
            size.observe(free, free);
            buf.clear();
        }
        assert_eq!(size, ReadSize(ReadSize::MAX));
        assert!(buf.capacity() >= ReadSize::MAX / 2);
        for _ in 0..10 {
            size.prepare(&mut buf);
            size.observe(5, buf.capacity());
            buf.clear();
        }
        assert_eq!(size, ReadSize(ReadSize::MIN));
        size.prepare(&mut buf);
        assert!(buf.capacity() <= 4 * ReadSize::MIN, "{}", buf.capacity());
    }

    #[test]
    fn client_framing_stops_before_a_bad_message_and_after_terminate() {
        use postgres_protocol::message::frontend;
        let mut b = BytesMut::new();
        frontend::sync(&mut b);
        let good = b.len();
        b.extend_from_slice(b"S\0\0\0\x05x");
        let f = frame_client_messages(&b, 1 << 20, |_, _| {});
        assert_eq!(f.len, good);
        assert!(matches!(f.error, Some(WireError::Malformed { .. })));

        let mut b = BytesMut::new();
        frontend::sync(&mut b);
        frontend::password_message(b"pw", &mut b).unwrap();
        let f = frame_client_messages(&b, 1 << 20, |_, _| {});
        assert_eq!(f.len, 5, "a password after login is never forwarded");
        assert!(f.error.is_some());

        let mut b = BytesMut::new();
        frontend::terminate(&mut b);
        frontend::sync(&mut b);
        let f = frame_client_messages(&b, 1 << 20, |_, _| {});
        assert_eq!((f.len, f.terminate, f.error), (5, true, None));

        let mut b = BytesMut::new();
        frontend::query("select 1", &mut b).unwrap();
        let whole = b.len();
        b.extend_from_slice(b"Q\0\0");
        let f = frame_client_messages(&b, 1 << 20, |_, _| {});
        assert_eq!(
            (f.len, f.terminate, f.error),
            (whole, false, None),
            "partial: wait"
        );
        assert!(
            frame_client_messages(b"Q\0\0\x10\0", 1024, |_, _| {})
                .error
                .is_some(),
            "too large"
        );
    }
}
