//! The relay of an established session: client messages framed, authorized, recorded and
//! forwarded; the server's answers matched to the requests they answer and passed back; the
//! reads that give their buffers back while a direction is idle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::durability::{self, Wait};
use super::ending::{ordered_out, revoke};
use super::{
    protocol_violation, responses, statements, Client, Session, Shared, CLIENT_CLOSED,
    CLIENT_TERMINATED,
};
use crate::admin::registry::State;
use crate::pool::Released;
use crate::stream::{BoxStream, Split, Stream};
use crate::wire::{self, FrontendMessage, PgError, WireError};

fn catalog_max_age(shared: &Shared) -> Duration {
    Duration::from_secs(shared.settings.current().config.policy.catalog_max_age_secs)
}

/// The catalog snapshot of the session's database, read over a connection of its login's.
async fn read_catalog(
    shared: &Shared,
    source: &crate::catalog::cache::Source,
) -> crate::catalog::cache::Read {
    let max_age = catalog_max_age(shared);
    let (key, login) = (&source.key, &source.login);
    let read = || async {
        let current = shared.settings.current();
        let credentials = current
            .config
            .roles
            .get(&login.role)
            .ok_or_else(|| format!("no credentials for role {}", login.role))?;
        crate::catalog::cache::read(
            &current.upstream,
            &login.role,
            credentials,
            &key.1,
            login.target,
            current.config.limits.max_message_size,
        )
        .await
    };
    shared.catalogs.get(key, max_age, read).await
}

/// How long the server has to close a session pgiam is ending.
const ENDING_GRACE: Duration = Duration::from_secs(5);

/// Requests forwarded and unanswered beyond which a client is read no further. Well above
/// what a server holds back unflushed (its 8 KiB output buffer of 5-byte answers, ~1,640), so
/// a client that sends Sync only at the end still gets there; each costs pgiam ~200 bytes.
const MAX_OUTSTANDING: usize = 16_384;

/// How a relay ended: why, and the backend if it outlives the relay (pooled, and nothing
/// outstanding when the client left, or between two transactions of a transaction-pooled
/// session).
pub(super) struct Ended {
    pub why: String,
    pub released: Option<(Box<crate::pool::Lease>, Released)>,
    /// The session goes on: only its transaction ended (transaction pooling), and the backend
    /// goes back to the pool until the client sends its next message.
    pub between_transactions: bool,
    /// The session goes on with this backend: it was idle between two transactions through a
    /// whole tick of the registry's clock, and its relay is given back until either side
    /// speaks (the backend holds all of the session's state; the relay, between two
    /// transactions, none that a new one would not start with). (Boxed: it is seldom there.)
    pub resting: Option<Box<super::login::Backend>>,
}

impl Ended {
    /// The backend of a session whose relay rested, or how the relay ended otherwise. (By
    /// value: a field moved out of a value the task keeps would cost it a drop flag in every
    /// state.)
    pub fn resting(self) -> Result<super::login::Backend, Ended> {
        match self.resting {
            Some(backend) => Ok(*backend),
            None => Err(self),
        }
    }
}

/// Why a transaction-pooled session's relay ends while the session goes on.
const BETWEEN_TRANSACTIONS: &str = "between transactions";
/// Why an idle session's relay ends while the session goes on with its backend.
const RESTING: &str = "resting";

/// Ticks of the registry's clock (a second each) a session is idle through before its relay
/// is given back: at least one whole tick, so a session between two statements never is.
const QUIET_TICKS: u64 = 2;

/// Moves bytes both ways until either side ends. Client messages are framed, validated and
/// authorized before they are forwarded; server messages stream through, matched to the
/// requests they answer.
/// Returns why the session ended. (Its state is borrowed: what the relay's future holds is
/// its own.)
pub(super) fn relay<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    session: &'a mut Session,
    upstream: super::login::Backend,
) -> impl std::future::Future<Output = Ended> + Send + 'a {
    // Taken apart before the relay's future exists: an `async fn` would keep the whole
    // argument beside its parts.
    let super::login::Backend { stream, lease } = upstream;
    relay_backend(shared, client, session, stream, lease)
}

/// What the relay reads and never changes, reached through one reference (see [`Between`]).
struct Fixed<'a> {
    shared: &'a Shared,
    live: &'a std::sync::Arc<crate::admin::registry::Live>,
    /// (Borrowed, not the session's `ids()`: the gate is borrowed mutably beside them.)
    session_ids: (Option<&'a str>, i32, i32),
    /// The database's catalog, read for operators and casts.
    catalog: &'a crate::catalog::cache::Source,
    max: usize,
    stalled_after: Duration,
    metrics: &'static crate::metrics::Metrics,
    pooled: bool,
    /// The backend is given back whenever the session is between two transactions and holds
    /// nothing in it that a later transaction needs.
    transaction_pooled: bool,
    pending: &'a crate::cancel::Pending,
}

/// What the relay's two directions share. Both run in the one task, so the locks are never
/// contended and no guard is held across an await. One value, reached through one reference:
/// each direction's future keeps a pointer to it, not one per field (precise captures take
/// every field apart when it is a local of its own or named through a place).
struct Between {
    /// A pooled session whose client left with nothing outstanding gives its backend back
    /// (and whether a transaction block was open on it).
    released: AtomicBool,
    released_in_block: AtomicBool,
    /// What the server says about standard_conforming_strings, for classifying what follows.
    standard_conforming_strings: AtomicBool,
    /// The client-to-server direction never writes to the client: a fatal error it finds is
    /// handed to the other direction, which writes it once the server has gone quiet, so it
    /// can never land in the middle of a server message. (A slot, not a channel: an idle
    /// session would hold the channel's block.)
    fatal: std::sync::Mutex<Option<Box<PgError>>>,
    /// Set when the session is being ended (an order, a revocation): from then on nothing more
    /// of the server's reaches the client.
    ending: AtomicBool,
    /// Signalled as answers are read, for a direction that stopped reading its client.
    drained: tokio::sync::Notify,
    /// Requests forwarded, in order, for the direction that reads the answers; and back from
    /// it, prepared statements the server did not create after all. (Not channels: an idle
    /// session would hold their preallocated blocks.)
    responses: std::sync::Mutex<responses::Responses>,
    unprepared: std::sync::Mutex<Vec<(Vec<u8>, u64)>>,
    /// The client_encoding the server last reported, for the gate.
    reported_encoding: std::sync::Mutex<Option<String>>,
    /// Decision records of statements forwarded before their records were on disk
    /// (statements that change nothing): no answer reaches the client before they are.
    in_flight: std::sync::Mutex<Vec<crate::audit::Written>>,
    /// Whether the direction that reads the server waits for it with nothing of its own in
    /// hand (what it holds is then only the start of a message no request asked for), and
    /// whether it holds nothing at all.
    parked: AtomicBool,
    parked_empty: AtomicBool,
}

async fn relay_backend(
    shared: &Shared,
    client: &mut Client,
    session: &mut Session,
    upstream: BoxStream,
    mut lease: Option<Box<crate::pool::Lease>>,
) -> Ended {
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
    let pending = session.cancel_key.pending();
    let live = session.registration.live();
    // (Borrowed, not the session's `ids()`: the gate is borrowed mutably beside them.)
    let session_ids = (
        live.session_id(),
        session.cancel_key.process_id(),
        session.cancel_key.secret_key(),
    );
    let metrics = crate::metrics::get();
    let pooled = lease.is_some();
    // The backend is given back whenever the session is between two transactions and holds
    // nothing in it that a later transaction needs.
    let transaction_pooled = pooled && live.facts.pool == crate::config::PoolMode::Transaction;
    // The server's bytes read and not yet passed on (outside the direction that reads them,
    // so that a backend given back to its pool keeps them).
    let mut sbuf = BytesMut::new();
    let fixed = &Fixed {
        shared,
        live,
        session_ids,
        catalog: &session.catalog,
        max,
        stalled_after,
        metrics,
        pooled,
        transaction_pooled,
        pending: &pending,
    };
    let between = &Between {
        released: AtomicBool::new(false),
        released_in_block: AtomicBool::new(false),
        standard_conforming_strings: AtomicBool::new(session.standard_conforming_strings),
        fatal: std::sync::Mutex::new(None),
        ending: AtomicBool::new(false),
        drained: tokio::sync::Notify::new(),
        responses: std::sync::Mutex::new(responses::Responses::default()),
        unprepared: std::sync::Mutex::new(Vec::new()),
        reported_encoding: std::sync::Mutex::new(None),
        in_flight: std::sync::Mutex::new(Vec::new()),
        parked: AtomicBool::new(false),
        parked_empty: AtomicBool::new(false),
    };
    let why = {
        let gate = &mut session.gate;
        // A transaction-pooled session's prepared statements, and what this backend holds.
        let mut carried = match (&mut session.transactions, lease.as_deref_mut()) {
            (Some(t), Some(lease)) if fixed.transaction_pooled => {
                t.carried.landed();
                Some((&mut t.carried, lease.held()))
            }
            _ => None,
        };
        let audit = fixed.shared.audit.as_ref();
        let mut woken = fixed.shared.registry.subscribe_relay();

        let mut to_server = std::pin::pin!(async {
            let mut client_size = ReadSize::default();
            let mut checked = Vec::new();
            let mut expects = Vec::new();
            // The registry's clock as last woken by it, and where it stood when this
            // direction last found the session anything but settled.
            let mut ticked = *woken.borrow_and_update();
            let mut unsettled_at = ticked;
            // When part of a message held must be whole, counted from the read that last
            // brought some of it: a wake-up that brings nothing (the clock, a policy, answers
            // read) must not start the count again.
            let mut stall_deadline: Option<tokio::time::Instant> = None;
            let result: Result<&'static str, PgError> = async {
            loop {
                if let Some(order) = fixed.live.order() {
                    between.ending.store(true, Ordering::Relaxed);
                    return Err(Box::pin(ordered_out(fixed.shared, &fixed.session_ids, order)).await);
                }
                // A new policy, or a renewed person, is checked before anything more is
                // forwarded under it.
                let renewed = gate.follow_person(&fixed.shared.people);
                if gate.refresh_policy() || renewed {
                    let d = gate.may_connect();
                    if !d.allowed {
                        let database = gate.database().to_owned();
                        between.ending.store(true, Ordering::Relaxed);
                        return Err(Box::pin(revoke(fixed.shared, &fixed.session_ids, &database, d)).await);
                    }
                }
                for (name, generation) in std::mem::take(&mut *locked(&between.unprepared)) {
                    if let Some((carried, held)) = carried.as_mut() {
                        carried.not_prepared(&name, held);
                    }
                    gate.forget_prepared(&name, generation);
                }
                if let Some(e) = locked(&between.reported_encoding).take() {
                    gate.client_encoding_reported(&e);
                }
                // A statement forwarded may have changed the catalog: read again, until its
                // transaction is over (what it did is then visible to every later read).
                if gate.catalog_changing() {
                    fixed.shared.catalogs.invalidate(&fixed.catalog.key);
                    if locked(&between.responses).between_transactions() {
                        gate.catalog_settled();
                    }
                }
                if !cbuf.is_empty() {
                    let read = match fixed.shared.catalogs.usable(&fixed.catalog.key, catalog_max_age(fixed.shared)) {
                        Some(read) => read,
                        None => Box::pin(read_catalog(fixed.shared, fixed.catalog)).await,
                    };
                    gate.use_catalog(read);
                }
                // Forward what was complete and valid before a bad message, as a server would
                // have executed it; nothing from the bad message on.
                let framed = frame_client_messages(&cbuf, fixed.max, |message, range| {
                    let frame = &cbuf[range.clone()];
                    // (Read here, not held: both directions run in this task, so it does not
                    // change while a run is framed.)
                    let scs = between.standard_conforming_strings.load(Ordering::Relaxed);
                    // A transaction-pooled session's statements may not be on this backend:
                    // what the client parsed (and pgiam authorized) under the name a message
                    // uses goes ahead of it. What runs is decided at Execute, as always.
                    if let Some((carried, held)) = carried.as_mut() {
                        for (kind, ahead) in carried.ahead_of(message, held) {
                            expects.push(statements::Expect {
                                kind,
                                record: None,
                                refused: None,
                                creates: Vec::new(),
                                started: std::time::Instant::now(),
                                execution_follows: false,
                            });
                            let at = range.start;
                            checked.push((at..at, statements::Checked::Substitute(ahead)));
                        }
                    }
                    let decided = crate::metrics::timed(&fixed.metrics.decision, || {
                        gate.check(message, frame, scs, &mut expects)
                    });
                    if let Some((carried, held)) = carried.as_mut() {
                        let authorized = matches!(decided, statements::Checked::Forward(_));
                        carried.forwarded(message, frame, authorized, held);
                    }
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
                        let in_block = locked(&between.responses).idle_in_block();
                        match durability::wait_for(
                            audit.durability(),
                            batch.effect,
                            in_block,
                            end,
                            records,
                            batch.must_sync,
                        ) {
                            Wait::Nothing => {}
                            Wait::Answer(upto) => locked(&between.in_flight).push(audit.durable(upto)),
                            Wait::Forward(upto) => {
                                fixed.live.set_state(State::WaitingForAudit);
                                audit.durable(upto).wait().await.map_err(unavailable)?
                            }
                        }
                    }
                    {
                        // Taken, not drained: an idle session keeps no room for a pipeline.
                        let mut r = locked(&between.responses);
                        for e in std::mem::take(&mut expects) {
                            r.push(e);
                        }
                    }
                    // Before the write: its answer may come back while the write is awaited.
                    fixed.live.set_state(State::Active);
                    fixed.live.bytes_in(framed.len);
                    fixed.metrics.bytes_from_clients.inc_by(framed.len as u64);
                    // A pooled backend outlives its client: the client's Terminate is not
                    // the server's. (Written from the buffer and passed over after: a split
                    // would make the buffer shared, an allocation per batch.)
                    let forwarded = if fixed.pooled && framed.terminate {
                        framed.len - wire::TERMINATE.len()
                    } else {
                        framed.len
                    };
                    let chunk = &cbuf[..forwarded];
                    // Flushed: a TLS writer may keep the tail of what it accepted (the socket was
                    // full) until it is flushed, and nothing else would push it out. (Boxed, as
                    // are the other waits that only a busy session makes: the relay is sized by
                    // its largest wait, and an idle session holds only its reads.)
                    Box::pin(async {
                        write_checked(&mut server_wr, chunk, &mut checked).await?;
                        server_wr.flush().await
                    })
                    .await
                    .map_err(|e| PgError::fatal("08006", format!("pgiam: server write: {e}")))?;
                    cbuf.advance(framed.len);
                    if gate.catalog_changing() {
                        fixed.shared.catalogs.invalidate(&fixed.catalog.key);
                    }
                }
                if let Some(e) = framed.error {
                    return Err(protocol_violation(e));
                }
                if framed.terminate {
                    return Ok(CLIENT_TERMINATED);
                }
                // A message whose header says how long it is gets room for all of it at once.
                if let Ok(Some(h)) = wire::peek_header(&cbuf, fixed.max) {
                    if h.total > cbuf.len() {
                        cbuf.reserve(h.total - cbuf.len());
                    }
                }
                // Nothing is left of what was checked: an idle session keeps no room for it.
                checked = Vec::new();
                // Between two transactions, with everything answered and nothing half sent
                // either way. (Looked at only when it would change something: the locks are
                // not taken between the statements of a busy session.)
                let settled = (fixed.transaction_pooled || ticked > unsettled_at)
                    && cbuf.is_empty()
                    && between.parked_empty.load(Ordering::Relaxed)
                    && locked(&between.in_flight).is_empty()
                    && locked(&between.responses).between_transactions();
                // A transaction-pooled session's backend goes back to the pool.
                if fixed.transaction_pooled && settled && !gate.holds_session_state() {
                    between.released.store(true, Ordering::Relaxed);
                    return Ok(BETWEEN_TRANSACTIONS);
                }
                // Any other session settled for a whole tick gives its relay back: what an
                // idle session holds is then its task, its sockets and its gate.
                if !settled {
                    unsettled_at = ticked;
                } else if ticked - unsettled_at >= QUIET_TICKS && !fixed.transaction_pooled {
                    return Ok(RESTING);
                }
                // Waiting for the client is also waiting for the policy to change: a session
                // whose access is revoked ends now (at the top of the loop), not at its next
                // statement.
                // Everything forwardable is forwarded: a cancel may go now, unless part of a
                // message is still held (it may be the statement the cancel is for).
                fixed.pending.set(!cbuf.is_empty());
                // A client that pipelines without waiting for answers (no Sync, or answers it
                // has not read yet) is read no further while this many requests are unanswered:
                // what pgiam keeps per request stays bounded, and the client's sends block, as
                // they would against a server that stops reading.
                if locked(&between.responses).outstanding() >= MAX_OUTSTANDING {
                    fixed.pending.set(!cbuf.is_empty());
                    // (Boxed: only a session held back pays for the wait's room.)
                    Box::pin(async {
                        tokio::select! {
                            () = between.drained.notified() => {}
                            Ok(()) = woken.changed() => {}
                        }
                    })
                    .await;
                    continue;
                }
                // Part of a message held: the rest must come within the limit. (Boxed, and made
                // only then: a timer is hundreds of bytes an idle session need not hold.)
                if cbuf.is_empty() {
                    stall_deadline = None;
                }
                let stall = (!cbuf.is_empty()).then(|| {
                    let deadline = *stall_deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + fixed.stalled_after);
                    Box::pin(tokio::time::sleep_until(deadline))
                });
                // Answers read may end the transaction (transaction pooling; boxed likewise).
                let answered = fixed.transaction_pooled.then(|| Box::pin(between.drained.notified()));
                // The read first: a deadline that has passed does not end a session whose
                // client's bytes are there to be read.
                let read = tokio::select! {
                    biased;
                    r = read_when_ready(&mut client_rd, &mut cbuf, &mut client_size) => r,
                    Ok(()) = woken.changed() => {
                        let now = *woken.borrow_and_update();
                        // Ticks that passed while this direction waited elsewhere (a write,
                        // the audit) count as one: they are not quiet it saw.
                        if now > ticked + 1 {
                            unsettled_at = unsettled_at.max(now - 1);
                        }
                        ticked = now;
                        continue;
                    }
                    () = async { match answered { Some(a) => a.await, None => std::future::pending().await } } => continue,
                    () = async { match stall { Some(s) => s.await, None => std::future::pending().await } } => {
                        return Err(PgError::fatal(
                            "08P01",
                            format!(
                                "pgiam: the client sent part of a message and nothing more for {}s",
                                fixed.stalled_after.as_secs()
                            ),
                        ));
                    }
                };
                if let Ok(n) = read {
                    fixed.pending.set(n > 0);
                    if n > 0 {
                        stall_deadline = None;
                    }
                }
                match read {
                    Ok(0) if cbuf.is_empty() => return Ok(CLIENT_CLOSED),
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
            if result == Ok(BETWEEN_TRANSACTIONS) || result == Ok(RESTING) {
                return result;
            }
            // A pooled backend whose client left cleanly, with every request answered and
            // nothing of a server message half passed on, goes back to its pool.
            if fixed.pooled
                && matches!(result, Ok(CLIENT_TERMINATED) | Ok(CLIENT_CLOSED))
                && !between.ending.load(Ordering::Relaxed)
                && between.parked.load(Ordering::Relaxed)
            {
                let r = locked(&between.responses);
                if r.idle() && r.at_boundary() {
                    between
                        .released_in_block
                        .store(r.in_block(), Ordering::Relaxed);
                    between.released.store(true, Ordering::Relaxed);
                    return result;
                }
            }
            // Whatever ended this direction, the server is told the session is over (a
            // pooled session's Terminate was held back for the pool).
            if result != Ok(CLIENT_TERMINATED) || fixed.pooled {
                let mut t = BytesMut::new();
                // A COPY FROM STDIN the client was in the middle of fails with pgiam's reason
                // (the server ignores a CopyFail outside one), rather than on the Terminate.
                if let Err(e) = &result {
                    let _ = postgres_protocol::message::frontend::copy_fail(&e.message, &mut t);
                }
                postgres_protocol::message::frontend::terminate(&mut t);
                let _ = server_wr.write_all(&t).await;
            }
            let _ = server_wr.shutdown().await;
            if let Err(e) = &result {
                *locked(&between.fatal) = Some(Box::new(e.clone()));
            }
            result
        });

        let mut to_client = std::pin::pin!(async {
            let sbuf = &mut sbuf;
            let mut size = ReadSize::default();
            // Why an answer was held back for good: the audit record it waited for failed.
            let mut withheld: Option<Box<PgError>> = None;
            // A transaction-pooled session may be between transactions from the start (a
            // backend opened at login, or one whose client has nothing more to say): the
            // other direction looks once this one waits.
            if fixed.transaction_pooled {
                between.drained.notify_one();
            }
            let end = 'relay: loop {
                between.parked.store(true, Ordering::Relaxed);
                between
                    .parked_empty
                    .store(sbuf.is_empty(), Ordering::Relaxed);
                let read = read_when_ready(&mut server_rd, sbuf, &mut size).await;
                between.parked.store(false, Ordering::Relaxed);
                between.parked_empty.store(false, Ordering::Relaxed);
                match read {
                    Ok(0) => break "server closed",
                    Ok(_) => {}
                    Err(_) => break "server read failed",
                }
                // Ended by an order or a revocation: the server's answer to the cancel is not
                // the client's; the FATAL that says why is its last word, as when PostgreSQL
                // terminates a backend. (Looked at again after the audit wait below.)
                if between.ending.load(Ordering::Relaxed) {
                    sbuf.clear();
                    continue;
                }
                // Whatever this answers was forwarded, its record handed to the writer, before it
                // was read: nothing of it is written to the client before that record is on disk.
                if let Err(e) = all_written(&between.in_flight).await {
                    warn!(peer = %peer, session = %fixed.live.facts.id, "{e}: the answer is withheld and the session ends");
                    withheld = Some(Box::new(
                        PgError::fatal(
                            "58030",
                            "pgiam: the audit log is unavailable; the statement's result was withheld",
                        )
                        .with_detail(e.to_string()),
                    ));
                    break 'relay "audit log unavailable";
                }
                if between.ending.load(Ordering::Relaxed) {
                    sbuf.clear();
                    continue;
                }
                // What to write: runs of the server's bytes, with pgiam's errors in place of the
                // sentinels'. Decided under the lock, written after it.
                let mut replaced: Vec<(std::ops::Range<usize>, Bytes)> = Vec::new();
                let mut pos = 0;
                let mut failed = false;
                let events = {
                    let mut r = locked(&between.responses);
                    loop {
                        match r.step(&sbuf[pos..]) {
                            Ok(responses::Step::Pass(n)) => pos += n,
                            Ok(responses::Step::Replace { len, with }) => {
                                replaced.push((pos..pos + len, with));
                                pos += len;
                            }
                            Ok(responses::Step::NeedMore) => break,
                            Err(e) => {
                                warn!(peer = %peer, session = %fixed.live.facts.id, "invalid data from the server: {e}");
                                failed = true;
                                break;
                            }
                        }
                    }
                    r.release();
                    fixed.live.set_state(match (r.idle(), r.in_block()) {
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
                fixed.live.bytes_out(pos);
                fixed.metrics.bytes_to_clients.inc_by(pos as u64);
                sbuf.advance(pos);
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
                            locked(&between.unprepared).push((name, generation));
                        }
                        responses::Event::StandardConformingStrings(on) => between
                            .standard_conforming_strings
                            .store(on, Ordering::Relaxed),
                        responses::Event::ClientEncoding(value) => {
                            *locked(&between.reported_encoding) = Some(value)
                        }
                        responses::Event::UnsafeClientEncoding(value) => {
                            warn!(peer = %peer, session = %fixed.live.facts.id, "server switched client_encoding to {value}: ending the session");
                            failed = true;
                        }
                    }
                }
                if failed {
                    break "invalid data from the server, or an encoding pgiam cannot read";
                }
                // Answers read: a client held back for its pipeline may be read again.
                between.drained.notify_one();
            };
            // The last word, written only between two of the server's messages: why the answer
            // was withheld, or the error that ended the other direction once the server is drained.
            let last_word =
                withheld.or_else(|| sbuf.is_empty().then(|| locked(&between.fatal).take())?);
            if let Some(e) = last_word.filter(|_| locked(&between.responses).at_boundary()) {
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
        // The direction that reads the server looks first, once, so the other knows from its
        // first turn whether it holds anything (a relay built again for a client that only
        // says goodbye can then give a pooled backend back). After that neither is favoured:
        // a biased select would let a streaming result starve the direction that reads the
        // client, and with it the orders and the client's pipeline.
        let first_look = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(to_client.as_mut(), cx))
        })
        .await;
        if let std::task::Poll::Ready(why) = first_look {
            debug!(peer = %peer, session = %fixed.live.facts.id, "{why}");
            ended_by = why.to_owned();
        } else {
            // (Not a `while` on the first look: it would be kept in the future for the loop.)
            loop {
                tokio::select! {
                    () = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                        warn!(peer = %peer, session = %fixed.live.facts.id, "the server did not close the ended session within {}s: cut off", ENDING_GRACE.as_secs());
                        break;
                    }
                    why = &mut to_client => {
                        debug!(peer = %peer, session = %fixed.live.facts.id, "{why}");
                        if ended_by.is_empty() {
                            ended_by = why.to_owned();
                        }
                        break;
                    }
                    r = &mut to_server, if !server_side_done => {
                        server_side_done = true;
                        if between.ending.load(Ordering::Relaxed) {
                            grace = Some(Box::pin(tokio::time::sleep(ENDING_GRACE)));
                        }
                        let given_back = between.released.load(Ordering::Relaxed);
                        match r {
                            Ok(why) => {
                                debug!(peer = %peer, session = %fixed.live.facts.id, "{why}");
                                ended_by = why.to_owned();
                            }
                            Err(e) => {
                                warn!(peer = %peer, session = %fixed.live.facts.id, code = e.code, "closing session: {}", e.message);
                                ended_by = e.message.clone();
                            }
                        }
                        // Nothing more will come from the server for this session (or not to this
                        // relay).
                        if given_back || ended_by == RESTING {
                            break;
                        }
                    }
                }
            }
        }
        ended_by
    };
    // What the session changed in the catalog is read afresh by the next one that needs it.
    if session.gate.catalog_changing() {
        shared.catalogs.invalidate(&session.catalog.key);
    }
    let between_transactions = why == BETWEEN_TRANSACTIONS;
    if between_transactions || why == RESTING {
        // The session goes on: the client is its own again, with what it has sent since.
        client.stream = client_io.into_inner();
        client.buf = cbuf;
    }
    if why == RESTING {
        session.standard_conforming_strings =
            between.standard_conforming_strings.load(Ordering::Relaxed);
        fixed.metrics.rested.inc();
        return Ended {
            why,
            released: None,
            between_transactions: false,
            resting: Some(Box::new(super::login::Backend {
                stream: server_io.into_inner(),
                lease,
            })),
        };
    }
    let released = match lease {
        Some(lease) if between.released.load(Ordering::Relaxed) => Some((
            lease,
            Released {
                stream: server_io.into_inner(),
                leftover: sbuf,
                in_block: between.released_in_block.load(Ordering::Relaxed),
            },
        )),
        _ => None,
    };
    Ended {
        why,
        released,
        between_transactions,
        resting: None,
    }
}

/// The lock's contents, even if a panic poisoned it (the data is a queue, always consistent
/// between operations).
pub(super) fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
pub(super) fn read_when_ready<'a, S: Stream>(
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
pub(super) struct ReadSize(usize);

impl ReadSize {
    pub(super) const MIN: usize = 512;
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
